"""Experiment drivers: their Hessians against closed forms, their outputs, resuming."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fasthess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import checkpoint  # noqa: E402
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
    for group in results["summary"]:  # the summary counts the table's rows
        rows = [r for r in results["table"] if r["step"] == group["step"] and r["other"] == group["other"]]
        assert group["layers"] == len(rows) == len(layers)
        assert group["above_1"] == sum(r["ratio_mean"] > 1 for r in rows)
        assert group["clearly_above_1"] == sum(r["ratio_mean"] - r["ratio_std"] > 1 for r in rows)
        assert group["min_ratio"] <= group["median_ratio"] <= group["max_ratio"]
    assert results["meta"]["seconds"] > 0
    if importlib.util.find_spec("matplotlib"):  # two evaluated steps: R_med over time too
        assert all((out / f).stat().st_size > 0 for f in ("losses.png", "rmed.png", "rmed_over_time.png"))
    # resuming from checkpoints after real kills: tests/test_run_safety.py


def test_translation_data_from_a_dictionary_file(tmp_path: Path) -> None:
    import data

    lines = [
        "# Version :: test\n",
        "Haus {n} | das ist ein großes Haus [arch.] :: house | this is a big house\n",
        "er war ein lebhaftes Kind. :: he was exuberant as a child.\n",
        "kurz :: short\n",
    ]
    path = tmp_path / "de-en"
    path.write_text("".join(lines), encoding="utf-8")
    pairs = data.load_translation_pairs("trans-de-en", str(path))
    assert pairs == [("das ist ein großes haus", "this is a big house"),
                     ("er war ein lebhaftes kind.", "he was exuberant as a child.")]
    vocab = data.build_vocab([p[1] for p in pairs], size=20)
    assert list(vocab)[:5] == [*data.SPECIALS, "a"] and len(vocab) == 4 + 11  # "a" is the most frequent
    ids = data.encode(["this is a zebra"], vocab, length=6)
    assert ids.tolist() == [[vocab["this"], vocab["is"], vocab["a"], data.UNK, data.EOS, data.PAD]]
    with pytest.raises(data.DataUnavailableError, match="get_data.sh"):
        data.load_translation_pairs("trans-de-en", str(tmp_path / "missing"))


def test_compare_optimizers_on_translation_pairs(tmp_path: Path) -> None:
    """Padding is masked and ignored: the loss of a batch does not depend on what the padding holds."""
    path = tmp_path / "de-en"
    path.write_text("".join(f"das ist satz nummer {i} hier :: this is sentence number {i} here\n" for i in range(40)))
    cfg = json.loads((ROOT / "experiments/configs/table2a.json").read_text())["quick"]
    cfg["model"].update(vocab=40, d_model=8, heads=2, enc_layers=1, dec_layers=1, ff=8)
    cfg["data"].update(path=str(path), train_examples=32, src_len=9, tgt_len=9)
    d = compare_optimizers.make_data(cfg, 0)
    assert d["src"].shape == (32, 9) and (d["src"] == 0).any() and (d["tgt"][:, -1] == 0).all()
    torch.manual_seed(0)
    m = cfg["model"]
    model = compare_optimizers.Seq2Seq(m["vocab"], m["d_model"], m["heads"], 1, 1, m["ff"], 9).eval()
    base = compare_optimizers.seq2seq_loss(model, d["src"][:4], d["tgt"][:4])
    model.src_embed.weight.data[0] += 5.0  # the padding embedding: masked out of attention
    model.tgt_embed.weight.data[0] += 5.0
    torch.testing.assert_close(compare_optimizers.seq2seq_loss(model, d["src"][:4], d["tgt"][:4]), base)


def test_three_optimizers_are_each_compared_with_the_reference(tmp_path: Path) -> None:
    """Table 6 layout: RMSprop and AMSGrad each against SGD+M, on translation pairs."""
    path = tmp_path / "de-en"
    path.write_text("".join(f"das ist satz nummer {i} hier :: this is sentence number {i} here\n" for i in range(40)))
    config = json.loads((ROOT / "experiments/configs/table6.json").read_text())
    q = config["quick"]
    q.update(steps=4, eval_steps=[4], checkpoint_every=2, repeats=1, num_samples=4)
    q["model"].update(vocab=40, d_model=8, heads=2, enc_layers=1, dec_layers=1, ff=8)
    q["data"].update(path=str(path), train_examples=32, src_len=9, tgt_len=9, batch=8,
                     hessian_examples=8, hessian_micro_batch=8)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(config))
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "experiments/compare_optimizers.py"), "table6", "--config", str(cfg_path),
           "--out", str(out)]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    results = json.loads((out / "results.json").read_text())
    assert {(r["reference"], r["other"]) for r in results["table"]} == {("sgdm", "rmsprop"), ("sgdm", "amsgrad")}
    runs = {r["optimizer"]: r for r in results["runs"]}
    for row in results["table"]:
        want = runs["sgdm"]["hessians"]["4"]["r_med"][row["layer"]] / runs[row["other"]]["hessians"]["4"]["r_med"][row["layer"]]
        assert abs(row["ratio_mean"] - want) < 1e-12
    assert (out / "table.md").read_text().count("| step | layer |") == 2


def test_estimator_study_quick_writes_every_estimator_against_the_exact_diagonal(tmp_path) -> None:
    import estimator_study

    out = tmp_path / "study"
    assert estimator_study.main(["--quick", "--out", str(out)]) == 0
    rows = json.loads((out / "estimator_study.json").read_text())["rows"]
    assert {r["estimator"] for r in rows} == set(estimator_study.ESTIMATORS)
    assert {r["state"] for r in rows} == {"init", "trained"}
    for r in rows:
        assert r["rel_error"] > 0 and r["cost_products"] > 0
        if r["estimator"] == "hutchinson":
            assert r["gain_vs_hutchinson"] == 1.0 and r["cost_products"] == r["budget"]
    assert (out / "estimator_study.md").read_text().startswith("| state | layer |")


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_last_checkpoint(tmp_path: Path) -> None:
    c = json.loads(_tiny_table2b(tmp_path).read_text())["quick"]
    c.update(steps=40, eval_steps=[40])
    c["optimizers"]["sgdm"]["lr"] = 1e12
    data = compare_optimizers.make_data(c, 0)
    with pytest.raises(FloatingPointError, match=r"sgdm repeat 0 diverged: training loss .* Lower optimizers.sgdm.lr"):
        compare_optimizers.run_repeat(c, "sgdm", 0, data, tmp_path)
    path = tmp_path / "checkpoints" / "sgdm-r0.pt"
    if path.exists():  # only finite states are saved
        saved = checkpoint.load(path, compare_optimizers.run_fingerprint(c, "sgdm"))
        assert all(torch.isfinite(torch.tensor(saved["state"]["losses"])))
