"""Experiment drivers: their Hessians against closed forms, their outputs, resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import fasthess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import compare_optimizers  # noqa: E402
import theorem1_linear  # noqa: E402


def test_two_layer_linear_hessian_diagonal_has_the_closed_form() -> None:
    """½‖w2ᵀW1 − A‖²: H[(i,j),(i,j)] = w2_i², H[i,i] (w2) = ‖W1[i,:]‖²."""
    model = theorem1_linear.TwoLayerLinear(6, 0.5, torch.Generator().manual_seed(0))
    target = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = fasthess.diag(model, lambda: theorem1_linear.population_loss(model, target), ["W1", "w2"], method="exact")
    w1, w2 = model.W1.detach(), model.w2.detach()
    torch.testing.assert_close(res["W1"].diagonal(), (w2**2)[:, None].expand(6, 6), rtol=1e-12, atol=0)
    torch.testing.assert_close(res["w2"].diagonal(), (w1**2).sum(1), rtol=1e-12, atol=0)


def test_theorem1_driver_writes_results_and_resumes(tmp_path: Path) -> None:
    config = json.loads((ROOT / "experiments/configs/theorem1.json").read_text())
    config["quick"].update(dims=[4, 8], repeats=1, steps=60, eval_every=30, num_samples=10)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(config))
    cmd = [sys.executable, str(ROOT / "experiments/theorem1_linear.py"), "--config", str(cfg_path), "--out", str(tmp_path / "out")]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "done earlier" not in first.stdout
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert results["meta"]["config"]["dims"] == [4, 8] and results["meta"]["git_commit"]
    assert {(r["d"], r["optimizer"]) for r in results["summary"]} == {(4, "adam"), (4, "sgdm"), (8, "adam"), (8, "sgdm")}
    for run in results["runs"]:
        assert [p["step"] for p in run["points"]] == [0, 30, 60]
        assert all(p["r_med_1"] >= 1.0 and p["r_med_2"] >= 1.0 for p in run["points"])
    assert (tmp_path / "out/summary.md").read_text().count("| 8 |") == 2
    second = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert second.stdout.count("done earlier") == 4
    assert json.loads((tmp_path / "out/results.json").read_text())["summary"] == results["summary"]


def _tiny_table2b(tmp_path: Path) -> Path:
    config = json.loads((ROOT / "experiments/configs/table2b.json").read_text())
    q = config["quick"]
    q.update(steps=6, eval_steps=[3, 6], checkpoint_every=2, repeats=2, num_samples=5)
    q["model"].update(vocab=12, d_model=8, heads=2, enc_layers=1, dec_layers=1, ff=8)
    q["data"].update(train_examples=32, src_len=4, tgt_len=4, batch=8, hessian_examples=16, hessian_micro_batch=8)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    return path


def test_compare_optimizers_table_and_resume(tmp_path: Path) -> None:
    cfg = _tiny_table2b(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "experiments/compare_optimizers.py"), "table2b", "--config", str(cfg), "--out", str(out)]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    results = json.loads((out / "results.json").read_text())
    runs = {(r["optimizer"], r["repeat"]): r for r in results["runs"]}
    assert set(runs) == {("sgdm", 0), ("adam", 0), ("sgdm", 1), ("adam", 1)}
    assert runs[("sgdm", 0)]["losses"] != runs[("sgdm", 1)]["losses"]  # repeats differ in batch order
    layers = list(runs[("adam", 0)]["hessians"]["6"]["r_med"])
    assert len(results["table"]) == 2 * len(layers)
    for row in results["table"]:
        step, layer = str(row["step"]), row["layer"]
        ratios = [runs[("sgdm", i)]["hessians"][step]["r_med"][layer] / runs[("adam", i)]["hessians"][step]["r_med"][layer]
                  for i in (0, 1)]
        assert abs(row["ratio_mean"] - sum(ratios) / 2) < 1e-12
    # a run killed after its step-4 checkpoint resumes there and ends exactly where the uninterrupted one did
    first = runs[("adam", 1)]
    (out / "runs" / "adam-r1.json").unlink()
    ckpt = out / "checkpoints" / "adam-r1.pt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state"]["step"] == 6
    data = compare_optimizers.make_data(json.loads(cfg.read_text())["quick"], 0)
    c = json.loads(cfg.read_text())["quick"]
    c["steps"] = 4  # recreate the state of a run stopped at step 4, then resume to 6
    for f in (out / "runs").glob("*.json"):
        f.unlink()
    ckpt.unlink()
    compare_optimizers.run_repeat(c, "adam", 1, data, out)
    (out / "runs" / "adam-r1.json").unlink()
    c["steps"] = 6
    resumed = compare_optimizers.run_repeat(c, "adam", 1, data, out)
    assert resumed["losses"] == first["losses"]
    assert resumed["hessians"]["6"] == first["hessians"]["6"]
