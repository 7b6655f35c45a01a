"""Section 3.1: smoothness l and condition number κ of one layer's Hessian at initialisation, by init gain.

The paper initialised the tutorial's Transformer with PyTorch's default scheme but
a large gain (e.g. ``xavier_uniform_(gain=800)``) and reports, for the loss
Hessian of one layer, ``l ≥ 1e7`` and ``κ ≥ 1e10``, against which black-box
convergence bounds are vacuous. Here every weight matrix (``dim > 1``) of a small
seq2seq Transformer is drawn with ``xavier_uniform_(gain)`` for each configured
gain, ``fasthess.block`` gives the dense float64 Hessian block of each configured
layer on a fixed random-target batch (eval mode), and ``torch.linalg.eigvalsh``
its eigenvalues λ.

Definitions (the block is symmetric but indefinite):

* ``l = max |λ|`` — the smoothness constant of the loss restricted to the layer, at this point;
* ``κ = max |λ| / min |λ|`` — the 2-norm condition number ``σ_max / σ_min`` of the
  symmetric block (its singular values are the ``|λ|``); with eigenvalues of both
  signs it still measures how far apart the scales are, not convexity;
* ``asymmetry = max|H − Hᵀ| / max|H|``: round-off of the HVPs; near 1 the block is
  numerical noise (the curvature has vanished below float64 resolution of the loss)
  and its spectrum means nothing (eigenvalues are taken of ``(H + Hᵀ) / 2``);
* ``floor = n · ε₆₄ · l``: eigenvalues below it are not resolved from 0 by float64
  eigvalsh. If any ``|λ|`` lies below the floor, κ is reported as a lower bound
  ``≥ l / floor = 1 / (n ε₆₄)`` (the block is numerically singular), together with
  how many eigenvalues are unresolved, and ``κ_resolved = max|λ| / min{|λ| ≥ floor}``.

Run:
    python experiments/smoothness_init.py --preset quick     # writes runs/smoothness-quick/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fasthess

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare_optimizers import Seq2Seq, make_data, seq2seq_loss  # noqa: E402
from provenance import provenance, write_csv  # noqa: E402
from train_checkpoints import pyplot, write_json  # noqa: E402


def init_with_gain(model: nn.Module, gain: float, seed: int) -> nn.Module:
    """Redraw every weight matrix (``dim > 1``, embeddings included) with ``xavier_uniform_(gain)``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p, gain=gain)
    return model


def spectrum(h: torch.Tensor) -> dict:
    """l, κ and the round-off floor of a symmetric block (see the module docstring).

    Example:
        >>> s = spectrum(torch.diag(torch.tensor([-4.0, 1e-3, 2.0], dtype=torch.float64)))
        >>> s["l"], s["kappa"], s["negative"], s["unresolved"]
        (4.0, 4000.0, 1, 0)
    """
    lam = torch.linalg.eigvalsh(h.double())
    mag = lam.abs()
    l = float(mag.max())
    floor = h.shape[0] * torch.finfo(torch.float64).eps * l
    resolved = mag[mag >= floor]
    unresolved = int((mag < floor).sum())
    return {
        "n": h.shape[0], "l": l, "lambda_max": float(lam.max()), "lambda_min": float(lam.min()),
        "min_abs": float(mag.min()), "floor": floor, "unresolved": unresolved,
        "kappa": l / float(mag.min()) if unresolved == 0 else None,
        "kappa_lower_bound": l / floor if unresolved else None,
        "kappa_resolved": l / float(resolved.min()),
        "negative": int((lam < -floor).sum()), "eigenvalues": lam.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["quick", "paper"], default="quick")
    parser.add_argument("--config", type=Path, default=HERE / "configs" / "smoothness.json")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = json.loads(args.config.read_text())[args.preset]
    out = args.out or Path("runs") / f"smoothness-{args.preset}"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "config": cfg, **provenance()}
    data = make_data(cfg, cfg["seed"])  # random integer targets: no files needed
    m, d = cfg["model"], cfg["data"]
    model = Seq2Seq(m["vocab"], m["d_model"], m["heads"], m["enc_layers"], m["dec_layers"], m["ff"],
                    max(d["src_len"], d["tgt_len"])).eval()
    mb, n = d["hessian_micro_batch"], d["hessian_examples"]
    loss = [lambda s=s: seq2seq_loss(model, data["src"][s : s + mb], data["tgt"][s : s + mb]) for s in range(0, n, mb)]
    rows = []
    for gain in cfg["gains"]:
        init_with_gain(model, gain, cfg["seed"])
        for layer in cfg["layers"]:
            path = out / "records" / f"gain{gain}-{layer}.json"
            if path.exists():  # resumable: each finished block is kept
                rows.append(json.loads(path.read_text()))
                continue
            start = time.perf_counter()
            h = fasthess.block(model, loss, layer, dtype=torch.float64, max_size=cfg["max_size"],
                               engine=cfg.get("engine", "auto"), chunk_size=cfg.get("chunk_size"))
            with torch.no_grad():
                value = float(sum(c().double() for c in loss) / len(loss))
            row = {"gain": gain, "layer": layer, "loss": value, "seconds": time.perf_counter() - start,
                   "asymmetry": float((h - h.T).abs().max() / h.abs().max()), **spectrum((h + h.T) / 2)}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, row)
            rows.append(row)
            print(f"  gain {gain} {layer}: l {row['l']:.3g}, {row['seconds']:.0f} s", flush=True)
    write_json(out / "results.json", {"meta": meta, "results": rows})
    write_csv(out / "spectrum.csv", rows, [k for k in rows[0] if k != "eigenvalues"])
    plot(rows, out / "smoothness.png")
    print("| gain | layer | n | loss | l = max|λ| | λ_min, λ_max | negative | κ = max|λ|/min|λ| | unresolved (< n·ε·l) | "
          "κ over resolved | asymmetry |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kappa = f"{r['kappa']:.2g}" if r["kappa"] is not None else f"≥ {r['kappa_lower_bound']:.2g}"
        print(f"| {r['gain']} | {r['layer'].replace('transformer.', '')} | {r['n']} | {r['loss']:.3g} | {r['l']:.3g} | "
              f"{r['lambda_min']:.3g}, {r['lambda_max']:.3g} | {r['negative']} | {kappa} | {r['unresolved']} | "
              f"{r['kappa_resolved']:.3g} | {r['asymmetry']:.1g} |")


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    if plt is None:
        return
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for r in (r for r in rows if r["layer"] == layer):
            mags = sorted((abs(v) for v in r["eigenvalues"]), reverse=True)
            ax.semilogy([max(v, 1e-300) for v in mags], label=f"gain {r['gain']}")
            ax.axhline(r["floor"], ls=":", lw=0.7, color=ax.lines[-1].get_color())
        ax.set_title(layer.replace("transformer.", ""), fontsize=8)
        ax.set_xlabel("rank")
        ax.set_ylabel("|eigenvalue| (dotted: n·ε·l)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
