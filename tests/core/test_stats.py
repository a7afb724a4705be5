"""Composable statistics: the tracker and the pure pair over a tuple of init/update pairs."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import numpy as np
import pytest

import fimcore
from fimcore.stats import (Condition, Energy, Statistic, StepInputs, make_state,
                           register_statistic)
from tests.conftest import import_backend


class MaxTraceState(NamedTuple):
    max_trace: Any
    last: Any


@register_statistic
@dataclasses.dataclass(frozen=True)
class MaxTrace(Statistic):
    """A toy statistic written the way the documentation says: the largest Tr G so far."""

    scale: float = 1.0
    name = "max_trace"
    fields = ("max_trace", "scaled_trace")

    def init(self, *, xp=None, device=None):
        return make_state(MaxTraceState, dict(max_trace=0.0, last=float("nan")), xp=xp, device=device)

    def update(self, state, step: StepInputs, *, xp):
        trace = xp.sum(xp.linalg.diagonal(step.gram))
        return MaxTraceState(max_trace=xp.maximum(state.max_trace, trace), last=trace)

    def record(self, state):
        return {"max_trace": state.max_trace, "scaled_trace": self.scale * state.last}


GRAMS = [np.diag([4.0, 1.0]), np.diag([9.0, 1.0]), np.diag([2.0, 2.0])]


def test_a_new_statistic_adds_its_fields_keyed_by_name():
    stats = (Condition(), Energy(), MaxTrace(scale=2.0))
    tracker = fimcore.MeasureTracker(statistics=stats)
    for G in GRAMS:
        m = tracker.update(G, lr=0.1)
    assert m.values["max_trace"] == {"max_trace": 10.0, "scaled_trace": 8.0}
    assert m.max_trace == 10.0 and m.c_k == 1.0 and m.C_bar == pytest.approx((4 + 9 + 1) / 3)
    flat = m.to_dict()
    assert flat["scaled_trace"] == 8.0 and fimcore.Measurement.from_dict(flat) == m
    again = fimcore.MeasureTracker()
    again.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert [s.name for s in again.statistics] == ["condition", "energy", "max_trace"]
    assert again.statistics[2].scale == 2.0
    assert again.update(np.diag([20.0, 1.0]), lr=0.1).max_trace == 21.0


def test_pure_pair_carries_every_statistic_under_jit():
    jax = import_backend("jax")
    jnp = import_backend("jax.numpy")
    stats = (Condition(), Energy(), MaxTrace())
    step = jax.jit(lambda s, g: fimcore.measure_update(s, g, lr=0.1, statistics=stats))
    state = fimcore.measure_init(statistics=stats, xp=jnp)
    tracker = fimcore.MeasureTracker(statistics=stats)
    for G in GRAMS:
        state = step(state, jnp.asarray(G))
        m = tracker.update(G, lr=0.1)
    assert float(state.max_trace) == m.max_trace == 10.0
    assert float(state.c_sum / state.measured) == pytest.approx(tracker.C_bar)
    assert float(state.L) == pytest.approx(tracker.L) and int(state.steps) == 3


def test_statistics_are_validated():
    with pytest.raises(TypeError, match="Statistic instances"):
        fimcore.MeasureTracker(statistics=[object()])
    with pytest.raises(ValueError, match="distinct names"):
        fimcore.MeasureTracker(statistics=[Energy(), Energy()])
    with pytest.raises(ValueError, match="not both"):
        fimcore.MeasureTracker(statistics=[Energy()], rtol=0.1)
    state = fimcore.measure_init()
    with pytest.raises(ValueError, match="holds 2 statistics but 1"):
        fimcore.measure_update(state, np.eye(2), lr=0.1, statistics=[Energy()])

    @dataclasses.dataclass(frozen=True)
    class Clash(Statistic):
        name = "clash"
        fields = ("L",)

    with pytest.raises(ValueError, match="reuses record fields"):
        register_statistic(Clash)
    with pytest.raises(ValueError, match="no statistic named"):
        fimcore.stats.statistic_from_config("nope", {})


def test_tracker_accepts_a_gram_result():
    G = np.diag([1.0, 1e-7]).astype(np.float64)
    r = fimcore.GramResult(gram=G, grad_dtype=np.float32, batch_size=8, num_params=10)
    m = fimcore.MeasureTracker().update(r, lr=0.8)
    assert m.batch_size == 8 and m.I_k == pytest.approx(0.1 * np.sqrt(1 + 1e-7))
    assert m.c_k == pytest.approx(1e7) and m.c_k_legacy == 1.0  # float32 gradients: legacy cut
    np.testing.assert_array_equal(np.asarray(r), G)


def test_intermediate_flat_format_loads():
    """The flat format /2 (resolution limits, before composable statistics) loads too."""
    state = {"format": "fimcore.MeasureTracker/2", "rtol": None, "on_nonfinite": "raise",
             "keep_history": False, "steps": 3, "measured": 2, "skipped": 1, "nonfinite": 0,
             "limited": 1, "c_sum": 10.0, "c_jacobian_sum": 4.0, "c_legacy_sum": 6.0,
             "legacy_measured": 2, "L": 0.5, "history": []}
    t = fimcore.MeasureTracker()
    t.load_state_dict(state)
    assert (t.steps, t.measured, t.skipped, t.resolution_limited) == (3, 2, 1, 1)
    assert t.C_bar == 5.0 and t.C_bar_legacy == 3.0 and t.L == 0.5
