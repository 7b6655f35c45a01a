"""Section 6 / A.5: low-rank structure of weight matrices and uniformity of their leading singular vectors.

At every checkpoint of ``train_checkpoints.py``, for every linear/attention weight
``W`` (``out × in``, as ``fasthess.default_parameters`` lists them) and for the
learned part ``ΔW = W − W(0)``:

* singular values; ``energy_1 = σ₁² / Σσ²`` (1 for rank one); stable rank
  ``Σσ² / σ₁²``; effective rank ``exp(entropy(σ / Σσ))``;
* ``R_u = max_i u_i² / median_i u_i²`` and ``R_v`` likewise, for the leading left
  (output side) and right (input side) singular vectors ``u``, ``v``: the paper's
  uniformity of the leading singular vector (its formula did not survive
  extraction; this is the R_med statistic applied to ``u_i²``, which is what
  Section 6 compares — the distribution of ``u_1², …, u_d²``).

A matrix counts as approximately low rank when ``energy_1 ≥ low_rank_energy``
(config). The paper (translation, Adam vs SGD+M): about 12 of ~30 layers are
approximately low rank after training with Adam, and for 10 of those 12 Adam's
R_u is smaller than SGD+M's; no such pattern for R_v.

Run:
    python experiments/low_rank.py --preset quick   # writes runs/analysis-quick/low_rank/
"""

from __future__ import annotations

import math

import torch

import fasthess
from provenance import write_csv
from train_checkpoints import load, parse, prepare, pyplot, write_json

NAME = "low_rank"


def spectrum_statistics(w: torch.Tensor) -> dict:
    """Singular values, energy_1, stable and effective rank, and R_u, R_v of a matrix.

    Example:
        >>> s = spectrum_statistics(torch.outer(torch.tensor([1.0, 1.0, 1.0, 2.0]), torch.tensor([3.0, 0.0, 4.0])))
        >>> round(s["energy_1"], 6), round(s["stable_rank"], 6), round(s["r_u"], 6), round(s["r_v"], 6)
        (1.0, 1.0, 4.0, 1.777778)
    """
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    energy = s.square()
    p = s / s.sum()
    p = p[p > 0]
    return {
        "singular_values": s.tolist(),
        "energy_1": float(energy[0] / energy.sum()),
        "stable_rank": float(energy.sum() / energy[0]),
        "effective_rank": float(torch.exp(-(p * p.log()).sum())),
        "r_u": _ratio(u[:, 0].square()),
        "r_v": _ratio(vh[0].square()),
    }


def _ratio(x: torch.Tensor) -> float:
    med = float(x.median())
    return float(x.max()) / med if med > 0 else math.inf


def measure(cfg: dict, paths) -> list[dict]:
    rows = []
    for opt_name, by_step in paths.items():
        init = None
        for step, path in sorted(by_step.items()):
            model, _, _ = load(cfg, path, opt_name)
            weights = {n: p.detach().clone() for n, p in fasthess.default_parameters(model).items()}
            init = init or weights  # checkpoint_steps start at 0: the shared initialisation
            for name, w in weights.items():
                for kind, mat in (("W", w), ("dW", w - init[name])):
                    if step == 0 and kind == "dW":
                        continue
                    rows.append({"optimizer": opt_name, "step": step, "layer": name, "matrix": kind,
                                 "shape": list(mat.shape), **spectrum_statistics(mat)})
    return rows


def compare(rows: list[dict], step: int, energy: float, kind: str = "W") -> dict:
    """At ``step``: which layers are approximately low rank, and where Adam's R_u / R_v is below SGD+M's.

    The optimizers must be named ``adam`` and ``sgdm`` in the config.
    """
    by = {(r["optimizer"], r["layer"]): r for r in rows if r["step"] == step and r["matrix"] == kind}
    layers = sorted({layer for _, layer in by})
    low = [l for l in layers if by[("adam", l)]["energy_1"] >= energy or by[("sgdm", l)]["energy_1"] >= energy]
    smaller = lambda key, ls: [l for l in ls if by[("adam", l)][key] < by[("sgdm", l)][key]]  # noqa: E731
    return {"step": step, "matrix": kind, "layers": len(layers), "low_rank_layers": low,
            "adam_r_u_smaller_all": len(smaller("r_u", layers)), "adam_r_v_smaller_all": len(smaller("r_v", layers)),
            "adam_r_u_smaller_low_rank": len(smaller("r_u", low)), "adam_r_v_smaller_low_rank": len(smaller("r_v", low)),
            "median_energy_1": {o: _median([by[(o, l)]["energy_1"] for l in layers]) for o in ("adam", "sgdm")},
            "median_effective_rank": {o: _median([by[(o, l)]["effective_rank"] for l in layers]) for o in ("adam", "sgdm")}}


def _median(x: list[float]) -> float:
    return float(torch.tensor(x).median())


def plot(rows: list[dict], layers: list[str], path) -> None:
    plt = pyplot()
    if plt is None:
        return
    last = max(r["step"] for r in rows)
    fig, axes = plt.subplots(3, len(layers), figsize=(4 * len(layers), 9), squeeze=False)
    for j, layer in enumerate(layers):
        sel = [r for r in rows if r["layer"] == layer and r["matrix"] == "W"]
        init = next(r for r in sel if r["step"] == 0)
        axes[0, j].semilogy(init["singular_values"], "k:", label="init")
        for opt in dict.fromkeys(r["optimizer"] for r in sel):
            mine = sorted((r for r in sel if r["optimizer"] == opt), key=lambda r: r["step"])
            final = mine[-1]
            line, = axes[0, j].semilogy(final["singular_values"], label=f"{opt} W step {last}")
            dw = next(r for r in rows if r["layer"] == layer and r["matrix"] == "dW" and r["optimizer"] == opt
                      and r["step"] == last)
            axes[0, j].semilogy(dw["singular_values"], "--", color=line.get_color(), label=f"{opt} ΔW")
            steps = [r["step"] for r in mine]
            axes[1, j].semilogy(steps, [r["r_u"] for r in mine], "o-", color=line.get_color(), label=f"{opt} R_u")
            axes[1, j].semilogy(steps, [r["r_v"] for r in mine], "s--", color=line.get_color(), label=f"{opt} R_v")
            axes[2, j].plot(steps, [r["effective_rank"] for r in mine], "o-", color=line.get_color(), label=opt)
        axes[0, j].set_title(layer.replace("transformer.", ""), fontsize=8)
        axes[0, j].set_xlabel("index")
        axes[0, j].set_ylabel("singular value")
        axes[1, j].set_ylabel("R_u, R_v of W")
        axes[2, j].set_ylabel("effective rank of W")
        axes[2, j].set_xlabel("step")
    for i in range(3):
        axes[i, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    cfg, out, meta = parse(__doc__.splitlines()[0], NAME)
    _, paths = prepare(cfg, out)
    rows = measure(cfg, paths)
    spec = cfg["low_rank"]
    summary = [compare(rows, s, spec["low_rank_energy"], kind) for s in cfg["checkpoint_steps"] if s > 0
               for kind in ("W", "dW")]
    write_json(out / NAME / "results.json", {"meta": meta, "summary": summary, "matrices": rows})
    write_csv(out / NAME / "matrices.csv", rows, [k for k in rows[0] if k != "singular_values"])
    layers = spec.get("plot_layers") or list(dict.fromkeys(r["layer"] for r in rows))[:4]
    plot(rows, layers, out / NAME / "low_rank.png")
    print(f"| step | matrix | layers | approx. low rank (energy_1 ≥ {spec['low_rank_energy']}) | Adam R_u < SGD+M R_u "
          "(all / low-rank) | Adam R_v < SGD+M R_v (all / low-rank) | median energy_1 Adam, SGD+M | "
          "median eff. rank Adam, SGD+M |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summary:
        e, r = s["median_energy_1"], s["median_effective_rank"]
        print(f"| {s['step']} | {s['matrix']} | {s['layers']} | {len(s['low_rank_layers'])} | "
              f"{s['adam_r_u_smaller_all']} / {s['adam_r_u_smaller_low_rank']} | "
              f"{s['adam_r_v_smaller_all']} / {s['adam_r_v_smaller_low_rank']} | {e['adam']:.3f}, {e['sgdm']:.3f} | "
              f"{r['adam']:.1f}, {r['sgdm']:.1f} |")


if __name__ == "__main__":
    main()
