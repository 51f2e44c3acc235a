"""The declared convergence test on validation curves of known values."""

from __future__ import annotations

import math

import pytest

from lora_efficiency.validation import convergence


@pytest.mark.parametrize(
    "curve, status, improvement",
    [
        # the window is the last half (steps 50..100): from the point at step 50 to the last one
        ([(25, 3.0), (50, 2.0), (75, 1.995), (100, 1.99)], "converged", 0.005),
        ([(25, 3.0), (50, 2.0), (75, 1.9), (100, 1.8)], "improving", 0.1),
        ([(40, 2.0), (80, 1.99), (100, 1.985)], "converged", 0.0075),  # the last point at or before step 50
        ([(60, 2.0), (100, 1.9)], "unknown", math.nan),  # no point before the window: never "converged"
        ([(50, 2.0), (90, 1.9)], "unknown", math.nan),  # the curve stops before the last step
        ([(50, 2.0), (100, math.nan)], "unknown", math.nan),
        ([(50, 2.0), (100, 2.1)], "worsened", -0.05),  # rose by more than tol: stopped, but not at its best
        ([(50, 2.0), (100, 2.01)], "converged", -0.005),  # within tol either way
    ],
)
def test_convergence_on_known_curves(curve, status, improvement):
    result = convergence(curve, max_steps=100, tol=0.01)
    assert result.status == status
    if status == "unknown":
        assert math.isnan(result.improvement) and result.metrics() == {}
    else:
        assert result.improvement == pytest.approx(improvement)
        assert result.metrics()["val/converged"] == float(status == "converged")
