"""Plots of the experiment drivers (PNG; skipped with a note when matplotlib is missing)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def pyplot():  # noqa: ANN202
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return None
    return plt


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_losses(records: list[dict], path: Path, title: str, window: int = 20) -> None:
    """Training loss of every run (repeats of one optimizer share a colour), smoothed."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    colours: dict[str, str] = {}
    for r in records:
        label = f"{r.get('variant', '')} {r['optimizer']}".strip()
        first = label not in colours
        line = ax.plot(smooth(r["losses"], window), lw=1, alpha=0.8, label=label if first else None,
                       color=colours.get(label))[0]
        colours.setdefault(label, line.get_color())
    ax.set(xlabel="iteration", ylabel=f"training loss (moving average of {window})", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rmed(rows: list[dict], path: Path, title: str) -> None:
    """Per layer, mean R_med of the reference and each other optimizer (log scale), last step only."""
    plt = pyplot()
    if plt is None or not rows:
        return
    last = max(r["step"] for r in rows)
    groups = defaultdict(list)
    for r in rows:
        if r["step"] == last:
            groups[(r.get("variant", ""), r["other"])].append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.6 * len(groups)), squeeze=False)
    for ax, ((variant, other), rs) in zip(axes[:, 0], groups.items()):
        x = range(len(rs))
        ax.semilogy(x, [r["reference_mean"] for r in rs], "o-", label=rs[0]["reference"])
        ax.semilogy(x, [r["other_mean"] for r in rs], "s-", label=other)
        ax.set_xticks(list(x), [r["layer"] for r in rs], rotation=90, fontsize=5)
        ax.set(ylabel="R_med", title=f"{title} {variant} step {last}".strip())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rmed_over_time(rows: list[dict], path: Path, title: str) -> None:
    """Per-layer ratio R_med(reference) / R_med(other) against the step (thin lines) and its median (thick).

    Drawn only when the run evaluated more than one step.
    """
    plt = pyplot()
    steps = sorted({r["step"] for r in rows})
    if plt is None or len(steps) < 2:
        return
    groups = defaultdict(list)
    for r in rows:
        groups[(r.get("variant", ""), r["other"])].append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, ((variant, other), rs) in zip(axes[0], groups.items()):
        by_layer = defaultdict(dict)
        for r in rs:
            by_layer[r["layer"]][r["step"]] = r["ratio_mean"]
        for series in by_layer.values():
            ax.plot(steps, [series.get(s, float("nan")) for s in steps], color="grey", lw=0.6, alpha=0.6)
        medians = [sorted(v[s] for v in by_layer.values())[len(by_layer) // 2] for s in steps]
        ax.plot(steps, medians, "o-", color="black", lw=2, label="median over layers")
        ax.axhline(1.0, color="red", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set(xlabel="step", ylabel=f"R_med {rs[0]['reference']} / R_med {other}", title=f"{title} {variant}".strip())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
