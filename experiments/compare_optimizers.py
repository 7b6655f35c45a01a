"""Compare optimizers by R_med per layer, in the layout of the paper's tables.

One config entry (``experiments/configs/<name>.json``, presets ``quick`` and
``paper``) names a model, data, optimizers and schedule. Every optimizer starts
each repeat from the same initialisation (repeats differ in their mini-batch
order); at the configured steps ``fasthess.diag`` measures exact H_ii at 200
sampled coordinates of every linear/attention weight on a fixed Hessian batch
(micro-batched). The table gives, per layer, the mean (std) over repeats of R_med
for the first optimizer of the config (the reference, SGD+M in the paper) and each
other one, and of their ratio, as in Tables 2 and 6 of the paper.

Configs: ``table2a`` (seq2seq Transformer, German→English; offline the
``trans-de-en`` stand-in, see ``data.py``), ``table2b`` (the same model with random
integer targets), ``table6`` (RMSprop and AMSGrad against SGD+M on translation) and
``table9`` (Table 2(a) with weight decay 0.001 for both). Runs are resumable: model and optimizer
state are checkpointed every ``checkpoint_every`` steps and every finished
Hessian evaluation is kept, so a killed run continues where it stopped.

Run:
    python experiments/compare_optimizers.py table2b --preset quick --out runs/table2b
    torchrun --nproc_per_node=2 experiments/compare_optimizers.py table2b --out runs/table2b  # repeats shared
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fasthess

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import BOS, PAD, build_vocab, encode, load_translation_pairs  # noqa: E402
from optimizers import make_optimizer  # noqa: E402
from parallel import run_jobs  # noqa: E402
from provenance import provenance  # noqa: E402


class Seq2Seq(nn.Module):
    """The translation tutorial's model: embeddings + positional encoding, nn.Transformer, a vocabulary head."""

    def __init__(self, vocab: int, d_model: int, heads: int, enc_layers: int, dec_layers: int, ff: int,
                 max_len: int) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(vocab, d_model)
        self.tgt_embed = nn.Embedding(vocab, d_model)
        pos = torch.arange(max_len)[:, None] * torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos), torch.cos(pos)
        self.register_buffer("pe", pe)
        self.scale = math.sqrt(d_model)
        self.transformer = nn.Transformer(d_model, heads, enc_layers, dec_layers, ff, dropout=0.1, batch_first=True)
        self.generator = nn.Linear(d_model, vocab)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        n = tgt_in.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=tgt_in.device).triu(1)  # bool, like the padding masks
        s = self.src_embed(src) * self.scale + self.pe[: src.shape[1]]
        t = self.tgt_embed(tgt_in) * self.scale + self.pe[: tgt_in.shape[1]]
        h = self.transformer(s, t, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src == PAD,
                             tgt_key_padding_mask=tgt_in == PAD, memory_key_padding_mask=src == PAD)
        return self.generator(h)


def make_data(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Token ids ``src``/``tgt`` of ``train_examples`` pairs: translation pairs or random integer targets."""
    g = torch.Generator().manual_seed(seed)
    m, d = cfg["model"], cfg["data"]
    n = d["train_examples"]
    if d.get("kind", "random_targets") == "random_targets":  # no padding: every token is a target
        return {
            "src": torch.randint(4, m["vocab"], (n, d["src_len"]), generator=g),
            "tgt": torch.randint(4, m["vocab"], (n, d["tgt_len"]), generator=g),
        }
    pairs = load_translation_pairs(d["source"], d.get("path"))
    order = torch.randperm(len(pairs), generator=g)[:n].tolist()
    de, en = [pairs[i][0] for i in order], [pairs[i][1] for i in order]
    if len(de) < n:
        raise ValueError(f"{d['source']} has {len(de)} pairs; the config asks for train_examples={n}")
    return {"src": encode(de, build_vocab(de, m["vocab"]), d["src_len"]),
            "tgt": encode(en, build_vocab(en, m["vocab"]), d["tgt_len"])}


def seq2seq_loss(model: nn.Module, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy over the target tokens (padding ignored)."""
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], 1)
    logits = model(src, tgt_in)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=PAD)


def run_repeat(cfg: dict, opt_name: str, repeat: int, data: dict, out: Path) -> dict:
    """Train one optimizer for one repeat (resuming from its checkpoint) and measure the Hessians."""
    record_path = out / "runs" / f"{opt_name}-r{repeat}.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    ckpt_path = out / "checkpoints" / f"{opt_name}-r{repeat}.pt"
    torch.manual_seed(cfg["seed"])  # the same initialisation for every optimizer and repeat
    m = cfg["model"]
    model = Seq2Seq(m["vocab"], m["d_model"], m["heads"], m["enc_layers"], m["dec_layers"], m["ff"],
                    max(cfg["data"]["src_len"], cfg["data"]["tgt_len"]))
    opt = make_optimizer(cfg["optimizers"][opt_name], model.parameters())
    state = {"step": 0, "losses": [], "hessians": {}}
    if ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
    n_h = cfg["data"]["hessian_examples"]
    mb = cfg["data"]["hessian_micro_batch"]
    hess_loss = [lambda s=s: seq2seq_loss(model, data["src"][s : s + mb], data["tgt"][s : s + mb]) for s in range(0, n_h, mb)]
    batch = cfg["data"]["batch"]
    start = time.perf_counter()
    while True:
        step = state["step"]
        if step in cfg["eval_steps"] and str(step) not in state["hessians"]:
            model.eval()
            res = fasthess.diag(model, hess_loss, num_samples=cfg["num_samples"], seed=cfg["seed"])
            state["hessians"][str(step)] = {"r_med": res.r_med(stabilized=True), "loss": res.meta["loss"]}
            print(f"  {opt_name} r{repeat} step {step}: Hessian in {res.meta['seconds']:.1f} s", flush=True)
        if step >= cfg["steps"]:
            break
        model.train()
        g = torch.Generator().manual_seed(hash((cfg["seed"], repeat, step)) % 2**62)  # order fixed per (repeat, step)
        idx = torch.randint(0, data["src"].shape[0], (batch,), generator=g)
        torch.manual_seed(hash((cfg["seed"], repeat, step, 1)) % 2**62)  # dropout masks too
        opt.zero_grad()
        loss = seq2seq_loss(model, data["src"][idx], data["tgt"][idx])
        loss.backward()
        opt.step()
        state["losses"].append(float(loss.detach()))
        state["step"] = step + 1
        if state["step"] % cfg["checkpoint_every"] == 0:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, ckpt_path)
        if state["step"] % max(1, cfg["steps"] // 5) == 0:
            recent = state["losses"][-20:]
            print(f"  {opt_name} r{repeat} step {state['step']}/{cfg['steps']}  loss {sum(recent) / len(recent):.4f}", flush=True)
    record = {"optimizer": opt_name, "repeat": repeat, "losses": state["losses"], "hessians": state["hessians"],
              "seconds": time.perf_counter() - start}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record))
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
    data = make_data(cfg, cfg["seed"])
    jobs = [(opt_name, repeat) for repeat in range(cfg["repeats"]) for opt_name in cfg["optimizers"]]
    records = run_jobs(jobs, lambda opt_name, repeat: run_repeat(cfg, opt_name, repeat, data, out))
    if records is None:  # torchrun: rank 0 writes the tables
        return
    rows = [row for step in cfg["eval_steps"] for row in table(records, cfg, step)]
    meta = {"experiment": args.experiment, "preset": args.preset, "config": cfg, **origin}
    (out / "results.json").write_text(json.dumps({"meta": meta, "table": rows, "runs": records}, indent=1))
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {args.experiment} ({args.preset}): R_med per layer, mean (std) over {cfg['repeats']} repeats"]
    for other in list(cfg["optimizers"])[1:]:
        ref = rows[0]["reference"]
        lines += ["", f"| step | layer | R_med {ref} | R_med {other} | {ref}/{other} |", "|---|---|---|---|---|"]
        for r in (r for r in rows if r["other"] == other):
            lines.append(f"| {r['step']} | {r['layer']} | {r['reference_mean']:.2f} ({r['reference_std']:.2f}) | "
                         f"{r['other_mean']:.2f} ({r['other_std']:.2f}) | {r['ratio_mean']:.2f} ({r['ratio_std']:.2f}) |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
