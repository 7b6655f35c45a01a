"""The tasks of the optimizer comparisons (Tables 1, 3-5, 7, 8, 10): loaders, models, schedules, drivers."""

from __future__ import annotations

import bz2
import copy
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import compare_optimizers  # noqa: E402
import data  # noqa: E402
import equal_loss  # noqa: E402
from optimizers import SwitchOptimizer, make_optimizer  # noqa: E402
from tasks import get_task, init_weights_  # noqa: E402


def _stand_ins(tmp_path: Path) -> dict[str, Path]:
    """Small files in the formats scripts/get_data.sh extracts."""
    rt = tmp_path / "rt.csv.bz2"
    rows = ["category,text,movie_name,has_plot_and_reviews"]
    rows += [f'{"fresh" if i % 2 else "rotten"},"review {i} was {"great" if i % 2 else "dull"}, truly",m{i},True'
             for i in range(40)] + ['plot,"a plot summary, not a review",m,True']
    rt.write_bytes(bz2.compress("\n".join(rows).encode()))
    wiki = tmp_path / "wiki.cor"
    wiki.write_text("\n".join(" ".join(f"w{(i * j) % 17}" for j in range(30)) for i in range(20)))
    mnist = tmp_path / "mnist.csv.gz"
    mnist.write_bytes(gzip.compress("\n".join(",".join(str((i * 7 + p) % 256) for p in range(784)) + f",{i % 10}"
                                              for i in range(24)).encode()))
    return {"rotten-tomatoes": rt, "gensim-wiki": wiki, "mnist5k": mnist}


def test_loaders_read_the_stand_in_formats(tmp_path: Path) -> None:
    files = _stand_ins(tmp_path)
    texts, labels = data.load_sentiment("rotten-tomatoes", str(files["rotten-tomatoes"]))
    assert len(texts) == 40 and labels[:2] == [0, 1] and texts[1] == "review 1 was great, truly"  # plots dropped
    text = data.load_lm_text("gensim-wiki", str(files["gensim-wiki"]))
    assert len(text.split()) == 600 and "\n" not in text
    images, targets = data.load_images("mnist5k", str(files["mnist5k"]))
    assert images.shape == (24, 1, 28, 28) and images.dtype == torch.uint8 and targets.tolist()[:3] == [0, 1, 2]
    assert int(images[1, 0, 0, 1]) == 8  # pixel 1 of image 1: (7 + 1) % 256
    for loader, source in ((data.load_sentiment, "rotten-tomatoes"), (data.load_lm_text, "gensim-wiki"),
                           (data.load_images, "mnist5k")):
        with pytest.raises(data.DataUnavailableError, match="get_data.sh"):
            loader(source, str(tmp_path / "missing"))
    with pytest.raises(data.DataUnavailableError, match="local copy|stand-in"):
        data.load_images("cifar10", str(tmp_path / "no-cifar"))


TINY = {
    "classifier": {"model": {"vocab": 40, "hidden": 8, "layers": 1, "heads": 2, "intermediate": 8},
                   "data": {"source": "rotten-tomatoes", "train_examples": 32, "seq_len": 8}},
    "lm": {"model": {"vocab": 20, "d_model": 8, "heads": 2, "layers": 1, "ff": 8,
                     "init": {"kind": "normal", "gain": 4.0}},
           "data": {"source": "gensim-wiki", "train_examples": 16, "bptt": 6}},
    "resnet": {"model": {"blocks": [1, 1, 1]}, "data": {"source": "mnist5k", "train_examples": 16},
               "layer_types": ["Conv2d", "Linear"]},
}


@pytest.mark.parametrize("task", sorted(TINY))
def test_each_task_trains_and_gets_a_table(tmp_path: Path, task: str) -> None:
    files = _stand_ins(tmp_path)
    cfg = {"task": task, "seed": 0, **json.loads(json.dumps(TINY[task])),
           "optimizers": {"sgdm": {"type": "sgd", "lr": 0.01, "momentum": 0.9}, "adam": {"type": "adam", "lr": 1e-3}},
           "lr_schedule": "linear", "steps": 3, "eval_steps": [3], "checkpoint_every": 2, "repeats": 1, "num_samples": 4}
    cfg["data"].update(path=str(files[cfg["data"]["source"]]), batch=4, hessian_examples=8, hessian_micro_batch=4)
    records, rows = compare_optimizers.run_all(cfg, tmp_path / "out")
    assert [r["optimizer"] for r in records] == ["sgdm", "adam"]
    assert all(len(r["losses"]) == 3 and all(map(torch.isfinite, torch.tensor(r["losses"]))) for r in records)
    layers = {r["layer"] for r in rows}
    if task == "resnet":
        assert "conv.weight" in layers and "fc.weight" in layers and not any("bn" in n for n in layers)
    assert rows and all(r["reference_mean"] >= 1.0 and r["other_mean"] >= 1.0 for r in rows)


def test_lm_data_are_next_token_targets(tmp_path: Path) -> None:
    files = _stand_ins(tmp_path)
    cfg = {"task": "lm", **TINY["lm"]}
    cfg["data"] = dict(cfg["data"], path=str(files["gensim-wiki"]))
    d = get_task(cfg).make_data(cfg, seed=0)
    assert d["x"].shape == (16, 6) and torch.equal(d["x"][:, 1:], d["y"][:, :-1])


def test_init_gain_scales_the_weights() -> None:
    torch.manual_seed(0)
    small, large = torch.nn.Linear(300, 300), torch.nn.Linear(300, 300)
    init_weights_(small, {"kind": "uniform", "gain": 1.0})
    init_weights_(large, {"kind": "uniform", "gain": 800.0})
    assert 700 < float(large.weight.detach().std() / small.weight.detach().std()) < 900


def test_switch_optimizer_switches_and_resumes() -> None:
    """Table 8's schedule: SGD until step 2, then Adam from fresh state; a reload continues identically."""
    spec = {"type": "switch", "phases": [{"until": 2, "spec": {"type": "sgd", "lr": 0.1}},
                                         {"spec": {"type": "adam", "lr": 0.01}}]}

    def run(steps: int, opt=None, w=None):  # noqa: ANN001, ANN202
        w = w if w is not None else torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        opt = opt or make_optimizer(spec, [w])
        for _ in range(steps):
            opt.zero_grad()
            (w**2).sum().backward()
            opt.step()
        return w, opt

    w, opt = run(2)
    assert isinstance(opt, SwitchOptimizer) and isinstance(opt.inner, torch.optim.Adam)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -2.0]) * 0.8**2)  # two SGD steps
    w, opt = run(2, opt, w)
    reloaded_w = torch.nn.Parameter(w.detach().clone())
    reloaded = make_optimizer(spec, [reloaded_w])
    reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save/load would
    run(3, opt, w)
    run(3, reloaded, reloaded_w)
    torch.testing.assert_close(reloaded_w, w)


def test_equal_loss_matching() -> None:
    losses = {0: 5.0, 10: 4.0, 20: 3.1, 30: 2.5}
    assert equal_loss.match(3.0, losses) == 20
    assert equal_loss.match(2.5, losses) == 30
    assert equal_loss.match(1.0, losses) is None  # SGD+M never got that low


def test_equal_loss_driver_end_to_end(tmp_path: Path) -> None:
    """Table 7 + Figure 1(a) on a tiny random-target seq2seq: pairs, Hessians, restarts; a rerun recomputes nothing."""
    config = json.loads((ROOT / "experiments/configs/table7.json").read_text())
    q = config["quick"]
    q.update(steps=6, snapshot_steps=[0, 2, 4, 6], repeats=1, num_samples=4, checkpoint_every=2,
             equal_loss=dict(q["equal_loss"], other_steps=[2]), restart=dict(q["restart"], steps=3))
    q["model"].update(vocab=12, d_model=8, heads=2, enc_layers=1, dec_layers=1, ff=8)
    q["data"] = {"kind": "random_targets", "train_examples": 32, "src_len": 4, "tgt_len": 4, "batch": 8,
                 "hessian_examples": 8, "hessian_micro_batch": 8}
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(config))
    cmd = [sys.executable, str(ROOT / "experiments/equal_loss.py"), "--config", str(cfg_path), "--out", str(tmp_path / "o")]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = json.loads((tmp_path / "o/equal_loss.json").read_text())
    (pair,) = result["pairs"]
    losses = json.loads((tmp_path / "o/equal_loss/losses-r0.json").read_text())
    if pair["reference_step"] is not None:
        ref = {int(s): v for s, v in losses["sgdm"].items()}
        assert pair["reference_step"] == min(ref, key=lambda s: abs(ref[s] - losses["adam"]["2"]))
        assert len(result["restarts"]["other"]) == len(result["restarts"]["reference"]) == 3
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "o/equal_loss").iterdir()}
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "o/equal_loss").iterdir()} == stamp
