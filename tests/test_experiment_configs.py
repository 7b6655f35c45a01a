"""The paper presets cannot run here (GPU hours, real data sets), so their configs are checked
for consistency, and the ones on generated data take a step and a Hessian at the paper's size:
a typo in a paper preset must fail here, not hours into a GPU run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import compare_optimizers  # noqa: E402
from optimizers import make_optimizer  # noqa: E402
from tasks import get_task  # noqa: E402

# configs of the optimizer-comparison drivers (compare_optimizers.py, equal_loss.py)
COMPARISONS = sorted(p.stem for p in (ROOT / "experiments/configs").glob("table*.json"))


def _presets(name: str):  # noqa: ANN202
    config = json.loads((ROOT / "experiments/configs" / f"{name}.json").read_text())
    assert set(config) == {"quick", "paper"}, f"{name}: presets {sorted(config)}"
    return config


@pytest.mark.parametrize("name", COMPARISONS)
@pytest.mark.parametrize("preset", ["quick", "paper"])
def test_comparison_preset_is_consistent(name: str, preset: str) -> None:
    cfg = _presets(name)[preset]
    for variant, override in (cfg.get("variants") or {"": {}}).items():
        c = compare_optimizers.merged({k: v for k, v in cfg.items() if k != "variants"}, override)
        where = f"{name}/{preset}{'/' + variant if variant else ''}"
        get_task(c)  # a known task
        weight = torch.nn.Parameter(torch.zeros(2))
        for opt_name, spec in c["optimizers"].items():
            make_optimizer(spec, [weight])  # a known type with valid settings
        assert len(c["optimizers"]) >= 2, f"{where}: a comparison needs a reference and another optimizer"
        steps = c["steps"]
        assert all(0 <= s <= steps for s in c["eval_steps"]), f"{where}: eval_steps {c['eval_steps']} beyond {steps}"
        assert all(0 <= s <= steps for s in c.get("snapshot_steps", [])), f"{where}: snapshot_steps beyond {steps}"
        assert c["repeats"] >= 1 and c["num_samples"] >= 1 and c["checkpoint_every"] >= 1, where
        data = c["data"]
        assert data["hessian_examples"] % data["hessian_micro_batch"] == 0, f"{where}: micro-batches must tile"
        assert data["hessian_examples"] <= data["train_examples"], f"{where}: Hessian batch larger than the data"
        assert data["batch"] <= data["train_examples"], where
        for spec in c["optimizers"].values():
            for phase in spec.get("phases", [])[:-1]:  # a switch happens during the run
                assert 0 < phase["until"] < steps, f"{where}: switch at {phase['until']} outside 1..{steps - 1}"


@pytest.mark.parametrize("name", ["table2b", "table5"])
def test_generated_data_paper_presets_train_and_measure_at_paper_size(name: str, tmp_path: Path) -> None:
    """Tables 2(b) and 5 (paper) need no data set: their full-size models take two steps (small
    batches), then a sampled Hessian, on this CPU."""
    c = _presets(name)["paper"]
    c = compare_optimizers.merged(c, {"steps": 2, "eval_steps": [2], "checkpoint_every": 2, "num_samples": 2,
                                      "data": {"train_examples": 8, "batch": 4, "hessian_examples": 2,
                                               "hessian_micro_batch": 2}})
    data = compare_optimizers.make_data(c, 0)
    name_ = next(iter(c["optimizers"]))
    record = compare_optimizers.run_repeat(c, name_, 0, data, tmp_path)
    assert len(record["losses"]) == 2 and all(torch.isfinite(torch.tensor(record["losses"])))
    r_med = record["hessians"]["2"]["r_med"]
    assert len(r_med) >= 5 and all(v >= 1 for v in r_med.values())
