"""fasthess.Monitor and the Hugging Face callback: when they measure, what they log, resuming."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fasthess


def _setup(seed: int = 0) -> tuple[nn.Module, callable, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.1), nn.GELU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    return model, (lambda: F.cross_entropy(model(x), y)), torch.optim.SGD(model.parameters(), 0.1)


def _train(model: nn.Module, loss, opt, mon: fasthess.Monitor, steps: range) -> dict[int, dict]:
    measured = {}
    for step in steps:
        model.train()
        opt.zero_grad()
        loss().backward()
        opt.step()
        res = mon.step(step)
        if res is not None:
            measured[step] = res.r_med(stabilized=True)
        assert model.training and model[1].training, "the monitor must restore training mode"
    return measured


def test_measures_every_n_steps_and_logs_what_diag_returns(tmp_path) -> None:
    model, loss, opt = _setup()
    mon = fasthess.Monitor(model, loss, every=3, out=tmp_path, num_samples=12, seed=4)
    measured = _train(model, loss, opt, mon, range(8))
    assert sorted(measured) == [0, 3, 6]
    with open(tmp_path / "rmed.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * 2 and {r["layer"] for r in rows} == {"0.weight", "3.weight"}
    for r in rows:
        assert float(r["r_med_stabilized"]) == pytest.approx(measured[int(r["step"])][r["layer"]], rel=1e-12)
    assert [s for s, _ in mon.r_med("0.weight")] == [0, 3, 6]
    assert (tmp_path / "hessians.jsonl").read_text().count("\n") == 3
    # a measurement is fasthess.diag at the current weights in eval mode, with the monitor's settings
    res = mon.measure(100)
    model.eval()
    direct = fasthess.diag(model, loss, num_samples=12, seed=4)
    for name in direct:
        assert torch.equal(res[name].values, direct[name].values)


def test_resumed_monitor_skips_finished_steps(tmp_path) -> None:
    model, loss, opt = _setup()
    first = fasthess.Monitor(model, loss, every=2, out=tmp_path, num_samples=6)
    _train(model, loss, opt, first, range(3))  # measures 0 and 2
    again = fasthess.Monitor(model, loss, every=2, out=tmp_path, num_samples=6)
    assert again.done(0) and again.done(2) and not again.done(4)
    measured = _train(model, loss, opt, again, range(2, 6))
    assert sorted(measured) == [4]
    with open(tmp_path / "rmed.csv", newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert sorted(set(steps)) == [0, 2, 4] and len(steps) == 6


def test_hugging_face_callback_measures_on_step_end(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 30, (4, 7), generator=g), "labels": torch.tensor([0, 1, 1, 0])}
    callback = fasthess.HessianCallback(batch, every=2, out=tmp_path, num_samples=5)
    assert isinstance(callback, transformers.TrainerCallback)
    model.train()
    for step in range(1, 5):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None, model=model)
    assert model.training
    logged = sorted({row["step"] for row in callback.monitor.history})
    assert logged == [2, 4]
    assert all(row["r_med"] >= 1.0 for row in callback.monitor.history)
