"""The lean spectrum path of a checked GramResult and the asynchronous MeasureTracker.

Both must give the numbers of the validated synchronous path exactly (same operations on the
same inputs: identical float64 results), and the eigenvalues themselves are checked against a
Gram with a known spectrum (closed form) and against NumPy float64 on J Jᵀ written out here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fimcore
from fimcore import GramResult, MeasureTracker
from fimcore.tracker import PendingMeasurement
from tests.core.helpers import EPS64, to_numpy


def _grams(seed: int = 0, B: int = 6):
    """Grams J Jᵀ of ranks B, B-2 and 1, an all-zero one, float32 and float64 (NumPy)."""
    rng = np.random.default_rng(seed)
    out = []
    for rank, dtype in ((B, np.float64), (B - 2, np.float32), (1, np.float64), (0, np.float32)):
        J = np.zeros((B, 9)) if rank == 0 else rng.normal(size=(rank, 9))
        J = J if rank == 0 else np.concatenate([J, rng.normal(size=(B - rank, rank)) @ J])
        J = J * np.logspace(0, 2, B)[:, None]          # graded rows
        out.append((J.astype(dtype) @ J.astype(dtype).T).astype(dtype))
    return out


def _close_form_gram(xp):
    """Q diag(λ) Qᵀ with a known spectrum (a Householder Q), as a checked GramResult."""
    eigs = np.array([0.0, 1e-3, 0.5, 2.0, 7.0])
    v = np.arange(1.0, 6.0)[:, None]
    Q = np.eye(5) - 2 * (v @ v.T) / float((v.T @ v)[0, 0])
    G = (Q * eigs) @ Q.T
    G = (G + G.T) / 2
    return eigs, GramResult(gram=xp.asarray(G), grad_dtype=xp.asarray(G).dtype, batch_size=5,
                            checked=True)


def test_checked_spectrum_equals_validated_spectrum_exactly(xp):
    for G in _grams():
        g = xp.asarray(G)
        lean = fimcore.spectrum(GramResult(gram=g, grad_dtype=g.dtype, batch_size=G.shape[0],
                                           checked=True))
        full = fimcore.spectrum(g)
        assert np.array_equal(to_numpy(lean), to_numpy(full))
        # and both are the eigenvalues of J Jᵀ (NumPy float64 of the same matrix)
        ref = np.clip(np.linalg.eigvalsh(G.astype(np.float64)), 0, None)
        eps = float(np.finfo(to_numpy(lean).dtype).eps)
        assert np.allclose(to_numpy(lean), ref, rtol=0, atol=64 * G.shape[0] * eps * max(ref.max(), 1))


def test_checked_spectrum_closed_form(xp):
    eigs, result = _close_form_gram(xp)
    got = to_numpy(fimcore.spectrum(result))
    eps = float(np.finfo(got.dtype).eps)
    assert np.allclose(got, eigs, rtol=0, atol=64 * 5 * eps * eigs.max())


def test_checked_spectrum_refuses_a_nonfinite_gram():
    G = np.eye(3)
    G[1, 1] = np.inf
    with pytest.raises(ValueError, match="must be finite"):
        fimcore.spectrum(GramResult(gram=G, grad_dtype=np.float64, batch_size=3, checked=True))


def test_an_unchecked_result_is_validated_in_full():
    G = np.array([[1.0, 0.5], [0.0, 1.0]])              # not symmetric
    with pytest.raises(ValueError, match="must be symmetric"):
        fimcore.spectrum(GramResult(gram=G, grad_dtype=np.float64, batch_size=2))


def _run(tracker, grams, checked):
    out = []
    for i, G in enumerate(grams):
        arg = GramResult(gram=G, grad_dtype=G.dtype, batch_size=G.shape[0], checked=True) if checked else G
        out.append(tracker.update(arg, lr=0.1 * (i + 1), weight=i + 1))
    return out


def _records(ms):
    return [(m.result() if isinstance(m, PendingMeasurement) else m).to_dict() for m in ms]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            u, v = x[key], y[key]
            if isinstance(u, float) and math.isnan(u):
                assert isinstance(v, float) and math.isnan(v), key
            else:
                assert u == v, (key, u, v)


@pytest.mark.parametrize("checked", [False, True])
def test_async_and_checked_trackers_record_the_synchronous_numbers(xp, checked):
    grams = [xp.asarray(G) for G in _grams(1) + _grams(2)]
    sync = MeasureTracker()
    ref = _records(_run(sync, grams, checked=False))
    lean = MeasureTracker()
    _same(_records(_run(lean, grams, checked=checked)), ref)
    asy = MeasureTracker(asynchronous=True)
    pending = _run(asy, grams, checked=checked)
    assert all(isinstance(m, PendingMeasurement) for m in pending)
    _same(_records(pending), ref)
    assert (asy.C_bar, asy.L, asy.steps, asy.skipped) == (sync.C_bar, sync.L, sync.steps, sync.skipped)
    assert asy.state_dict() == sync.state_dict()
    # the records' own values against the Gram: I_k = (lr/B)·sqrt(Tr G) in plain float64
    for i, (G, m) in enumerate(zip(grams, pending)):
        trace = math.fsum(np.diag(to_numpy(G)).astype(np.float64))
        assert math.isclose(m.I_k, 0.1 * (i + 1) / 6 * math.sqrt(trace), rel_tol=1e-6)
        assert m.k == i + 1


def test_async_nonfinite_is_refused_at_update_or_skipped():
    bad = np.eye(3)
    bad[0, 0] = np.nan
    asy = MeasureTracker(asynchronous=True)
    asy.update(np.eye(3), lr=0.1)
    with pytest.raises(ValueError, match="step k=2 must be finite"):
        asy.update(GramResult(gram=bad, grad_dtype=np.float64, batch_size=3, checked=True), lr=0.1)
    skip = MeasureTracker(asynchronous=True, on_nonfinite="skip")
    m = skip.update(GramResult(gram=bad, grad_dtype=np.float64, batch_size=3, checked=True), lr=0.1)
    assert m.finite is False and skip.nonfinite == 1 and skip.skipped == 1


def test_async_error_in_the_worker_is_raised_when_read(monkeypatch):
    asy = MeasureTracker(asynchronous=True)

    def fail(*args):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(asy, "_compute", fail)
    m = asy.update(np.eye(2), lr=0.1)
    with pytest.raises(RuntimeError, match="worker failed"):
        m.c_k
    with pytest.raises(RuntimeError, match="worker failed"):
        asy.wait()  # still pending on the tracker: raised once more, then cleared
    asy.wait()
    monkeypatch.undo()
    assert asy.steps == 0
    assert asy.update(np.eye(2), lr=0.1).k == 1


def test_async_state_round_trip_keeps_the_option():
    asy = MeasureTracker(asynchronous=True)
    for G in _grams(3):
        asy.update(G, lr=0.1)
    state = asy.state_dict()
    other = MeasureTracker(asynchronous=True)
    other.load_state_dict(state)
    assert other.asynchronous and other.state_dict() == state
    assert math.isclose(other.C_bar, asy.C_bar, rel_tol=0) and EPS64 > 0
