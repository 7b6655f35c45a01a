"""Appendix E: does the Hessian become more diagonal during training? Adam vs SGD+M.

At each checkpoint of ``train_checkpoints.py`` and for each configured layer,
``fasthess.rows`` computes ``rows`` sampled rows of the Hessian restricted to that
layer (the same coordinates at every checkpoint and for both optimizers). Per
row ``i`` (n = the layer's size):

* ``r_diag,i = ‖H[i, :]‖₂ / |H_ii|`` — the paper's per-coordinate diagonal
  domination (its formula did not survive extraction; this form is the one for
  which a matrix of equal entries gives Θ(√n), as Appendix E states; it is ≥ 1,
  smaller is more diagonal);
* ``ρ_i = |H_ii| / Σ_j |H_ij|`` — the diagonal's share of the row's ℓ1 mass, in (0, 1];
* whether the diagonal dominates the row: ``|H_ii| ≥ Σ_{j≠i} |H_ij|`` (ρ_i ≥ ½).

The paper (Figure 14, BERT-small) reports the mean and median of r_diag,i
decreasing over training for both optimizers.

Run:
    python experiments/diag_dominance.py --preset quick      # writes runs/analysis-quick/diag_dominance/
"""

from __future__ import annotations

import json
import math
import statistics

import torch

import fasthess
from provenance import write_csv
from seeding import generator
from train_checkpoints import hessian_loss, load, parse, prepare, pyplot, write_json

NAME = "diag_dominance"


def row_statistics(rows: torch.Tensor, indices: torch.Tensor) -> dict[str, list[float]]:
    """Per sampled row: |H_ii|, r_diag (ℓ2 row norm / |H_ii|), ρ (|H_ii| / ℓ1 row mass), diagonal dominance.

    Args:
        rows: ``(k, n)`` Hessian rows; row ``r`` belongs to coordinate ``indices[r]``.
        indices: ``(k,)`` their coordinates.

    Example:
        >>> s = row_statistics(torch.tensor([[2.0, 1.0, 0.0], [3.0, -1.0, 4.0]]), torch.tensor([0, 1]))
        >>> s["dominant"], [round(v, 3) for v in s["rho"]]
        ([True, False], [0.667, 0.125])
    """
    rows = rows.double()
    diag = rows[torch.arange(len(indices)), indices].abs()
    l1 = rows.abs().sum(1)
    return {
        "abs_h_ii": diag.tolist(),
        "r_diag": (rows.norm(dim=1) / diag).tolist(),  # inf where H_ii = 0
        "rho": (diag / l1).tolist(),
        "dominant": (diag >= l1 - diag).tolist(),
    }


def measure(cfg: dict, out, data, paths) -> list[dict]:
    """One record per (optimizer, step): the row statistics of every layer; each kept on disk once done."""
    records = []
    spec = cfg["dominance"]
    for opt_name, by_step in paths.items():
        for step, path in by_step.items():
            rec_path = out / NAME / "records" / f"{opt_name}-step{step}.json"
            if rec_path.exists():
                records.append(json.loads(rec_path.read_text()))
                continue
            model, _, saved = load(cfg, path, opt_name)
            loss = hessian_loss(model, data, cfg)
            layers = {}
            for layer in spec["layers"]:
                n = dict(model.named_parameters())[layer].numel()
                g = generator(cfg["seed"], "dominance", layer)
                idx = torch.randperm(n, generator=g)[: spec["rows"]].sort().values
                h = fasthess.rows(model, loss, layer, idx, engine=spec.get("engine", "auto"))
                layers[layer] = {"n": n, "indices": idx.tolist(), **row_statistics(h, idx)}
            rec = {"optimizer": opt_name, "step": step, "train_loss": _recent(saved["losses"]), "layers": layers}
            rec_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(rec_path, rec)
            print(f"  {NAME}: {opt_name} step {step} done", flush=True)
            records.append(rec)
    return records


def _recent(losses: list[float]) -> float | None:
    return sum(losses[-20:]) / len(losses[-20:]) if losses else None


def summarise(records: list[dict]) -> list[dict]:
    rows = []
    for rec in records:
        for layer, s in rec["layers"].items():
            finite = [v for v in s["r_diag"] if math.isfinite(v)]
            rows.append({
                "optimizer": rec["optimizer"], "step": rec["step"], "layer": layer, "n": s["n"],
                "rows": len(s["rho"]), "zero_diagonal_rows": len(s["r_diag"]) - len(finite),
                "r_diag_mean": statistics.fmean(finite) if finite else math.nan,
                "r_diag_median": statistics.median(finite) if finite else math.nan,
                "sqrt_n": math.sqrt(s["n"]),
                "rho_mean": statistics.fmean(s["rho"]), "rho_median": statistics.median(s["rho"]),
                "dominant_fraction": statistics.fmean(map(float, s["dominant"])),
            })
    return rows


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    if plt is None:
        return
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(2, len(layers), figsize=(4 * len(layers), 6.5), squeeze=False)
    for j, layer in enumerate(layers):
        for opt in dict.fromkeys(r["optimizer"] for r in rows):
            sel = sorted((r for r in rows if r["layer"] == layer and r["optimizer"] == opt), key=lambda r: r["step"])
            steps = [r["step"] for r in sel]
            line, = axes[0, j].plot(steps, [r["r_diag_median"] for r in sel], "o-", label=f"{opt} median")
            axes[0, j].plot(steps, [r["r_diag_mean"] for r in sel], "s--", color=line.get_color(), label=f"{opt} mean")
            axes[1, j].plot(steps, [r["rho_median"] for r in sel], "o-", color=line.get_color(), label=opt)
        axes[0, j].set_title(layer.replace("transformer.", ""), fontsize=8)
        axes[0, j].set_yscale("log")
        axes[0, j].set_ylabel("r_diag = ‖H_i,:‖₂ / |H_ii|")
        axes[1, j].set_ylabel("median |H_ii| / Σ_j |H_ij|")
        axes[1, j].set_xlabel("step")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    cfg, out, meta = parse(__doc__.splitlines()[0], NAME)
    data, paths = prepare(cfg, out)
    rows = summarise(measure(cfg, out, data, paths))
    write_json(out / NAME / "results.json", {"meta": meta, "summary": rows})
    write_csv(out / NAME / "summary.csv", rows)
    plot(rows, out / NAME / "diag_dominance.png")
    print("| optimizer | step | layer | r_diag median (mean) | √n | median ρ | rows with dominant diagonal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['step']} | {r['layer'].replace('transformer.', '')} | {r['r_diag_median']:.1f} "
              f"({r['r_diag_mean']:.1f}) | {r['sqrt_n']:.0f} | {r['rho_median']:.3f} | {r['dominant_fraction']:.2f} |")


if __name__ == "__main__":
    main()
