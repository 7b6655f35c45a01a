"""Section 4.3 / A.6: the gradient |g_i| and the update direction against |H_ii|, Adam vs SGD+M.

At the checkpoints ``alignment.steps`` of ``train_checkpoints.py``, for every
linear/attention weight, ``fasthess.diag`` gives exact ``H_ii`` at
``num_samples`` sampled coordinates on the Hessian batch; at the same coordinates
we read

* ``g_i``: the gradient of the same Hessian-batch loss;
* ``u_i``: the optimizer's update direction (the step is ``-lr · u``): for Adam the
  paper's adaptive gradient ``g_adapt = m̂ / (√v̂ + ε)`` from its state
  (bias-corrected moments); for SGD+M the momentum buffer.

Per layer: Pearson correlation of ``log|H_ii|`` with ``log|g_i|`` and with
``log|u_i|`` (coordinates where a value is 0 are left out), and the spread
max/median of ``|g_i|`` and ``|u_i|``. The paper: |g_i| aligns with |H_ii|, while
Adam's |g_adapt,i| are quite uniform and do not align with |H_ii|.

Run:
    python experiments/gradient_alignment.py --preset quick   # writes runs/analysis-quick/gradient_alignment/
"""

from __future__ import annotations

import json
import math
import statistics

import torch

import fasthess
from provenance import write_csv
from train_checkpoints import hessian_loss, load, parse, prepare, pyplot, write_json

NAME = "gradient_alignment"


def update_direction(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """The direction ``u`` of the optimizer's last step on ``p`` (step = ``-lr · u``, without weight decay).

    Adam: ``m̂ / (√v̂ + ε)`` with bias-corrected moments; SGD with momentum: its buffer.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.Adam([p], lr=0.1)
        >>> p.grad = torch.tensor([1.0, -4.0]); opt.step()
        >>> update_direction(opt, p)  # after one step Adam's direction is the sign of the gradient
        tensor([ 1., -1.])
    """
    state, group = opt.state[p], opt.param_groups[0]
    if isinstance(opt, torch.optim.Adam):
        t = float(state["step"])
        b1, b2 = group["betas"]
        m_hat = state["exp_avg"] / (1 - b1**t)
        v_hat = state["exp_avg_sq"] / (1 - b2**t)
        return m_hat / (v_hat.sqrt() + group["eps"])
    if isinstance(opt, torch.optim.SGD) and "momentum_buffer" in state:
        return state["momentum_buffer"].clone()
    raise ValueError(f"no update direction recorded for {type(opt).__name__}: train at least one step first")


def log_correlation(x: list[float], y: list[float]) -> float:
    """Pearson correlation of ``log|x|`` and ``log|y|`` over the pairs where both are non-zero.

    Example:
        >>> round(log_correlation([1, 10, 100], [2, 20, 200]), 6), round(log_correlation([1, 10, 100], [5, 5, 5]), 6)
        (1.0, nan)
    """
    pairs = [(math.log(abs(a)), math.log(abs(b))) for a, b in zip(x, y) if a != 0 and b != 0]
    if len(pairs) < 3:
        return math.nan
    a, b = torch.tensor(pairs, dtype=torch.float64).T
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def spread(x: list[float]) -> float:
    """max / median of |x| (the R_med statistic, unstabilised)."""
    v = sorted(abs(a) for a in x)
    med = statistics.median(v)
    return v[-1] / med if med > 0 else math.inf


def measure(cfg: dict, out, data, paths) -> list[dict]:
    """One record per (optimizer, step): H_ii, g_i and u_i at the sampled coordinates of every layer."""
    spec = cfg["alignment"]
    records = []
    for opt_name, by_step in paths.items():
        for step in spec["steps"]:
            rec_path = out / NAME / "records" / f"{opt_name}-step{step}.json"
            if rec_path.exists():
                records.append(json.loads(rec_path.read_text()))
                continue
            model, opt, _ = load(cfg, by_step[step], opt_name)
            loss = hessian_loss(model, data, cfg)
            res = fasthess.diag(model, loss, spec["layers"], num_samples=spec["num_samples"], seed=cfg["seed"])
            model.zero_grad()
            for closure in loss:
                (closure() / len(loss)).backward()
            params = dict(model.named_parameters())
            layers = {}
            for name, ld in res.layers.items():
                idx = ld.indices
                layers[name] = {
                    "indices": idx.tolist(),
                    "h_ii": ld.values.tolist(),
                    "g": params[name].grad.reshape(-1)[idx].tolist(),
                    "u": update_direction(opt, params[name]).reshape(-1)[idx].tolist(),
                }
            rec = {"optimizer": opt_name, "step": step, "hessian_seconds": res.meta["seconds"], "layers": layers}
            rec_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(rec_path, rec)
            print(f"  {NAME}: {opt_name} step {step}: Hessian in {res.meta['seconds']:.0f} s", flush=True)
            records.append(rec)
    return records


def summarise(records: list[dict]) -> list[dict]:
    return [
        {"optimizer": rec["optimizer"], "step": rec["step"], "layer": layer,
         "corr_log_h_g": log_correlation(s["h_ii"], s["g"]), "corr_log_h_u": log_correlation(s["h_ii"], s["u"]),
         "spread_h": spread(s["h_ii"]), "spread_g": spread(s["g"]), "spread_u": spread(s["u"])}
        for rec in records for layer, s in rec["layers"].items()
    ]


def plot(records: list[dict], rows: list[dict], layer: str, path_scatter, path_corr) -> None:
    plt = pyplot()
    if plt is None:
        return
    last = max(r["step"] for r in records)
    final = [r for r in records if r["step"] == last]
    fig, axes = plt.subplots(len(final), 2, figsize=(8, 3.6 * len(final)), squeeze=False)
    for i, rec in enumerate(final):
        s = rec["layers"][layer]
        h = [abs(v) for v in s["h_ii"]]
        for j, (key, label) in enumerate([("g", "|g_i|"), ("u", "|g_adapt,i| (Adam)" if rec["optimizer"] == "adam"
                                                             else "|momentum buffer_i|")]):
            ax = axes[i, j]
            ax.loglog(h, [abs(v) for v in s[key]], ".", alpha=0.6)
            ax.set_xlabel("|H_ii|")
            ax.set_ylabel(label)
            ax.set_title(f"{rec['optimizer']} step {last}: corr(log) {log_correlation(s['h_ii'], s[key]):.2f}", fontsize=9)
    fig.suptitle(layer, fontsize=9)
    fig.tight_layout()
    fig.savefig(path_scatter, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for opt, marker in zip(dict.fromkeys(r["optimizer"] for r in rows), "os^"):
        sel = {r["layer"]: r for r in rows if r["optimizer"] == opt and r["step"] == last}
        ax.plot(range(len(layers)), [sel[l]["corr_log_h_g"] for l in layers], marker, label=f"{opt}: log|g| vs log|H_ii|")
        ax.plot(range(len(layers)), [sel[l]["corr_log_h_u"] for l in layers], marker, mfc="none",
                label=f"{opt}: log|update| vs log|H_ii|")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([l.replace("transformer.", "") for l in layers], rotation=80, fontsize=6)
    ax.set_ylabel(f"correlation at step {last}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_corr, dpi=110)
    plt.close(fig)


def main() -> None:
    cfg, out, meta = parse(__doc__.splitlines()[0], NAME)
    data, paths = prepare(cfg, out)
    records = measure(cfg, out, data, paths)
    rows = summarise(records)
    write_json(out / NAME / "results.json", {"meta": meta, "summary": rows, "records": records})
    write_csv(out / NAME / "summary.csv", rows)
    layer = cfg["alignment"].get("plot_layer") or rows[0]["layer"]
    plot(records, rows, layer, out / NAME / "scatter.png", out / NAME / "correlations.png")
    print("| optimizer | step | median over layers: corr(log|H_ii|, log|g|) | corr(log|H_ii|, log|u|) | "
          "max/median |g| | max/median |u| |")
    print("|---|---|---|---|---|---|")
    for opt in dict.fromkeys(r["optimizer"] for r in rows):
        for step in cfg["alignment"]["steps"]:
            sel = [r for r in rows if r["optimizer"] == opt and r["step"] == step]
            med = lambda k: statistics.median(r[k] for r in sel)  # noqa: E731
            print(f"| {opt} | {step} | {med('corr_log_h_g'):.2f} | {med('corr_log_h_u'):.2f} | {med('spread_g'):.1f} | "
                  f"{med('spread_u'):.1f} |")


if __name__ == "__main__":
    main()
