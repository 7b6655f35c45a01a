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
