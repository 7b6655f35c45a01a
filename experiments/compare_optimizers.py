"""Compare optimizers by R_med per layer, in the layout of the paper's tables.

One config entry (``experiments/configs/<name>.json``, presets ``quick`` and
``paper``) names a model, data, optimizers and schedule. Every optimizer starts
each repeat from the same initialisation (repeats differ in their mini-batch
order); at the configured steps ``fasthess.diag`` measures exact H_ii at 200
sampled coordinates of every linear/attention weight on a fixed Hessian batch
(micro-batched). The table gives, per layer, the mean (std) over repeats of R_med
for the first optimizer of the config (the reference, SGD+M in the paper) and each
other one, and of their ratio, as in Tables 2 and 6 of the paper.

The model, data and loss come from the config's ``task`` (:mod:`tasks`). Configs:
``table1`` (BERT-small sentence classification, linearly decreasing learning rates;
offline the Rotten Tomatoes stand-in), ``table2a`` (seq2seq Transformer,
German→English; offline the ``trans-de-en`` stand-in), ``table2b`` (the same model
with random integer targets), ``table3``/``table4``/``table5`` (Transformer language
model, Adagrad vs SGD under uniform / normal initialisation gains and on random
data; each gain a ``variant``), ``table6`` (RMSprop and AMSGrad against SGD+M),
``table8`` (SGD switched to Adam mid-run against Adam throughout), ``table9``
(Table 2(a) with weight decay 0.001) and ``table10`` (ResNet; offline MNIST-5k).
Runs are resumable: model and optimizer state are checkpointed every
``checkpoint_every`` steps and every finished Hessian evaluation is kept, so a
killed run continues where it stopped and ends with the records of an uninterrupted
one, bit for bit (every step draws its mini-batch and dropout masks from
:mod:`seeding`). Checkpoints are plain tensors, read without running code, written
atomically and tied to their config (:mod:`checkpoint`). ``snapshot_steps`` keeps
the weights at those steps (for ``equal_loss.py``: Table 7 and Figure 1(a)).

Run:
    python experiments/compare_optimizers.py table2b --preset quick --out runs/table2b
    torchrun --nproc_per_node=2 experiments/compare_optimizers.py table2b --out runs/table2b  # repeats shared
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fasthess

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoint import fingerprint, load, read_json, save, write_json  # noqa: E402
from optimizers import make_optimizer  # noqa: E402
from parallel import run_jobs  # noqa: E402
from plots import plot_losses, plot_rmed, plot_rmed_over_time  # noqa: E402
from provenance import provenance, write_csv  # noqa: E402
from seeding import seed_step  # noqa: E402
from tasks import Seq2Seq, get_task, seq2seq_loss  # noqa: E402,F401  (Seq2Seq, seq2seq_loss: for importers)


def make_data(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """The config's training examples (see :mod:`tasks`)."""
    return get_task(cfg).make_data(cfg, seed)


def merged(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in, recursively (a variant's changes to a config)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def hessian_layers(cfg: dict) -> list[type[nn.Module]] | None:
    """Module types to measure (``layer_types``, e.g. ``["Conv2d", "Linear"]``); None: fasthess's default."""
    return [getattr(nn, t) for t in cfg["layer_types"]] if cfg.get("layer_types") else None


def set_learning_rate(opt, cfg: dict, step: int) -> None:  # noqa: ANN001
    """``lr_schedule``: "constant" (default) or "linear" (decreasing to 0 at the last step, Table 1)."""
    factor = 1.0 - step / cfg["steps"] if cfg.get("lr_schedule", "constant") == "linear" else 1.0
    for group in opt.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


# config sections one optimizer's repeats do not depend on (the other drivers' sections among them)
NOT_IN_RUN = ("_note", "repeats", "checkpoint_every", "optimizers", "variants", "equal_loss", "restart",
              "checkpoint_steps", "dominance", "alignment", "low_rank")


def run_fingerprint(cfg: dict, opt_name: str) -> str:
    """The fingerprint of what a run of ``opt_name`` depends on: its checkpoints, snapshots and records carry it."""
    rest = {k: v for k, v in cfg.items() if k not in NOT_IN_RUN}
    return fingerprint({"optimizer": cfg["optimizers"][opt_name], **rest})


def run_repeat(cfg: dict, opt_name: str, repeat: int, data: dict, out: Path) -> dict:
    """Train one optimizer for one repeat (resuming from its checkpoint) and measure the Hessians."""
    record_path = out / "runs" / f"{opt_name}-r{repeat}.json"
    config = run_fingerprint(cfg, opt_name)
    if record_path.exists():
        return read_json(record_path, config, fix="pass a new --out folder (or move this finished record away "
                                                  "to compute it again)")
    ckpt_path = out / "checkpoints" / f"{opt_name}-r{repeat}.pt"
    task = get_task(cfg)
    torch.manual_seed(cfg["seed"])  # the same initialisation for every optimizer and repeat
    model = task.build(cfg, data)
    opt = make_optimizer(cfg["optimizers"][opt_name], model.parameters())
    state = {"step": 0, "losses": [], "hessians": {}}
    if ckpt_path.exists():
        saved = load(ckpt_path, config)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
    n_h, mb = cfg["data"]["hessian_examples"], cfg["data"]["hessian_micro_batch"]
    hess_loss = [lambda s=s: task.loss(model, {k: v[s : s + mb] for k, v in data.items()}) for s in range(0, n_h, mb)]
    snapshots = set(cfg.get("snapshot_steps", []))
    batch = cfg["data"]["batch"]
    start = time.perf_counter()
    while True:
        step = state["step"]
        if step in snapshots:  # for comparisons at equal loss (Table 7, Figure 1(a)) and the analyses
            save(out / "snapshots" / f"{opt_name}-r{repeat}-s{step}.pt", {"model": model.state_dict(),
                 "optimizer": opt.state_dict(), "losses": list(state["losses"]), "step": step}, config)
        if step in cfg["eval_steps"] and str(step) not in state["hessians"]:
            model.eval()
            res = fasthess.diag(model, hess_loss, hessian_layers(cfg), num_samples=cfg["num_samples"], seed=cfg["seed"])
            state["hessians"][str(step)] = {"r_med": res.r_med(stabilized=True), "loss": res.meta["loss"]}
            print(f"  {opt_name} r{repeat} step {step}: Hessian in {res.meta['seconds']:.1f} s", flush=True)
        if step >= cfg["steps"]:
            break
        model.train()
        g = seed_step(cfg["seed"], "run", repeat, step)  # batch and dropout masks fixed per (repeat, step)
        idx = torch.randint(0, len(next(iter(data.values()))), (batch,), generator=g)
        set_learning_rate(opt, cfg, step)
        opt.zero_grad()
        loss = task.loss(model, {k: v[idx] for k, v in data.items()})
        if not torch.isfinite(loss):  # stop at once: the checkpoints and other runs stay usable
            lr = [group["lr"] for group in opt.param_groups]
            raise FloatingPointError(
                f"{opt_name} repeat {repeat} diverged: training loss {float(loss)} at step {step} (lr {lr}). "
                f"Lower optimizers.{opt_name}.lr in the config; finished runs are kept and resume.")
        loss.backward()
        if cfg.get("clip_grad_norm"):  # the language-modelling tutorial's setting (paper presets of Tables 3-5)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad_norm"])
        opt.step()
        state["losses"].append(float(loss.detach()))
        state["step"] = step + 1
        if state["step"] % cfg["checkpoint_every"] == 0:
            save(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, config)
        if state["step"] % max(1, cfg["steps"] // 5) == 0:
            recent = state["losses"][-20:]
            print(f"  {opt_name} r{repeat} step {state['step']}/{cfg['steps']}  loss {sum(recent) / len(recent):.4f}", flush=True)
    record = {"optimizer": opt_name, "repeat": repeat, "losses": state["losses"], "hessians": state["hessians"],
              "seconds": time.perf_counter() - start, "fingerprint": config}
    write_json(record_path, record)
    return record


def table(records: list[dict], cfg: dict, step: int) -> list[dict]:
    """Per other optimizer and layer: mean and std over repeats of R_med and of the ratio to the first optimizer.

    The first optimizer of the config is the reference (SGD+M in the paper's tables);
    repeat i of every optimizer shares its mini-batch order, so ratios are per repeat.
    """
    names = list(cfg["optimizers"])
    by = {name: [r for r in records if r["optimizer"] == name] for name in names}
    reference = names[0]
    layers = list(by[reference][0]["hessians"][str(step)]["r_med"])
    std = lambda t: float(t.std()) if t.numel() > 1 else 0.0  # noqa: E731
    rows = []
    for other in names[1:]:
        for layer in layers:
            a = torch.tensor([r["hessians"][str(step)]["r_med"][layer] for r in by[reference]], dtype=torch.float64)
            b = torch.tensor([r["hessians"][str(step)]["r_med"][layer] for r in by[other]], dtype=torch.float64)
            k = min(len(a), len(b))
            ratio = a[:k] / b[:k]
            rows.append({"step": step, "layer": layer, "reference": reference, "other": other,
                         "reference_mean": float(a.mean()), "reference_std": std(a),
                         "other_mean": float(b.mean()), "other_std": std(b),
                         "ratio_mean": float(ratio.mean()), "ratio_std": std(ratio)})
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per (variant, other optimizer, step): how many layers have a ratio above 1, and the median ratio.

    ``clear`` counts layers whose mean ratio is more than one std (over repeats) above 1,
    so a single repeat (std 0) counts every layer above 1 as clear.
    """
    groups = dict.fromkeys((r["variant"], r["other"], r["step"]) for r in rows)
    out = []
    for variant, other, step in groups:
        ratios = [r for r in rows if (r["variant"], r["other"], r["step"]) == (variant, other, step)]
        means = torch.tensor([r["ratio_mean"] for r in ratios], dtype=torch.float64)
        out.append({"variant": variant, "reference": ratios[0]["reference"], "other": other, "step": step,
                    "layers": len(ratios), "above_1": int((means > 1).sum()),
                    "clearly_above_1": sum(r["ratio_mean"] - r["ratio_std"] > 1 for r in ratios),
                    "median_ratio": statistics.median(means.tolist()), "min_ratio": float(means.min()),
                    "max_ratio": float(means.max())})
    return out


def run_all(cfg: dict, out: Path) -> tuple[list[dict], list[dict]] | None:
    """Every repeat of every optimizer of every variant; returns the run records and the table rows.

    Under ``torchrun`` the (optimizer, repeat) jobs are shared between the ranks
    (:mod:`parallel`); rank 0 gets the results, the other ranks ``None``.
    """
    variants = cfg.get("variants") or {"": {}}
    records, rows = [], []
    for variant, override in variants.items():
        vcfg = merged({k: v for k, v in cfg.items() if k != "variants"}, override)
        vout = out / variant if variant else out
        if variant:
            print(f"variant {variant}", flush=True)
        data = make_data(vcfg, vcfg["seed"])
        jobs = [(opt_name, repeat) for repeat in range(vcfg["repeats"]) for opt_name in vcfg["optimizers"]]
        vrecords = run_jobs(jobs, lambda opt_name, repeat: run_repeat(vcfg, opt_name, repeat, data, vout))
        if vrecords is None:
            continue
        vrecords = [dict(r, variant=variant) for r in vrecords]
        records += vrecords
        rows += [dict(row, variant=variant) for step in vcfg["eval_steps"] for row in table(vrecords, vcfg, step)]
    return (records, rows) if records else None


def write_table(rows: list[dict], cfg: dict, title: str, out: Path) -> str:
    """``table.csv`` and ``table.md`` in the paper's layout; returns the Markdown."""
    write_csv(out / "table.csv", rows)
    lines = [f"# {title}: R_med per layer, mean (std) over {cfg['repeats']} repeats"]
    groups = dict.fromkeys((r["variant"], r["other"]) for r in rows)
    for variant, other in groups:
        ref = rows[0]["reference"]
        lines += ["", f"## {variant}"] if variant else []
        lines += ["", f"| step | layer | R_med {ref} | R_med {other} | {ref}/{other} |", "|---|---|---|---|---|"]
        for r in (r for r in rows if r["other"] == other and r["variant"] == variant):
            lines.append(f"| {r['step']} | {r['layer']} | {r['reference_mean']:.2f} ({r['reference_std']:.2f}) | "
                         f"{r['other_mean']:.2f} ({r['other_std']:.2f}) | {r['ratio_mean']:.2f} ({r['ratio_std']:.2f}) |")
    lines += ["", "## Summary: layers with ratio > 1 (> 1 by more than one std), median ratio [range]", ""]
    for g in summary(rows):
        lines.append(f"- {g['variant'] + ', ' if g['variant'] else ''}step {g['step']}, {g['reference']}/{g['other']}: "
                     f"{g['above_1']}/{g['layers']} ({g['clearly_above_1']}), median {g['median_ratio']:.2f} "
                     f"[{g['min_ratio']:.2f}, {g['max_ratio']:.2f}]")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", help="config name in experiments/configs/ (e.g. table2b)")
    parser.add_argument("--preset", choices=["quick", "paper"], default="quick")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=None, help="config file (default: experiments/configs/NAME.json)")
    args = parser.parse_args()
    config_path = args.config or HERE / "configs" / f"{args.experiment}.json"
    cfg = json.loads(config_path.read_text())[args.preset]
    out = args.out or Path("runs") / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    origin = provenance()  # taken at the start: the code that ran
    started = time.perf_counter()
    finished = run_all(cfg, out)
    if finished is None:  # torchrun: rank 0 writes the tables
        return
    records, rows = finished
    meta = {"experiment": args.experiment, "preset": args.preset, "config": cfg, **origin,
            "seconds": time.perf_counter() - started}  # this invocation (finished jobs of a resumed run are not redone)
    write_json(out / "results.json", {"meta": meta, "summary": summary(rows), "table": rows, "runs": records}, indent=1)
    plot_losses(records, out / "losses.png", f"{args.experiment} ({args.preset}): training loss")
    plot_rmed(rows, out / "rmed.png", f"{args.experiment} ({args.preset}): R_med per layer")
    plot_rmed_over_time(rows, out / "rmed_over_time.png", f"{args.experiment} ({args.preset})")
    print(write_table(rows, cfg, f"{args.experiment} ({args.preset})", out))


if __name__ == "__main__":
    main()
