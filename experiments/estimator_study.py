"""Estimator study: relative error of Hessian-diagonal estimators against the exact diagonal vs cost.

A small transformer-encoder classifier on synthetic data (the label is the most
frequent token class of the sequence), measured at initialisation and after Adam
training on the same batch the Hessian is taken on. For every layer (attention
in-projection, out-projection, both feed-forward weights, the head) the exact diagonal
comes from ``fasthess.diag(method="exact")``; each estimator runs at several budgets
and seeds:

* ``hutchinson`` — plain, Rademacher probes; cost = HVPs;
* ``diagpp`` / ``xdiag`` — deflation of the joint Hessian of the selected layers,
  same budget of HVPs;
* ``ggn_cv`` — Hutchinson on H − G plus the exact GGN diagonal; cost = HVPs +
  GGN-vector products + the exact-GGN VJPs (each counted as one product: this
  overstates the cost of a VJP, about half an HVP);
* ``ggn`` / ``ggn_mc`` — NOT the Hessian: their "error" is mostly the bias G − H,
  shown to say how far the cheaper PSD surrogate is from the Hessian.

Per row: the relative error ``‖d̂ − d‖₂ / ‖d‖₂`` of a layer (median over seeds), the
gain over plain Hutchinson at the same nominal budget, and the relative error of R_med
(``R_med(d̂) / R_med(d) − 1``, median over seeds: the bias noise puts on the statistic).

Run:  python experiments/estimator_study.py [--quick] [--out DIR]
Writes estimator_study.{json,csv,md,png} to runs/estimator_study[-quick]/ (default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fasthess  # noqa: E402
from provenance import provenance, write_csv  # noqa: E402

ESTIMATORS = ["hutchinson", "diagpp", "xdiag", "ggn_cv", "ggn", "ggn_mc"]


class Classifier(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.embed = nn.Embedding(c["vocab"], c["d_model"])
        self.pos = nn.Parameter(torch.randn(c["seq_len"], c["d_model"]) * 0.1)
        layer = nn.TransformerEncoderLayer(c["d_model"], c["heads"], c["ff"], dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, c["layers"], enable_nested_tensor=False)
        self.head = nn.Linear(c["d_model"], c["classes"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids) + self.pos).mean(1))


def make_data(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(c["seed"])
    ids = torch.randint(0, c["vocab"], (c["batch"], c["seq_len"]), generator=g)
    counts = F.one_hot(ids % c["classes"], c["classes"]).sum(1).double()
    y = (counts + 0.01 * torch.rand(counts.shape, generator=g, dtype=torch.float64)).argmax(1)  # ties broken randomly
    return ids, y


def layers_of(model: nn.Module) -> list[str]:
    return [
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.out_proj.weight",
        "encoder.layers.0.linear1.weight",
        "encoder.layers.0.linear2.weight",
        "head.weight",
    ]


def run_estimator(name: str, model, split, layers, budget: int, seed: int) -> tuple[fasthess.DiagResult, int]:
    """The estimate and its cost in products (see the module docstring)."""
    if name == "ggn":
        res = fasthess.diag(model, split, layers, method="ggn")
    elif name == "ggn_mc":
        res = fasthess.diag(model, split, layers, method="ggn_mc", num_probes=budget, seed=seed)
    else:
        reduction = {"hutchinson": None, "ggn_cv": "ggn"}.get(name, name)
        res = fasthess.diag(model, split, layers, method="hutchinson", num_probes=budget, seed=seed,
                            variance_reduction=reduction)
    m = res.meta
    return res, m.get("hvps", 0) + m.get("ggn_products", 0) + m.get("vjps", 0)


def measure(state: str, model, split, layers, cfg: dict) -> list[dict]:
    exact = fasthess.diag(model, split, layers, method="exact")
    rows = []
    for est in ESTIMATORS:
        for budget in cfg["budgets"] if est != "ggn" else cfg["budgets"][:1]:
            per_layer: dict[str, list[tuple[float, float]]] = {n: [] for n in layers}
            costs, seconds = [], []
            for seed in range(cfg["repeats"] if est != "ggn" else 1):
                start = time.perf_counter()
                res, cost = run_estimator(est, model, split, layers, budget, seed)
                seconds.append(time.perf_counter() - start)
                costs.append(cost)
                for n in layers:
                    d, want = res[n].values, exact[n].values
                    rel = float((d - want).norm() / want.norm())
                    rmed_err = fasthess.stats.r_med(d) / fasthess.stats.r_med(want) - 1
                    per_layer[n].append((rel, rmed_err))
            for n in layers:
                rows.append({
                    "state": state, "layer": n, "estimator": est, "budget": budget,
                    "cost_products": statistics.median(costs),
                    "rel_error": statistics.median(r for r, _ in per_layer[n]),
                    "rmed_rel_error": statistics.median(e for _, e in per_layer[n]),
                    "exact_rmed": fasthess.stats.r_med(exact[n].values),
                    "seconds": statistics.median(seconds),
                })
            print(f"[{state}] {est:<10} budget {budget:>4}: cost {statistics.median(costs):>6.0f}, "
                  f"rel.err (mean over layers) {statistics.mean(r['rel_error'] for r in rows[-len(layers):]):.3f}",
                  flush=True)
    base = {(r["state"], r["layer"], r["budget"]): r["rel_error"] for r in rows if r["estimator"] == "hutchinson"}
    for r in rows:  # the GGN rows estimate another matrix: no "gain"
        b = base.get((r["state"], r["layer"], r["budget"])) if r["estimator"] not in ("ggn", "ggn_mc") else None
        r["gain_vs_hutchinson"] = b / r["rel_error"] if b is not None and r["rel_error"] > 0 else None
    return rows


def train(model: nn.Module, ids, y, cfg: dict) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    losses = []
    for _ in range(cfg["train_steps"]):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def write_outputs(rows: list[dict], record: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimator_study.json").write_text(json.dumps({**record, "rows": rows}, indent=1))
    write_csv(out / "estimator_study.csv", rows)
    lines = ["| state | layer | estimator | budget | cost | rel. error | gain vs Hutchinson | R_med rel. error |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        gain = "" if r["gain_vs_hutchinson"] is None else f"{r['gain_vs_hutchinson']:.2f}×"
        lines.append(f"| {r['state']} | {r['layer']} | {r['estimator']} | {r['budget']} | {r['cost_products']:.0f} | "
                     f"{r['rel_error']:.3f} | {gain} | {r['rmed_rel_error']:+.2f} |")
    (out / "estimator_study.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return
    states = sorted({r["state"] for r in rows}, key=["init", "trained"].index)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(len(states), len(layers), figsize=(3.2 * len(layers), 3.0 * len(states)), squeeze=False)
    for i, s in enumerate(states):
        for j, n in enumerate(layers):
            ax = axes[i][j]
            for est in ESTIMATORS:
                pts = sorted((r["cost_products"], r["rel_error"]) for r in rows
                             if r["state"] == s and r["layer"] == n and r["estimator"] == est)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ls="--" if est.startswith("ggn") and est != "ggn_cv" else "-",
                            label=est + (" (not H)" if est in ("ggn", "ggn_mc") else ""))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{s}: {n.replace('encoder.layers.0.', '')}", fontsize=8)
            ax.set_xlabel("products (HVP, GGN-vector, VJP)", fontsize=7)
            if j == 0:
                ax.set_ylabel("‖d̂ − d‖ / ‖d‖ (median)", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "estimator_study.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, two budgets (for tests)")
    ap.add_argument("--config", default=str(HERE / "configs" / "estimator_study.json"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--rewrite", metavar="JSON", help="only rewrite table and plot from a previous run's JSON")
    args = ap.parse_args(argv)
    if args.rewrite:
        record = json.loads(Path(args.rewrite).read_text())
        rows = record.pop("rows")
        for r in rows:
            if r["estimator"] in ("ggn", "ggn_mc"):
                r["gain_vs_hutchinson"] = None
        write_outputs(rows, record, Path(args.out or Path(args.rewrite).parent))
        return 0
    preset = "quick" if args.quick else "full"
    cfg = json.loads(Path(args.config).read_text())[preset]
    out = Path(args.out or f"runs/estimator_study{'-quick' if args.quick else ''}")
    torch.manual_seed(cfg["seed"])
    model = Classifier(cfg).double()
    ids, y = make_data(cfg)
    split = fasthess.OutputsAndLoss(lambda: model(ids), lambda o: F.cross_entropy(o, y))
    layers = layers_of(model)
    start = time.perf_counter()
    model.eval()
    rows = measure("init", model, split, layers, cfg)
    model.train()
    losses = train(model, ids, y, cfg)
    model.eval()
    print(f"trained {cfg['train_steps']} Adam steps: loss {losses[0]:.3f} -> {losses[-1]:.4f}", flush=True)
    rows += measure("trained", model, split, layers, cfg)
    record = {"config": cfg, "preset": preset, "losses": [losses[0], losses[-1]],
              "seconds": time.perf_counter() - start, **provenance()}
    write_outputs(rows, record, out)
    print(f"wrote {out}/estimator_study.{{json,csv,md,png}} in {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
