"""Theorem 1 of the paper: R_med of a two-layer linear network under large-batch Adam and SGD+M.

Setting (Section 3 of the paper): inputs x ∈ R^d whitened (E xxᵀ = I), one output,
targets y = A x, model f(x) = w2ᵀ W1 x with W1 ∈ R^{d×d}, w2 ∈ R^d, small Gaussian
initialisation w2_i ~ N(0, d^{-2α}), W1[i,j] ~ N(0, d^{-4α}). In the large-batch
limit the loss is ½‖w2ᵀW1 − A‖² (+ a constant), which is what is trained here.
The theorem: over a wide range of t, R_med,k^Adam(t) = 1 ± o(1) while
R_med,k^SGDM(t) = Ω(log d), for k = 1 (W1) and 2 (w2).

For every d of the config and both optimizers (same initialisation and targets
per d) the driver trains with full-batch steps and measures exact Hessian
diagonals at 200 sampled coordinates of W1 and of w2 with ``fasthess.diag`` every
``eval_every`` steps. (Here the diagonal is known in closed form, H[(i,j),(i,j)] =
w2_i² and H[i,i] = ‖W1[i,:]‖², which the tests use to check the driver.)

Run:
    python experiments/theorem1_linear.py --preset quick --out runs/theorem1
Writes ``results.json`` (config, seed, versions, git commit, every measurement),
``rmed.csv``, ``summary.md`` and ``rmed_vs_d.png`` / ``rmed_over_time.png``.
A killed run resumes: finished (d, optimizer) runs are read back from ``runs/``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fasthess

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from optimizers import make_optimizer  # noqa: E402
from plots import pyplot  # noqa: E402
from provenance import provenance, write_csv  # noqa: E402
from seeding import generator  # noqa: E402


class TwoLayerLinear(nn.Module):
    """``f(x) = w2ᵀ W1 x``; ``end_to_end()`` is the row vector ``w2ᵀ W1``."""

    def __init__(self, d: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(d, d, generator=generator, dtype=torch.float64) * d ** (-2 * alpha))
        self.w2 = nn.Parameter(torch.randn(d, generator=generator, dtype=torch.float64) * d ** (-alpha))

    def end_to_end(self) -> torch.Tensor:
        return self.w2 @ self.W1


def population_loss(model: TwoLayerLinear, target: torch.Tensor) -> torch.Tensor:
    """The whitened large-batch loss ½‖w2ᵀW1 − A‖² (the constant dropped)."""
    return 0.5 * (model.end_to_end() - target).pow(2).sum()


def optimizer_spec(name: str, cfg: dict) -> dict:
    if name == "sgdm":
        return {"type": "sgd", "lr": cfg["lr_sgdm"], "momentum": cfg["momentum"]}
    if name == "adam":  # the theorem's Adam has β2 = β1²
        beta1 = cfg["adam_beta1"]
        return {"type": "adam", "lr": cfg["lr_adam"], "betas": [beta1, beta1**2], "eps": cfg["adam_eps"]}
    raise ValueError(f"unknown optimizer {name!r}")


def run_one(d: int, optimizer: str, cfg: dict, seed: int) -> dict:
    """Train one (d, optimizer) pair and measure R_med of W1 and w2 along the way."""
    g = generator(seed, "theorem1", d)
    model = TwoLayerLinear(d, cfg["alpha"], g)
    target = torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(d)  # ‖A‖ ≈ 1
    opt = make_optimizer(optimizer_spec(optimizer, cfg), model.parameters())
    loss = lambda: population_loss(model, target)  # noqa: E731
    points = []
    start = time.perf_counter()
    for step in range(cfg["steps"] + 1):
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            res = fasthess.diag(model, loss, ["W1", "w2"], num_samples=cfg["num_samples"], seed=seed)
            points.append({
                "step": step,
                "loss": float(loss().detach()),
                **{f"r_med_{k}": res[name].r_med() for k, name in (("1", "W1"), ("2", "w2"))},
            })
        opt.zero_grad()
        loss().backward()
        opt.step()
    return {"d": d, "optimizer": optimizer, "seed": seed, "seconds": time.perf_counter() - start, "points": points}


def matched_point(points: list[dict], fraction: float) -> dict:
    """The first measurement whose loss fell below ``fraction`` of the initial loss (else the last)."""
    threshold = fraction * points[0]["loss"]
    return next((p for p in points if p["loss"] <= threshold), points[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["quick", "paper"], default="quick")
    parser.add_argument("--config", type=Path, default=HERE / "configs" / "theorem1.json")
    parser.add_argument("--out", type=Path, default=Path("runs/theorem1"))
    args = parser.parse_args()
    cfg = json.loads(args.config.read_text())[args.preset]
    origin = provenance()  # taken at the start: the code that ran
    args.out.mkdir(parents=True, exist_ok=True)
    runs_dir = args.out / "runs"
    runs_dir.mkdir(exist_ok=True)

    runs = []
    jobs = [(d, o, s) for d in cfg["dims"] for o in ("adam", "sgdm") for s in range(cfg["repeats"])]
    for n, (d, optimizer, seed) in enumerate(jobs, 1):
        path = runs_dir / f"d{d}-{optimizer}-seed{seed}.json"
        if path.exists():  # finished before a restart
            runs.append(json.loads(path.read_text()))
            print(f"[{n}/{len(jobs)}] d={d} {optimizer} seed {seed}: done earlier", flush=True)
            continue
        run = run_one(d, optimizer, cfg, seed)
        path.write_text(json.dumps(run))
        runs.append(run)
        last = run["points"][-1]
        print(f"[{n}/{len(jobs)}] d={d:5d} {optimizer:5s} seed {seed}: loss {last['loss']:.2e}  "
              f"R_med W1 {last['r_med_1']:.2f}  w2 {last['r_med_2']:.2f}  ({run['seconds']:.0f} s)", flush=True)

    rows = summarise(runs, cfg)
    write_outputs(args.out, cfg, args.preset, runs, rows, origin)


def summarise(runs: list[dict], cfg: dict) -> list[dict]:
    """Per d and optimizer: mean and std over repeats of R_med at matched loss and at the end."""
    rows = []
    for d in cfg["dims"]:
        for optimizer in ("adam", "sgdm"):
            mine = [r for r in runs if r["d"] == d and r["optimizer"] == optimizer]
            row = {"d": d, "optimizer": optimizer, "repeats": len(mine)}
            for label, pick in (("matched", lambda r: matched_point(r["points"], cfg["matched_loss_fraction"])),
                                ("final", lambda r: r["points"][-1])):
                pts = [pick(r) for r in mine]
                for k in ("1", "2"):
                    vals = torch.tensor([p[f"r_med_{k}"] for p in pts], dtype=torch.float64)
                    row[f"{label}_r_med_{k}_mean"] = float(vals.mean())
                    row[f"{label}_r_med_{k}_std"] = float(vals.std()) if len(vals) > 1 else 0.0
                row[f"{label}_step_mean"] = float(torch.tensor([float(p["step"]) for p in pts]).mean())
                row[f"{label}_loss_mean"] = float(torch.tensor([p["loss"] for p in pts]).mean())
            rows.append(row)
    return rows


def write_outputs(out: Path, cfg: dict, preset: str, runs: list[dict], rows: list[dict], origin: dict) -> None:
    meta = {"preset": preset, "config": cfg, **origin}
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1))
    write_csv(out / "rmed.csv", rows)
    lines = [
        f"# Theorem 1: two-layer linear network ({preset} preset)",
        "",
        f"R_med (mean ± std over {cfg['repeats']} seeds) at the first measurement with loss ≤ "
        f"{cfg['matched_loss_fraction']} × initial loss, and after {cfg['steps']} steps.",
        "",
        "| d | optimizer | R_med W1 (matched) | R_med w2 (matched) | R_med W1 (final) | R_med w2 (final) | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = lambda k: f"{r[k + '_mean']:.2f} ± {r[k + '_std']:.2f}"  # noqa: E731
        lines.append(f"| {r['d']} | {r['optimizer']} | {f('matched_r_med_1')} | {f('matched_r_med_2')} | "
                     f"{f('final_r_med_1')} | {f('final_r_med_2')} | {r['final_loss_mean']:.1e} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, cfg, runs, rows)


def plot(out: Path, cfg: dict, runs: list[dict], rows: list[dict]) -> None:
    plt = pyplot()
    if plt is None:
        return
    colors = {"adam": "tab:orange", "sgdm": "tab:blue"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, k, name in ((axes[0], "1", "W1"), (axes[1], "2", "w2")):
        for optimizer in ("adam", "sgdm"):
            mine = [r for r in rows if r["optimizer"] == optimizer]
            ax.errorbar([r["d"] for r in mine], [r[f"matched_r_med_{k}_mean"] for r in mine],
                        yerr=[r[f"matched_r_med_{k}_std"] for r in mine], marker="o", capsize=3,
                        color=colors[optimizer], label="SGD+M" if optimizer == "sgdm" else "Adam")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d")
        ax.set_ylabel(f"R_med of {name} at matched loss")
        ax.legend()
    fig.suptitle("Theorem 1: Adam's R_med stays near 1, SGD+M's grows with d")
    fig.tight_layout()
    fig.savefig(out / "rmed_vs_d.png", dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    biggest = max(cfg["dims"])
    for ax, k, name in ((axes[0], "1", "W1"), (axes[1], "2", "w2")):
        for run in runs:
            if run["d"] != biggest or run["seed"] != 0:
                continue
            steps = [p["step"] for p in run["points"]]
            ax.plot(steps, [p[f"r_med_{k}"] for p in run["points"]], color=colors[run["optimizer"]],
                    label="SGD+M" if run["optimizer"] == "sgdm" else "Adam")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"R_med of {name} (d={biggest})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rmed_over_time.png", dpi=120)


if __name__ == "__main__":
    main()
