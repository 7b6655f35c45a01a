import math

import pytest
import torch

from fasthess import stats


def test_r_med_definition_and_stabilised_variant() -> None:
    h = torch.tensor([0.5, -1.0, 2.0, -8.0])
    assert stats.r_med(h) == pytest.approx(8.0 / 1.5)  # median of |h| = (1 + 2) / 2
    assert stats.r_med(h, stabilized=True) == pytest.approx(8.0 / (1.5 + 0.008))
    assert stats.r_med([3.0, 3.0, 3.0]) == 1.0
    assert stats.r_med([0.0, 0.0, 1.0]) == math.inf
    assert stats.r_med([0.0, 0.0, 1.0], stabilized=True) == pytest.approx(1000.0)


def test_r_med_rejects_nonfinite_and_empty() -> None:
    with pytest.raises(FloatingPointError, match="1 of 3"):
        stats.r_med([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="empty"):
        stats.r_med([])


def test_quantiles_and_ratio() -> None:
    q = stats.quantiles(torch.arange(-4.0, 5.0), qs=(0.0, 0.5, 1.0))
    assert q == {0.0: 0.0, 0.5: 2.0, 1.0: 4.0}
    assert stats.ratio({"a": 3.0, "b": 1.0, "c": 2.0}, {"a": 1.5, "c": 4.0}) == {"a": 2.0, "c": 0.5}
