"""MeasureTracker and the pure measure_init/measure_update pair.

C̄_K and L_K are recomputed in plain Python from the records; each record's c_k and I_k
against NumPy float64 computed from the known spectrum / row norms.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fimcore
from tests.conftest import import_backend
from tests.core.helpers import EPS64, to_numpy
from tests.strategies import spd_with_spectrum

RTOL = 1e-10  # explicit truncation: well clear of the oracle spectra and of float64 noise


def _steps():
    """A measured step: (Gram case or None for an all-zero Gram, lr, weight)."""
    return st.tuples(
        st.none() | spd_with_spectrum(sizes=(1, 3, 4)),
        # 0 or a normal lr whose I_k stays normal: XLA on CPU flushes subnormal results to zero
        st.just(0.0) | st.floats(1e-12, 1.0),
        st.integers(1, 50),
    )


@given(steps=st.lists(_steps(), min_size=1, max_size=6))
def test_records_and_running_measures_against_plain_python(xp, steps):
    tracker = fimcore.MeasureTracker(rtol=RTOL)
    records = []
    for case, lr, weight in steps:
        G = np.zeros((4, 4)) if case is None else case.G
        records.append(tracker.update(xp.asarray(G), lr=lr, weight=weight))
    for (case, lr, weight), m in zip(steps, records):
        B = 4 if case is None else case.G.shape[0]
        trace = 0.0 if case is None else math.fsum(case.eigs)
        assert m.defined is (case is not None) and m.finite
        assert math.isclose(m.I_k, lr / B * math.sqrt(trace), rel_tol=1e-12, abs_tol=0)
        if case is None:
            assert m.c_k is None and m.c_k_jacobian is None and m.I_k == 0.0
        else:
            expected = case.eigs[-1] / min(v for v in case.eigs if v > RTOL * case.eigs[-1])
            tol = 64 * B * EPS64 * expected
            assert math.isclose(m.c_k, expected, rel_tol=tol)
            assert math.isclose(m.c_k_jacobian, math.sqrt(m.c_k), rel_tol=4 * EPS64)
    # running measures from the records, in plain Python
    for K in range(1, len(records) + 1):
        seen = records[:K]
        cs = [m.c_k for m in seen if m.c_k is not None]
        cjs = [m.c_k_jacobian for m in seen if m.c_k_jacobian is not None]
        m = seen[-1]
        assert m.k == K
        assert m.C_bar == (pytest.approx(sum(cs) / len(cs), rel=1e-14) if cs else None)
        assert m.C_bar_jacobian == (pytest.approx(sum(cjs) / len(cjs), rel=1e-14) if cjs else None)
        assert m.L == pytest.approx(sum(r.weight * r.I_k for r in seen), rel=1e-14, abs=0)
    assert tracker.steps == len(steps)
    assert tracker.skipped == sum(case is None for case, _, _ in steps)
    assert tracker.measured + tracker.skipped == tracker.steps
    assert tracker.history == tuple(records)
    assert tracker.C_bar == records[-1].C_bar and tracker.L == records[-1].L


def test_zero_gram_is_undefined_skipped_and_adds_zero_to_L(xp):
    tracker = fimcore.MeasureTracker()
    first = tracker.update(xp.asarray(np.diag([9.0, 1.0])), lr=0.2)
    zero = tracker.update(xp.zeros((2, 2), dtype=xp.float64), lr=0.2, weight=3)
    assert (zero.defined, zero.c_k, zero.c_k_jacobian, zero.I_k, zero.rank) == (False, None, None, 0.0, 0)
    assert tracker.skipped == 1 and tracker.measured == 1 and tracker.steps == 2
    assert tracker.C_bar == first.c_k == pytest.approx(9.0)
    assert tracker.L == first.L
    assert json.loads(json.dumps(zero.to_dict()))["c_k"] is None


def test_nonfinite_gram_raises_naming_the_step(xp):
    tracker = fimcore.MeasureTracker()
    tracker.update(xp.asarray(np.eye(2)), lr=0.1)
    bad = xp.asarray([[1.0, float("inf")], [float("inf"), 1.0]])
    with pytest.raises(ValueError, match="at step k=2 must be finite"):
        tracker.update(bad, lr=0.1)
    assert tracker.steps == 1  # a raising update leaves the state untouched


def test_nonfinite_gram_skipped_when_asked(xp):
    tracker = fimcore.MeasureTracker(on_nonfinite="skip")
    tracker.update(xp.asarray(np.diag([4.0, 1.0])), lr=0.1)
    L = tracker.L
    m = tracker.update(xp.asarray([[float("nan"), 0.0], [0.0, 1.0]]), lr=0.1)
    assert (m.finite, m.defined, m.c_k, m.I_k, m.trace) == (False, False, None, None, None)
    assert tracker.skipped == 1 and tracker.nonfinite == 1 and tracker.L == L
    assert tracker.C_bar == pytest.approx(4.0)
    json.dumps(tracker.state_dict())


def test_graded_eigenvalue_is_kept_and_legacy_value_recorded(xp):
    """diag(1, 1e-7) is exact in any dtype: the resolved rank keeps 1e-7; the legacy tolerance
    B·eps32·λ_max (≈ 2.4e-7) cut it, and the record keeps that value beside the new one."""
    G = xp.asarray(np.diag([1.0, 1e-7]))
    for grad_dtype in (None, xp.float32):
        m = fimcore.MeasureTracker().update(G, lr=0.1, grad_dtype=grad_dtype)
        assert m.c_k == pytest.approx(1e7, rel=1e-12) and m.rank == 2 and m.zero_rows == 0
        assert not m.resolution_limited and m.c_limit > 1e12
    m = fimcore.MeasureTracker().update(G, lr=0.1, grad_dtype=xp.float32)
    assert m.c_k_legacy == 1.0
    assert fimcore.MeasureTracker().update(G, lr=0.1).c_k_legacy == pytest.approx(1e7)


def test_batch_size_overrides_gram_size_in_I_k(xp):
    m = fimcore.MeasureTracker().update(xp.asarray(np.diag([3.0, 1.0])), lr=0.5, batch_size=8)
    assert m.I_k == pytest.approx(0.5 / 8 * 2.0) and m.batch_size == 8


@given(steps=st.lists(_steps(), min_size=2, max_size=6), cut=st.integers(1, 5))
def test_state_round_trip_mid_stream_continues_identically(steps, cut):
    cut = min(cut, len(steps) - 1)
    grams = [np.zeros((3, 3)) if c is None else c.G for c, _, _ in steps]
    straight = fimcore.MeasureTracker()
    for G, (_, lr, w) in zip(grams, steps):
        straight.update(G, lr=lr, weight=w)
    first = fimcore.MeasureTracker()
    for G, (_, lr, w) in zip(grams[:cut], steps[:cut]):
        first.update(G, lr=lr, weight=w)
    resumed = fimcore.MeasureTracker(rtol=0.5)  # configuration is restored too
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for G, (_, lr, w) in zip(grams[cut:], steps[cut:]):
        resumed.update(G, lr=lr, weight=w)
    assert resumed.history == straight.history
    assert resumed.state_dict() == straight.state_dict()


def _pure_vs_class(xp, grams, lrs, weights, *, update):
    tracker = fimcore.MeasureTracker(on_nonfinite="skip")
    state = fimcore.measure_init()
    for G, lr, w in zip(grams, lrs, weights):
        record = tracker.update(xp.asarray(G), lr=lr, weight=w)
        state = update(state, xp.asarray(G), lr, w)
        assert int(state.steps) == record.k
        assert bool(state.defined) is record.defined and bool(state.finite) is record.finite
        if record.defined:
            assert float(state.c_k) == pytest.approx(record.c_k, rel=1e-13)
        else:
            assert math.isnan(float(state.c_k))
        if record.finite:
            assert float(state.I_k) == pytest.approx(record.I_k, rel=1e-13)
            assert int(state.rank) == record.rank
    assert int(state.measured) == tracker.measured and int(state.skipped) == tracker.skipped
    assert int(state.nonfinite) == tracker.nonfinite
    assert float(state.L) == pytest.approx(tracker.L, rel=1e-13)
    assert float(state.c_sum) / int(state.measured) == pytest.approx(tracker.C_bar, rel=1e-13)
    assert float(state.c_jacobian_sum) / int(state.measured) == pytest.approx(
        tracker.C_bar_jacobian, rel=1e-13
    )


def _stream():
    rng = np.random.default_rng(7)
    J = rng.standard_normal((4, 6))
    nan = np.full((4, 4), np.nan)
    grams = [J @ J.T, np.zeros((4, 4)), 2.5 * (J @ J.T), nan, J[:, :2] @ J[:, :2].T]
    return grams, [0.1, 0.1, 0.05, 0.05, 0.01], [1, 2, 3, 1, 5]


def test_pure_update_matches_class_eagerly(xp):
    _pure_vs_class(xp, *_stream(), update=lambda s, G, lr, w: fimcore.measure_update(s, G, lr=lr, weight=w))


def test_pure_update_under_jax_jit_matches_class():
    jax = import_backend("jax")
    jnp = import_backend("jax.numpy")
    step = jax.jit(lambda s, G, lr, w: fimcore.measure_update(s, G, lr=lr, weight=w))
    _pure_vs_class(jnp, *_stream(), update=step)
    # as a lax.scan carry: the state built in the namespace keeps its dtypes
    grams, lrs, weights = _stream()

    def body(state, xs):
        G, lr, w = xs
        return fimcore.measure_update(state, G, lr=lr, weight=w), state.L

    final, _ = jax.lax.scan(
        body, fimcore.measure_init(xp=jnp),
        (jnp.asarray(np.stack(grams)), jnp.asarray(lrs), jnp.asarray(weights, dtype=jnp.float64)),
    )
    tracker = fimcore.MeasureTracker(on_nonfinite="skip")
    for G, lr, w in zip(grams, lrs, weights):
        tracker.update(G, lr=lr, weight=w)
    assert float(final.L) == pytest.approx(tracker.L, rel=1e-13)
    assert int(final.skipped) == tracker.skipped == 2


def test_measure_init_in_namespace(xp):
    state = fimcore.measure_init(xp=xp)
    assert state.c_sum.dtype == xp.float64 and state.defined.dtype == xp.bool
    state = fimcore.measure_update(state, xp.asarray(np.diag([2.0, 1.0])), lr=1.0)
    assert float(state.c_sum) == pytest.approx(2.0) and int(state.measured) == 1
    assert float(to_numpy(state.L)) == pytest.approx(math.sqrt(3.0) / 2)


# --- bad input ---------------------------------------------------------------------------


def test_tracker_option_errors():
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        fimcore.MeasureTracker(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="0 <= rtol < 1"):
        fimcore.MeasureTracker(rtol=2.0)
    with pytest.raises(ValueError, match="state must be a dict returned by"):
        fimcore.MeasureTracker().load_state_dict({"steps": 3})


def test_update_errors(xp):
    tracker = fimcore.MeasureTracker()
    G = xp.asarray(np.eye(3))
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        tracker.update(G, lr=-1e-3)
    with pytest.raises(ValueError, match="weight must be a finite number > 0"):
        tracker.update(G, lr=0.1, weight=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        tracker.update(G, lr=0.1, batch_size=0)
    with pytest.raises(ValueError, match="must be square"):
        tracker.update(xp.ones((3, 2), dtype=xp.float64), lr=0.1)
    with pytest.raises(ValueError, match="at step k=1 must be symmetric"):
        tracker.update(xp.asarray([[1.0, 2.0], [0.0, 1.0]]), lr=0.1)
    with pytest.raises(TypeError, match="real floating-point dtype"):
        tracker.update(xp.ones((2, 2), dtype=xp.int32), lr=0.1)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        fimcore.measure_update(fimcore.measure_init(), G, lr=-1.0)
    assert tracker.steps == 0


def test_measurement_from_dict_rejects_unknown_fields():
    m = fimcore.MeasureTracker().update(np.eye(2), lr=0.1)
    assert fimcore.Measurement.from_dict(m.to_dict()) == m
    with pytest.raises(ValueError, match="must have the fields"):
        fimcore.Measurement.from_dict({**m.to_dict(), "extra": 1})


def test_update_rejects_non_arrays_and_traced_grams():
    with pytest.raises(TypeError, match="array-API namespace"):
        fimcore.MeasureTracker().update([[1.0, 0.0], [0.0, 1.0]], lr=0.1)
    jax = import_backend("jax")
    jnp = import_backend("jax.numpy")
    tracker = fimcore.MeasureTracker()
    with pytest.raises(TypeError, match="needs a concrete Gram"):
        jax.jit(lambda G: tracker.update(G, lr=0.1).k)(jnp.eye(2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_every_kind_of_nonfinite_entry_is_caught(xp, bad):
    G = np.diag([2.0, 1.0, 1.0])
    G[0, 2] = G[2, 0] = bad
    state = fimcore.measure_update(fimcore.measure_init(), xp.asarray(G), lr=0.1)
    assert not bool(state.finite) and not bool(state.defined) and int(state.nonfinite) == 1
    with pytest.raises(ValueError, match="must be finite"):
        fimcore.spectrum(xp.asarray(G))
    m = fimcore.MeasureTracker(on_nonfinite="skip").update(xp.asarray(G), lr=0.1)
    assert m.finite is False and m.I_k is None
