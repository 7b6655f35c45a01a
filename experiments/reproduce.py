"""One entry point for every reproduction: ``python experiments/reproduce.py NAME [--preset quick|paper]``.

``NAME`` is a table or figure of the paper (``list`` shows them all); each runs its
driver with the config of the same name and writes to ``runs/NAME`` (override with
``--out``). Data sets the quick presets need are fetched first (``scripts/get_data.sh``).

Example:
    python experiments/reproduce.py table2b --preset quick
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (driver, config name, what it reproduces, stand-in data the quick preset reads)
EXPERIMENTS = {
    "theorem1": ("theorem1_linear.py", "theorem1", "Theorem 1: two-layer linear network, R_med against d", None),
    "demo": ("quick_demo.py", None, "Adam vs SGD+M on a small transformer, generated data (1 min)", None),
    "table1": ("compare_optimizers.py", "table1", "Table 1: BERT-small sentence classification", "rotten-tomatoes"),
    "table2a": ("compare_optimizers.py", "table2a", "Table 2(a): seq2seq translation", "trans-de-en"),
    "table2b": ("compare_optimizers.py", "table2b", "Table 2(b): seq2seq with random targets", None),
    "table3": ("compare_optimizers.py", "table3", "Table 3: LM, Adagrad vs SGD, uniform init gains", "gensim-wiki"),
    "table4": ("compare_optimizers.py", "table4", "Table 4: LM, Adagrad vs SGD, normal init gains", "gensim-wiki"),
    "table5": ("compare_optimizers.py", "table5", "Table 5: LM, Adagrad vs SGD, random data", None),
    "table6": ("compare_optimizers.py", "table6", "Table 6: RMSprop and AMSGrad vs SGD+M", "trans-de-en"),
    "table7": ("equal_loss.py", "table7", "Table 7 + Figure 1(a): equal training loss, SGD+M restarts", "trans-de-en"),
    "table8": ("compare_optimizers.py", "table8", "Table 8: SGD switched to Adam vs Adam", "trans-de-en"),
    "table9": ("compare_optimizers.py", "table9", "Table 9: weight decay 0.001", "trans-de-en"),
    "table10": ("compare_optimizers.py", "table10", "Table 10: ResNet on images", "mnist5k"),
    "smoothness": ("smoothness_init.py", None, "Section 3.1: l and κ of a layer's Hessian at init, gain 1 vs 800", None),
    "dominance": ("diag_dominance.py", None, "Appendix E: diagonal dominance of Hessian rows over training", "trans-de-en"),
    "alignment": ("gradient_alignment.py", None, "Section 4.3: |g_i| and |g_adapt,i| against |H_ii|", "trans-de-en"),
    "lowrank": ("low_rank.py", None, "Section 6: low rank of weights, R_u and R_v of singular vectors", "trans-de-en"),
}
EXPERIMENTS["figure1a"] = EXPERIMENTS["table7"]


def command(name: str, preset: str, out: Path | None) -> list[str]:
    driver, config, _, _ = EXPERIMENTS[name]
    cmd = [sys.executable, str(HERE / driver)]
    if driver == "quick_demo.py":
        return cmd + ["--out", str(out or Path("runs") / name)]
    if config is None or driver == "theorem1_linear.py":  # drivers with one config of their own
        return cmd + ["--preset", preset] + (["--out", str(out)] if out else [])
    return cmd + [config, "--preset", preset, "--out", str(out or Path("runs") / config)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=[*EXPERIMENTS, "list"])
    parser.add_argument("--preset", choices=["quick", "paper"], default="quick")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.name == "list":
        for name, (driver, _, what, data) in EXPERIMENTS.items():
            print(f"{name:10s} {what}  [{driver}{', data: ' + data if data else ''}]")
        return
    data = EXPERIMENTS[args.name][3]
    if data and args.preset == "quick":  # the paper presets read the real data sets
        subprocess.run(["bash", str(HERE.parent / "scripts/get_data.sh"), data], check=True, cwd=HERE.parent)
    sys.exit(subprocess.call(command(args.name, args.preset, args.out)))


if __name__ == "__main__":
    main()
