"""Analysis drivers (Section 3.1, 4.3/A.6, 6/A.5, Appendix E) on tiny configs: outputs, cross-checks, resuming."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

import fasthess
from tolerances import BLOCK_VS_DENSE, assert_entries_close

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import checkpoint  # noqa: E402
import gradient_alignment  # noqa: E402
import seeding  # noqa: E402
import smoothness_init  # noqa: E402
import train_checkpoints  # noqa: E402

LAYER = "transformer.encoder.layers.0.linear1.weight"


def _tiny_analysis_config(tmp_path: Path) -> Path:
    config = json.loads((ROOT / "experiments/configs/analysis.json").read_text())
    q = config["quick"]
    q["model"].update(vocab=12, d_model=8, heads=2, enc_layers=1, dec_layers=1, ff=8)
    q["data"] = {"train_examples": 32, "src_len": 4, "tgt_len": 4, "batch": 8, "hessian_examples": 16,
                 "hessian_micro_batch": 8}  # random integer targets: no files
    q.update(steps=4, checkpoint_steps=[0, 2, 4])
    q["dominance"] = {"layers": [LAYER, "generator.weight"], "rows": 3}
    q["alignment"] = {"steps": [4], "num_samples": 5, "layers": [LAYER, "generator.weight"], "plot_layer": LAYER}
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(config))
    return path


def _run(driver: str, cfg: Path, out: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a driver's main() in this process (saves a torch import per run); returns what it printed."""
    module = importlib.import_module(driver)
    monkeypatch.setattr(sys, "argv", [driver, "--config", str(cfg), "--out", str(out)])
    capsys.readouterr()
    module.main()
    return capsys.readouterr().out


def test_analysis_drivers_share_checkpoints_and_cross_check(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_path, out = _tiny_analysis_config(tmp_path), tmp_path / "out"
    first = _run("diag_dominance", cfg_path, out, capsys, monkeypatch)
    assert "sgdm r0 step 4/4" in first and "diag_dominance: adam step 4 done" in first
    assert sorted(p.name for p in (out / "train/snapshots").glob("*.pt")) == sorted(
        f"{o}-r0-s{s}.pt" for o in ("adam", "sgdm") for s in (0, 2, 4))
    dom = json.loads((out / "diag_dominance/results.json").read_text())
    assert dom["meta"]["git_commit"] and dom["meta"]["config"]["steps"] == 4
    assert len(dom["summary"]) == 2 * 3 * 2  # optimizers x checkpoints x layers
    for row in dom["summary"]:
        assert row["r_diag_median"] >= 1.0 and 0.0 < row["rho_median"] <= 1.0

    # the rows' diagonal entries are the Hessian diagonal fasthess.diag computes at the same checkpoint
    cfg = json.loads(cfg_path.read_text())["quick"]
    rec = json.loads((out / "diag_dominance/records/adam-step4.json").read_text())["layers"][LAYER]
    model, opt, _ = train_checkpoints.load(cfg, out / "train/snapshots/adam-r0-s4.pt", "adam")
    data = train_checkpoints.make_data(cfg, cfg["seed"])
    exact = fasthess.diag(model, train_checkpoints.hessian_loss(model, data, cfg), [LAYER], method="exact")[LAYER]
    want = exact.values[rec["indices"]].abs()
    rtol, atol = BLOCK_VS_DENSE[torch.float32]
    assert_entries_close(torch.tensor(rec["abs_h_ii"]), want, rtol, atol, "rows' diagonal vs diag")

    # the other analyses reuse the checkpoints instead of training again
    align = _run("gradient_alignment", cfg_path, out, capsys, monkeypatch)
    assert "train " not in align and "| adam | 4 |" in align
    res = json.loads((out / "gradient_alignment/results.json").read_text())
    assert {(r["optimizer"], r["step"], r["layer"]) for r in res["summary"]} == {
        (o, 4, l) for o in ("adam", "sgdm") for l in (LAYER, "generator.weight")}
    step4 = next(r for r in res["records"] if r["optimizer"] == "adam" and r["step"] == 4)["layers"][LAYER]
    want_u = gradient_alignment.update_direction(opt, dict(model.named_parameters())[LAYER]).reshape(-1)
    torch.testing.assert_close(torch.tensor(step4["u"]), want_u[step4["indices"]])

    low = _run("low_rank", cfg_path, out, capsys, monkeypatch)
    assert "train " not in low
    mats = json.loads((out / "low_rank/results.json").read_text())["matrices"]
    layers = list(fasthess.default_parameters(model))
    init = {(r["optimizer"], r["layer"]): r for r in mats if r["step"] == 0}
    assert set(init) == {(o, l) for o in ("adam", "sgdm") for l in layers}
    assert all(init[("adam", l)]["singular_values"] == init[("sgdm", l)]["singular_values"] for l in layers)
    assert {r["matrix"] for r in mats if r["step"] == 4} == {"W", "dW"}
    if importlib.util.find_spec("matplotlib"):
        for f in ("diag_dominance/diag_dominance.png", "gradient_alignment/scatter.png", "low_rank/low_rank.png"):
            assert (out / f).stat().st_size > 0

    # resumable: a second run recomputes nothing and gives the same summary
    again = _run("diag_dominance", cfg_path, out, capsys, monkeypatch)
    assert "done" not in again and " r0 step" not in again
    assert json.loads((out / "diag_dominance/results.json").read_text())["summary"] == dom["summary"]

    # checkpoints of another training config are refused, not mixed
    config = json.loads(cfg_path.read_text())
    config["quick"]["optimizers"]["adam"]["lr"] = 0.5
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match="different training config"):
        _run("low_rank", cfg_path, out, capsys, monkeypatch)


def test_shared_training_is_the_tables_training(tmp_path: Path) -> None:
    """The analyses' checkpoints come from compare_optimizers.run_repeat (same batches, dropout, resume)."""
    cfg = json.loads(_tiny_analysis_config(tmp_path).read_text())["quick"]
    data = train_checkpoints.make_data(cfg, cfg["seed"])
    paths = train_checkpoints.checkpoints(cfg, tmp_path / "a", data)
    record = json.loads((tmp_path / "a/train/runs/sgdm-r0.json").read_text())
    for step, path in paths["sgdm"].items():
        _, _, saved = train_checkpoints.load(cfg, path, "sgdm")
        assert saved["step"] == step and saved["losses"] == record["losses"][:step]
        assert set(saved) == {"model", "optimizer", "losses", "step", "format", "fasthess", "config"}
    final = train_checkpoints.load(cfg, paths["sgdm"][max(paths["sgdm"])], "sgdm")[2]
    torch.manual_seed(cfg["seed"])
    model = train_checkpoints.build_model(cfg)
    opt = train_checkpoints.make_optimizer(cfg["optimizers"]["sgdm"], model.parameters())
    for step in range(max(paths["sgdm"])):  # the same steps, by hand
        g = seeding.seed_step(cfg["seed"], "run", 0, step)
        idx = torch.randint(0, data["src"].shape[0], (cfg["data"]["batch"],), generator=g)
        model.train()
        opt.zero_grad()
        train_checkpoints.seq2seq_loss(model, data["src"][idx], data["tgt"][idx]).backward()
        opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(final["model"][k], v, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["adam", "sgdm"])
def test_update_direction_is_the_step_taken(kind: str) -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = (torch.optim.Adam([p], lr=0.01, betas=(0.9, 0.98)) if kind == "adam"
           else torch.optim.SGD([p], lr=0.01, momentum=0.9))
    for _ in range(3):
        before = p.detach().clone()
        opt.zero_grad()
        (p**4).sum().backward()
        opt.step()
    torch.testing.assert_close(gradient_alignment.update_direction(opt, p), (before - p.detach()) / 0.01)


def test_smoothness_driver_spectrum_of_the_block(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = json.loads((ROOT / "experiments/configs/smoothness.json").read_text())
    q = config["quick"]
    q["model"].update(vocab=10, d_model=4, heads=2, ff=6)
    q["data"].update(train_examples=8, src_len=3, tgt_len=3, hessian_examples=8, hessian_micro_batch=4)
    q.update(gains=[1, 800], layers=["transformer.decoder.layers.0.self_attn.out_proj.weight", "generator.weight"])
    cfg_path = tmp_path / "s.json"
    cfg_path.write_text(json.dumps(config))
    stdout = _run("smoothness_init", cfg_path, tmp_path / "out", capsys, monkeypatch)
    assert stdout.count("| 800 |") == 2
    rows = json.loads((tmp_path / "out/results.json").read_text())["results"]
    assert [(r["gain"], r["n"]) for r in rows] == [(1, 16), (1, 40), (800, 16), (800, 40)]
    for r in rows:
        assert r["gain"] == 800 or r["asymmetry"] < 1e-8  # at gain 800 this tiny model's curvature is round-off
        lam = torch.tensor(r["eigenvalues"], dtype=torch.float64)
        assert r["l"] == float(lam.abs().max()) and r["kappa_resolved"] >= 1.0
        assert (r["kappa"] is None) == (r["unresolved"] > 0)
    # the initialisation really uses the gain: weight matrices scale with it, the rest does not
    m = smoothness_init.init_with_gain(torch.nn.Transformer(4, 2, 1, 1, 6), 800.0, 0)
    w = m.encoder.layers[0].linear1.weight
    assert 0.5 * 800 * (6 / 10) ** 0.5 < float(w.abs().max()) <= 800 * (6 / 10) ** 0.5


@pytest.mark.parametrize("name", ["diag_dominance", "gradient_alignment", "low_rank", "smoothness_init"])
def test_driver_docstring_examples(name: str) -> None:
    """The examples in the drivers' docstrings (the suite's --doctest-modules covers fasthess/ only)."""
    import doctest

    result = doctest.testmod(importlib.import_module(name), verbose=False)
    assert result.attempted > 0 and result.failed == 0
