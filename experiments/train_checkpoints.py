"""Checkpoints of one seq2seq model per optimizer, shared by the analysis drivers.

``diag_dominance.py`` (Appendix E), ``gradient_alignment.py`` (Section 4.3 / A.6) and
``low_rank.py`` (Section 6 / A.5) analyse the same training runs: the Table 2(a)
Transformer trained from one initialisation by each optimizer of
``configs/analysis.json``, saved (model and optimizer state) at
``checkpoint_steps``. Whichever driver runs first trains; the others load. Training
resumes from the last saved checkpoint, and a checkpoint directory made with a
different training config is refused (:class:`checkpoint.CheckpointError`) rather
than silently mixed; checkpoints are read without running code (:mod:`checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import checkpoint  # noqa: E402
from compare_optimizers import Seq2Seq, make_data, run_fingerprint, run_repeat, seq2seq_loss  # noqa: E402
from optimizers import make_optimizer  # noqa: E402
from plots import pyplot  # noqa: E402,F401  (re-exported for the analysis drivers)
from provenance import provenance  # noqa: E402

TRAIN_KEYS = ("seed", "model", "data", "optimizers", "steps", "checkpoint_steps")


def parse(description: str, name: str) -> tuple[dict, Path, dict]:
    """Command line of an analysis driver: ``--preset``, ``--config``, ``--out``.

    Returns the preset's config, the run directory (``runs/analysis`` by default,
    shared with the other analyses so they reuse the checkpoints) and the
    provenance (git commit, versions) taken now, before any work.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=["quick", "paper"], default="quick")
    parser.add_argument("--config", type=Path, default=HERE / "configs" / "analysis.json")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/analysis-PRESET)")
    args = parser.parse_args()
    cfg = json.loads(args.config.read_text())[args.preset]
    out = args.out or Path("runs") / f"analysis-{args.preset}"
    (out / name).mkdir(parents=True, exist_ok=True)
    return cfg, out, {"driver": name, "preset": args.preset, "config": cfg, **provenance()}


def build_model(cfg: dict) -> nn.Module:
    """The seq2seq Transformer of the config, with the initialisation of ``cfg['seed']``."""
    torch.manual_seed(cfg["seed"])
    m = cfg["model"]
    return Seq2Seq(m["vocab"], m["d_model"], m["heads"], m["enc_layers"], m["dec_layers"], m["ff"],
                   max(cfg["data"]["src_len"], cfg["data"]["tgt_len"]))


def hessian_loss(model: nn.Module, data: dict, cfg: dict) -> list:
    """The loss on the fixed Hessian batch (the first ``hessian_examples`` pairs), as micro-batch closures."""
    n, mb = cfg["data"]["hessian_examples"], cfg["data"]["hessian_micro_batch"]
    return [lambda s=s: seq2seq_loss(model, data["src"][s : s + mb], data["tgt"][s : s + mb]) for s in range(0, n, mb)]


def _path(out: Path, opt_name: str, step: int) -> Path:
    return out / "train" / "snapshots" / f"{opt_name}-r0-s{step}.pt"


def run_config(cfg: dict) -> dict:
    """The ``compare_optimizers`` config of the training: no Hessians, snapshots at ``checkpoint_steps``."""
    last = max(cfg["checkpoint_steps"])
    return {**cfg, "steps": last, "eval_steps": [], "snapshot_steps": cfg["checkpoint_steps"],
            "checkpoint_every": cfg.get("checkpoint_every", max(1, last // 6))}


def checkpoints(cfg: dict, out: Path, data: dict) -> dict[str, dict[int, Path]]:
    """``{optimizer: {step: checkpoint path}}``, training (or resuming) whatever is missing.

    The training is ``compare_optimizers.run_repeat`` (repeat 0: the same mini-batches,
    dropout masks and resumable checkpoints as the tables) with snapshots of model,
    optimizer state and losses at ``checkpoint_steps``.
    """
    stamp = out / "train" / "config.json"
    train_cfg = {k: cfg[k] for k in TRAIN_KEYS}
    if stamp.exists() and checkpoint.read_json(stamp) != train_cfg:
        raise checkpoint.CheckpointError(f"{out / 'train'} holds checkpoints of a different training config; pass "
                                         "another --out or delete that directory")
    write_json(stamp, train_cfg)
    run_cfg = run_config(cfg)
    paths = {o: {s: _path(out, o, s) for s in cfg["checkpoint_steps"]} for o in cfg["optimizers"]}
    for opt_name, by_step in paths.items():
        if not all(p.exists() for p in by_step.values()):
            run_repeat(run_cfg, opt_name, 0, data, out / "train")
        missing = [str(p) for p in by_step.values() if not p.exists()]
        if missing:
            raise FileNotFoundError(f"checkpoints {missing} are missing from a finished run; delete {out / 'train'} "
                                    "to train again")
    return paths


def load(cfg: dict, path: Path, opt_name: str) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """Model (in eval mode), optimizer and saved record of one checkpoint."""
    saved = checkpoint.load(path, run_fingerprint(run_config(cfg), opt_name))
    model = build_model(cfg)
    model.load_state_dict(saved["model"])
    opt = make_optimizer(cfg["optimizers"][opt_name], model.parameters())
    opt.load_state_dict(saved["optimizer"])
    return model.eval(), opt, saved


def prepare(cfg: dict, out: Path) -> tuple[dict, dict[str, dict[int, Path]]]:
    """The data of the config and the checkpoints of every optimizer (trained if missing)."""
    data = make_data(cfg, cfg["seed"])
    return data, checkpoints(cfg, out, data)


def write_json(path: Path, obj: dict) -> None:
    """``obj`` as indented JSON, written atomically."""
    checkpoint.write_json(path, obj, indent=1)
