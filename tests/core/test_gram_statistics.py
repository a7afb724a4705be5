"""fimcore.stats functions of one Gram against computations from explicit per-sample gradients.

Every reference is NumPy float64 written here from J (B × P) directly — the mean gradient, the
per-sample deviations, projections on the mean, SVD, the P × P Fisher — never from G.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fimcore
from fimcore import stats
from tests.core.helpers import to_numpy

seeds = st.integers(0, 2**32 - 1)


def _J(seed: int, batch: int, cols: int, mean: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return mean * rng.standard_normal(cols) + rng.standard_normal((batch, cols)) * rng.uniform(0.1, 2, (batch, 1))


def _reference(J: np.ndarray) -> dict[str, float]:
    B = J.shape[0]
    gbar = J.mean(axis=0)
    g2 = gbar @ gbar
    dev = J - gbar
    trace_sigma = (dev * dev).sum() / (B - 1)
    g2_unb = g2 - trace_sigma / B
    proj = J @ gbar
    var_p = ((proj - g2) ** 2).sum() / (B - 1)
    orth = J - np.outer(proj / g2, gbar)
    var_o = (orth * orth).sum() / (B - 1)
    return dict(trace_sigma=trace_sigma, g2_unbiased=g2_unb, g2_biased=g2,
                B_simple=trace_sigma / g2_unb if g2_unb > 0 else math.inf,
                norm=math.sqrt(trace_sigma / (B * g2)), inner=math.sqrt(var_p / (B * g2**2)),
                ortho=math.sqrt(var_o / (B * g2)))


@given(batch=st.integers(2, 12), cols=st.integers(1, 20), seed=seeds)
@example(batch=2, cols=1, seed=4_294_967_295)   # ν at rounding level with ‖ḡ‖² = Tr G / 342
def test_noise_scale_and_sampling_tests_against_explicit_gradients(xp, batch, cols, seed):
    J = _J(seed, batch, cols)
    ref = _reference(J)
    G = xp.asarray(J @ J.T)
    r = stats.noise_scale(G)
    for name in ("trace_sigma", "g2_unbiased", "g2_biased"):
        assert float(getattr(r, name)) == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name
    if math.isfinite(ref["B_simple"]) and ref["g2_unbiased"] > 1e-9 * ref["g2_biased"]:
        assert float(r.B_simple) == pytest.approx(ref["B_simple"], rel=1e-7)
    assert float(stats.norm_test(G)) == pytest.approx(ref["norm"], rel=1e-9)
    # θ and ν are square roots of differences. From G the variance is a difference of terms of
    # size Tr G (ν) or max p_i² (θ), so it carries an absolute error of a few ε times those; the
    # root turns that into sqrt(error / (B ‖ḡ‖²)) (resp. ‖ḡ‖⁴): the bound the check allows.
    eps, B, g2 = np.finfo(np.float64).eps, batch, ref["g2_biased"]
    t, p2 = float(np.trace(J @ J.T)), float(np.max((J @ J.mean(axis=0)) ** 2))
    slack_inner = math.sqrt(64 * B * eps * p2 / ((B - 1) * B * g2**2))
    slack_ortho = math.sqrt(64 * B * eps * t / ((B - 1) * B * g2))
    assert float(stats.inner_product_test(G)) == pytest.approx(ref["inner"], rel=1e-7, abs=slack_inner)
    assert float(stats.orthogonality_test(G)) == pytest.approx(ref["ortho"], rel=1e-7, abs=slack_ortho)


@given(batch=st.integers(2, 10), cols=st.integers(2, 12), seed=seeds, scale=st.integers(-4, 4))
def test_statistics_are_invariant_to_batch_order_and_gradient_scale(batch, cols, seed, scale):
    J = _J(seed, batch, cols)
    perm = np.random.default_rng(seed).permutation(batch)
    base = [stats.norm_test(J @ J.T), stats.inner_product_test(J @ J.T),
            stats.orthogonality_test(J @ J.T), stats.effective_rank(J @ J.T),
            stats.stable_rank(J @ J.T)]
    for K in (J[perm], J * 10.0**scale):
        got = [stats.norm_test(K @ K.T), stats.inner_product_test(K @ K.T),
               stats.orthogonality_test(K @ K.T), stats.effective_rank(K @ K.T),
               stats.stable_rank(K @ K.T)]
        np.testing.assert_allclose(np.array(got, float), np.array(base, float), rtol=1e-7, atol=1e-9)
    b = float(stats.noise_scale(J @ J.T).B_simple)
    b2 = float(stats.noise_scale((J * 10.0**scale) @ (J * 10.0**scale).T).B_simple)
    assert b2 == pytest.approx(b, rel=1e-6) or (math.isinf(b) and math.isinf(b2))


@given(batch=st.integers(1, 10), cols=st.integers(1, 15), seed=seeds)
def test_ranks_and_fisher_spectrum_against_svd_and_the_PxP_fisher(xp, batch, cols, seed):
    J = _J(seed, batch, cols)
    s = np.linalg.svd(J, compute_uv=False)
    lam = s**2
    p = lam[lam > 0] / lam.sum()
    G = xp.asarray(J @ J.T)
    assert float(stats.effective_rank(G)) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert float(stats.stable_rank(G)) == pytest.approx(lam.sum() / lam.max(), rel=1e-9)
    F = J.T @ J / batch
    eig_f = np.linalg.eigvalsh(F)
    r = stats.fisher_spectrum_stats(G, cols)
    assert float(r.m_lambda) == pytest.approx(eig_f.mean(), rel=1e-9)
    assert float(r.s_lambda) == pytest.approx((eig_f**2).mean(), rel=1e-9)
    assert float(r.lambda_max) == pytest.approx(eig_f.max(), rel=1e-9)
    bulk = np.sort(lam[lam > 8 * batch * np.finfo(float).eps * lam.max()])
    median = np.median(bulk)
    assert int(r.outliers) == int((bulk > 3.0 * median).sum())


def test_outliers_of_a_spiked_spectrum():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    eigs = np.concatenate([np.full(17, 1.0), [8.0, 9.0, 12.0]])
    G = (q * eigs) @ q.T
    assert int(stats.fisher_spectrum_stats(G, 1000).outliers) == 3
    assert int(stats.fisher_spectrum_stats(G, 1000, outlier_factor=10.0).outliers) == 1


def test_per_layer_blocks_of_column_splits():
    J = _J(3, 6, 10)
    blocks = {"a": J[:, :4] @ J[:, :4].T, "b": J[:, 4:] @ J[:, 4:].T}
    out = stats.per_layer(stats.stable_rank, blocks)
    for name, cols in (("a", slice(0, 4)), ("b", slice(4, 10))):
        s = np.linalg.svd(J[:, cols], compute_uv=False)
        assert float(out[name]) == pytest.approx((s**2).sum() / s.max() ** 2, rel=1e-9)
    with pytest.raises(TypeError, match="dict"):
        stats.per_layer(stats.stable_rank, [blocks["a"]])


def test_bad_input_errors_and_defined_values():
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.noise_scale(np.eye(1))
    for test in (stats.norm_test, stats.inner_product_test, stats.orthogonality_test):
        with pytest.raises(ValueError, match="at least 2 samples"):
            test(np.eye(1))
    zero = np.zeros((3, 3))
    assert math.isnan(float(stats.noise_scale(zero).B_simple))
    assert math.isinf(float(stats.norm_test(zero)))
    assert math.isnan(float(stats.effective_rank(zero))) and math.isnan(float(stats.stable_rank(zero)))
    with pytest.raises(ValueError, match="positive integer"):
        stats.fisher_spectrum_stats(np.eye(2), -3)
    with pytest.raises(TypeError, match="positive integer"):
        stats.fisher_spectrum_stats(np.eye(2), 2.5)
    with pytest.raises(ValueError, match="outlier_factor"):
        stats.fisher_spectrum_stats(np.eye(2), 5, outlier_factor=1.0)
    # cancelling gradients: mean zero, every test is +inf (none can pass)
    J = np.array([[1.0, 2.0], [-1.0, -2.0]])
    assert math.isinf(float(stats.norm_test(J @ J.T)))
    assert math.isinf(float(stats.noise_scale(J @ J.T).B_simple))


def test_composable_statistics_in_the_tracker_match_the_functions():
    rng = np.random.default_rng(1)
    tracker = fimcore.MeasureTracker(statistics=(
        stats.Condition(), stats.Energy(), stats.NoiseScale(decay=0.5), stats.BatchTests(),
        stats.SpectrumShape(), stats.FisherSpectrum(), stats.PerLayer()))
    parts = []
    for k in range(3):
        J = _J(k, 8, 12)
        G = J @ J.T
        m = tracker.update(G, lr=0.1, num_params=12,
                           blocks={"a": J[:, :5] @ J[:, :5].T, "b": J[:, 5:] @ J[:, 5:].T})
        ref = _reference(J)
        parts.append((ref["trace_sigma"], ref["g2_unbiased"]))
        assert m.trace_sigma == pytest.approx(ref["trace_sigma"], rel=1e-9)
        assert m.norm_test == pytest.approx(ref["norm"], rel=1e-9)
        assert m.stable_rank == pytest.approx(float(stats.stable_rank(G)), rel=1e-12)
        assert m.m_lambda == pytest.approx(np.trace(G) / (8 * 12), rel=1e-12)
        assert set(m.per_layer) == {"a", "b"}
        assert m.per_layer["a"]["trace"] == pytest.approx(np.trace(J[:, :5] @ J[:, :5].T), rel=1e-12)
    # bias-corrected EMAs with β = 0.5 over three steps
    w = np.array([0.25, 0.5, 1.0]) * 0.5
    s = sum(wi * p[0] for wi, p in zip(w, parts)) / (1 - 0.5**3)
    g = sum(wi * p[1] for wi, p in zip(w, parts)) / (1 - 0.5**3)
    assert m.trace_sigma_ema == pytest.approx(s, rel=1e-9) and m.B_simple_ema == pytest.approx(s / g, rel=1e-9)
    flat = m.to_dict()
    assert fimcore.Measurement.from_dict(flat) == m
    again = fimcore.MeasureTracker()
    again.load_state_dict(tracker.state_dict())
    assert again.update(J @ J.T, lr=0.1, num_params=12).m_lambda == pytest.approx(m.m_lambda)


def test_statistics_without_their_inputs_record_none():
    tracker = fimcore.MeasureTracker(statistics=(stats.Condition(), stats.FisherSpectrum(),
                                                 stats.PerLayer(), stats.NoiseScale()))
    m = tracker.update(np.eye(1), lr=0.1)
    assert m.m_lambda is None and m.outliers is None and m.per_layer == {}
    assert m.B_simple is None and m.B_simple_ema is None
    np.testing.assert_allclose(to_numpy(stats.noise_scale(np.eye(2)).trace_sigma), 1.0)
