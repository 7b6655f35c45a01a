"""Adam and SGD+M compared at equal training loss (Table 7) and SGD+M restarted from each (Figure 1(a)).

Trains the config's two optimizers (``equal_loss.reference``, SGD+M, and
``equal_loss.other``, Adam) with weight snapshots every few steps (the
``compare_optimizers`` machinery: same initialisation, resumable). The loss of each
snapshot on the fixed Hessian batch (eval mode) picks, for every Adam step t of
``equal_loss.other_steps``, the SGD+M snapshot t′ whose loss is closest; then

* Table 7: R_med of Adam at t and of SGD+M at t′ per layer, mean (std) over repeats,
  and their ratio — if Adam's geometry were only "further along the same road",
  the ratio would be about 1 at equal loss;
* Figure 1(a): SGD+M (``restart``) run from Adam's iterate t and from SGD+M's
  iterate t′ of the first pair, on the same mini-batches: the paper finds the run
  from Adam's iterate reaches lower loss.

Every Hessian and restart is stored as it finishes (atomically), so a killed run resumes
and ends with the results of an uninterrupted one.

Run:
    python experiments/equal_loss.py table7 --preset quick --out runs/table7
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import fasthess

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoint import load, read_json, write_json  # noqa: E402
from compare_optimizers import hessian_layers, make_data, run_all, run_fingerprint, set_learning_rate  # noqa: E402
from optimizers import make_optimizer  # noqa: E402
from plots import pyplot  # noqa: E402
from provenance import provenance, write_csv  # noqa: E402
from seeding import seed_step  # noqa: E402
from tasks import get_task  # noqa: E402


def cached(path: Path, compute) -> dict:  # noqa: ANN001
    """The JSON at ``path``, computing and writing it first if it is missing (resumable steps)."""
    if path.exists():
        return read_json(path)
    value = compute()
    write_json(path, value)
    return value


class Snapshots:
    """Models at the snapshots of one run folder, with their loss on the Hessian batch."""

    def __init__(self, cfg: dict, data: dict, out: Path) -> None:
        self.cfg, self.data, self.out, self.task = cfg, data, out, get_task(cfg)
        n_h, mb = cfg["data"]["hessian_examples"], cfg["data"]["hessian_micro_batch"]
        self.batches = [{k: v[s : s + mb] for k, v in data.items()} for s in range(0, n_h, mb)]

    def model(self, optimizer: str, repeat: int, step: int) -> torch.nn.Module:
        torch.manual_seed(self.cfg["seed"])
        model = self.task.build(self.cfg, self.data)
        path = self.out / "snapshots" / f"{optimizer}-r{repeat}-s{step}.pt"
        record = self.out / "runs" / f"{optimizer}-r{repeat}.json"
        fix = f"delete it and {record} (that repeat trains again), or pass a new --out folder"
        model.load_state_dict(load(path, run_fingerprint(self.cfg, optimizer), fix)["model"])
        return model.eval()

    def hessian_loss(self, model: torch.nn.Module) -> list:
        return [lambda b=b: self.task.loss(model, b) for b in self.batches]

    def loss(self, optimizer: str, repeat: int, step: int) -> float:
        model = self.model(optimizer, repeat, step)
        with torch.no_grad():
            return sum(float(f()) for f in self.hessian_loss(model)) / len(self.batches)

    def r_med(self, optimizer: str, repeat: int, step: int) -> dict[str, float]:
        model = self.model(optimizer, repeat, step)
        res = fasthess.diag(model, self.hessian_loss(model), hessian_layers(self.cfg),
                            num_samples=self.cfg["num_samples"], seed=self.cfg["seed"])
        return res.r_med(stabilized=True)


def match(other_loss: float, reference_losses: dict[int, float]) -> int | None:
    """The reference step whose loss is closest to ``other_loss``; None if the reference never got that low."""
    if other_loss < min(reference_losses.values()) - 0.02 * abs(other_loss):
        return None
    return min(reference_losses, key=lambda s: abs(reference_losses[s] - other_loss))


def restart(cfg: dict, snaps: Snapshots, optimizer: str, repeat: int, step: int) -> list[float]:
    """Training losses of ``cfg["restart"]`` run from a snapshot (mini-batches fixed by the seed)."""
    model = snaps.model(optimizer, repeat, step)
    spec, steps = cfg["restart"]["spec"], cfg["restart"]["steps"]
    opt = make_optimizer(spec, model.parameters())
    n, batch = len(next(iter(snaps.data.values()))), cfg["data"]["batch"]
    losses = []
    for i in range(steps):
        model.train()
        g = seed_step(cfg["seed"], "restart", i)
        idx = torch.randint(0, n, (batch,), generator=g)
        set_learning_rate(opt, dict(cfg, steps=steps), i)
        opt.zero_grad()
        loss = snaps.task.loss(model, {k: v[idx] for k, v in snaps.data.items()})
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default="table7")
    parser.add_argument("--preset", choices=["quick", "paper"], default="quick")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=None)
    args = parser.parse_args()
    cfg = json.loads((args.config or HERE / "configs" / f"{args.experiment}.json").read_text())[args.preset]
    out = args.out or Path("runs") / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    origin = provenance()
    eq = cfg["equal_loss"]
    reference, other = eq["reference"], eq["other"]
    snap_steps = cfg["snapshot_steps"]
    finished = run_all(cfg, out)
    if finished is None:  # torchrun: rank 0 goes on alone
        return
    records = finished[0]
    snaps = Snapshots(cfg, make_data(cfg, cfg["seed"]), out)

    pairs = []
    for repeat in range(cfg["repeats"]):
        losses = cached(out / "equal_loss" / f"losses-r{repeat}.json", lambda r=repeat: {
            name: {str(s): snaps.loss(name, r, s) for s in snap_steps} for name in (reference, other)})
        ref_losses = {int(s): v for s, v in losses[reference].items()}
        for t in eq["other_steps"]:
            t_ref = match(losses[other][str(t)], ref_losses)
            pair = {"repeat": repeat, "other_step": t, "other_loss": losses[other][str(t)], "reference_step": t_ref,
                    "reference_loss": ref_losses.get(t_ref)}
            if t_ref is None:
                print(f"  r{repeat}: {reference} never reached {other}'s loss at step {t}; pair skipped")
            else:
                pair["other_r_med"] = cached(out / "equal_loss" / f"{other}-r{repeat}-s{t}.json",
                                             lambda r=repeat, s=t: snaps.r_med(other, r, s))
                pair["reference_r_med"] = cached(out / "equal_loss" / f"{reference}-r{repeat}-s{t_ref}.json",
                                                 lambda r=repeat, s=t_ref: snaps.r_med(reference, r, s))
                print(f"  r{repeat}: {other} step {t} (loss {pair['other_loss']:.3f}) ~ {reference} step {t_ref} "
                      f"(loss {pair['reference_loss']:.3f})", flush=True)
            pairs.append(pair)

    rows = []
    for t in eq["other_steps"]:
        done = [p for p in pairs if p["other_step"] == t and p["reference_step"] is not None]
        if not done:
            continue
        for layer in done[0]["other_r_med"]:
            a = torch.tensor([p["reference_r_med"][layer] for p in done], dtype=torch.float64)
            b = torch.tensor([p["other_r_med"][layer] for p in done], dtype=torch.float64)
            std = lambda x: float(x.std()) if x.numel() > 1 else 0.0  # noqa: E731
            rows.append({"other_step": t, "reference_steps": [p["reference_step"] for p in done], "layer": layer,
                         "reference_mean": float(a.mean()), "reference_std": std(a), "other_mean": float(b.mean()),
                         "other_std": std(b), "ratio_mean": float((a / b).mean()), "ratio_std": std(a / b)})

    first = next((p for p in pairs if p["reference_step"] is not None), None)
    restarts = None
    if first is not None and cfg.get("restart"):
        r = first["repeat"]
        restarts = cached(out / "equal_loss" / "restarts.json", lambda: {
            "from": {"other": [other, first["other_step"]], "reference": [reference, first["reference_step"]]},
            "other": restart(cfg, snaps, other, r, first["other_step"]),
            "reference": restart(cfg, snaps, reference, r, first["reference_step"])})
        plot_restarts(restarts, cfg, out / "figure1a.png")

    meta = {"experiment": args.experiment, "preset": args.preset, "config": cfg, **origin}
    write_json(out / "equal_loss.json", {"meta": meta, "pairs": pairs, "table": rows, "restarts": restarts,
                                         "runs": records}, indent=1)
    lines = [f"# {args.experiment} ({args.preset}): R_med at equal loss, {other} at step t vs {reference} at t′"]
    if rows:
        write_csv(out / "table.csv", rows)
        lines += ["", f"| t | t′ | layer | R_med {reference}(t′) | R_med {other}(t) | ratio |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['other_step']} | {','.join(map(str, r['reference_steps']))} | {r['layer']} | "
                  f"{r['reference_mean']:.2f} ({r['reference_std']:.2f}) | {r['other_mean']:.2f} ({r['other_std']:.2f}) | "
                  f"{r['ratio_mean']:.2f} ({r['ratio_std']:.2f}) |" for r in rows]
    if restarts:
        tail = lambda xs: sum(xs[-20:]) / len(xs[-20:])  # noqa: E731
        lines += ["", f"Figure 1(a): {cfg['restart']['spec']['type']} restarted for {cfg['restart']['steps']} steps — "
                  f"final loss (mean of last 20) from {other}'s iterate {tail(restarts['other']):.4f}, "
                  f"from {reference}'s {tail(restarts['reference']):.4f}"]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_restarts(restarts: dict, cfg: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    from plots import smooth

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("other", "reference"):
        name, step = restarts["from"][key]
        ax.plot(smooth(restarts[key], 10), label=f"SGD+M from the {name} iterate (step {step})")
    ax.set(xlabel="iteration after restart", ylabel="training loss (moving average of 10)",
           title="Figure 1(a): SGD+M from iterates of equal loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
