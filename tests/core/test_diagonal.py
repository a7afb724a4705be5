"""fimcore.diagonal: the closed forms of Î1, Î2, V1, V2 and their bounds.

References share no code with the module: label enumeration (categorical, exact expectations),
Monte-Carlo label draws (both likelihoods), an explicit basis of symmetric matrices for the
fourth-moment matrix 𝓜, and the simple bounds λ_max(𝓘) ≤ min(max p, 1/2), V1 ≤ ‖u‖⁴.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fimcore import diagonal as dg

from .helpers import to_numpy

seeds = st.integers(0, 2**32 - 1)


def _case(seed, n=3, c=4, k=5, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, c, k)), rng.normal(size=(n, c, k)),
            scale * rng.normal(size=(n, c)))


def _softmax(h):
    e = np.exp(h - h.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _sums(u, w, h, s, likelihood, estimator, variance=True):
    return dg.diagonal_sums(u, w, h, s, likelihood=likelihood, estimator=estimator,
                            variance=variance)


@given(seeds, st.sampled_from([2, 3, 5]), st.sampled_from([0.1, 1.0, 5.0]))
def test_categorical_closed_forms_match_label_enumeration(seed, c, scale):
    u, w, h = _case(seed, c=c, scale=scale)
    p = _softmax(h)
    # one input at a time, every label y weighted by p_y: exact mean and variance of the summands
    for n in range(u.shape[0]):
        s = np.eye(c) - p[n]                                     # rows s_y = e_y − p
        g1 = (s @ u[n]) ** 2                                     # (C, K) Î1 summand per label
        fisher = np.diag(p[n]) - np.outer(p[n], p[n])
        g2 = np.einsum("ck,cd,dk->k", u[n], fisher, u[n])[None] - s @ w[n]
        mean1, mean2 = p[n] @ g1, p[n] @ g2
        var1, var2 = p[n] @ (g1 - mean1) ** 2, p[n] @ (g2 - mean2) ** 2
        one = slice(n, n + 1)
        ex = _sums(u[one], w[one], h[one], None, "categorical", "exact").values
        r1 = _sums(u[one], w[one], h[one], s[None], "categorical", "i1")
        r2 = _sums(u[one], w[one], h[one], s[None], "categorical", "i2")
        np.testing.assert_allclose(ex, mean1, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ex, mean2, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r1.variance, var1, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(r2.variance, var2, rtol=1e-8, atol=1e-12)
        # with all C labels as the M draws, the label mean is uniform, not p-weighted
        np.testing.assert_allclose(r1.values, g1.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(r2.values, g2.mean(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_variances_match_monte_carlo_over_label_draws(likelihood):
    rng = np.random.default_rng(7)
    u, w, h = _case(3, n=1, c=4, k=6)
    draws = 4000
    if likelihood == "categorical":
        p = _softmax(h)[0]
        labels = rng.choice(4, size=(1, draws), p=p)
        s = dg.residuals(h, labels, "categorical")
    else:
        s = rng.normal(size=(1, draws, 4))                       # y − h ~ N(0, I)
    per_draw = {}
    for est in ("i1", "i2"):
        # each draw alone (M = 1) gives one summand; their sample variance against V
        one = [_sums(u, w, h, s[:, m:m + 1], likelihood, est, variance=False).values
               for m in range(draws)]
        per_draw[est] = np.stack(one)
    exact = _sums(u, w, h, None, likelihood, "exact").values
    for est in ("i1", "i2"):
        x = per_draw[est]
        closed = _sums(u, w, h, s[:, :1], likelihood, est).variance
        sample_var = x.var(0, ddof=1)
        centred = x - x.mean(0)
        se_var = np.sqrt(np.maximum((centred ** 4).mean(0) - sample_var ** 2, 0) / draws)
        np.testing.assert_array_less(np.abs(sample_var - closed), 5 * se_var + 1e-12)
        se_mean = np.sqrt(sample_var / draws)
        np.testing.assert_array_less(np.abs(x.mean(0) - exact), 5 * se_mean + 1e-12)


def test_gaussian_closed_forms():
    u, w, h = _case(1, n=2, c=3, k=4)
    s = np.zeros((2, 1, 3))
    r1 = _sums(u, w, h, s, "gaussian", "i1")
    r2 = _sums(u, w, h, s, "gaussian", "i2")
    norm_u = (u ** 2).sum(1)
    np.testing.assert_allclose(_sums(u, w, h, s, "gaussian", "exact").values, norm_u.sum(0))
    np.testing.assert_allclose(r1.variance, (2 * norm_u ** 2).sum(0))
    np.testing.assert_allclose(r2.variance, (w ** 2).sum((0, 1)))
    np.testing.assert_allclose(r2.values, norm_u.sum(0))          # s = 0: Î2 = exact
    for r in (r1, r2):                                            # bounds are equalities
        np.testing.assert_allclose(r.lower, r.variance)
        np.testing.assert_allclose(r.upper, r.variance)


def _sym_basis(d):
    basis = []
    for a in range(d):
        for b in range(a, d):
            e = np.zeros((d, d))
            e[a, b] = e[b, a] = 1.0 if a == b else 1 / np.sqrt(2)
            basis.append(e)
    return basis


def _moment_matrix_spectrum(p):
    """λ of Cov_y[svec(r rᵀ)] on Sym²(1^⊥) from an explicit orthonormal basis (reference)."""
    c = p.size
    q, _ = np.linalg.qr(np.eye(c) - 1.0 / c)
    q = q[:, : c - 1]                                             # orthonormal basis of 1^⊥
    r = (np.eye(c) - p) @ q                                       # rows r_y = Qᵀ(e_y − p)
    phi = np.array([[np.sum(e * np.outer(ry, ry)) for e in _sym_basis(c - 1)] for ry in r])
    mean = p @ phi
    cov = (phi - mean).T @ (p[:, None] * (phi - mean))
    return np.linalg.eigvalsh(cov)


@given(seeds, st.sampled_from([2, 3, 4, 6]), st.sampled_from([0.3, 1.0, 4.0]))
def test_categorical_spectra_match_explicit_basis(seed, c, scale):
    h = scale * np.random.default_rng(seed).normal(size=(2, c))
    p = _softmax(h)
    i_min, i_max, m_min, m_max = dg._categorical_spectra(p, dg.resolve_namespace(p))
    for n in range(2):
        ref = _moment_matrix_spectrum(p[n])
        np.testing.assert_allclose(m_max[n], ref[-1], rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(m_min[n], max(ref[0], 0.0), atol=1e-12)
        eig = np.linalg.eigvalsh(np.diag(p[n]) - np.outer(p[n], p[n]))
        np.testing.assert_allclose([i_min[n], i_max[n]], [eig[1], eig[-1]], atol=1e-14)
        assert i_max[n] <= min(p[n].max(), 0.5) + 1e-15          # the simple bound


@given(seeds, st.sampled_from([2, 3, 10]), st.sampled_from([0.1, 1.0, 8.0]))
def test_bounds_hold_and_are_tighter_than_simple_ones(seed, c, scale):
    u, w, h = _case(seed, n=4, c=c, k=7, scale=scale)
    s = np.zeros((4, 1, c))
    for est in ("i1", "i2"):
        per_input = [_sums(u[n:n + 1], w[n:n + 1], h[n:n + 1], s[n:n + 1], "categorical", est)
                     for n in range(4)]
        for r in per_input:
            tol = 1e-12 * (1 + np.abs(r.upper))
            assert np.all(r.lower <= r.variance + tol)
            assert np.all(r.variance <= r.upper + tol)
        if est == "i1":
            simple = ((u ** 2).sum(1) ** 2)                       # V1 ≤ ‖u‖⁴
            uppers = np.stack([r.upper for r in per_input])
            assert np.all(uppers <= simple * (1 + 1e-12))


def test_v2_is_zero_when_w_is_zero():
    u, _, h = _case(2)
    s = dg.residuals(h, np.array([[0], [1], [2]]), "categorical")
    for lik in ("categorical", "gaussian"):
        ss = s if lik == "categorical" else np.ones((3, 1, 4))
        r = _sums(u, np.zeros_like(u), h, ss, lik, "i2")
        assert np.all(r.variance == 0) and np.all(r.upper == 0)
        np.testing.assert_allclose(r.values, _sums(u, None, h, None, lik, "exact").values)


def test_backends_agree(xp):
    u, w, h = _case(5)
    s = dg.residuals(h, np.array([[0, 1], [1, 3], [2, 2]]), "categorical")
    ref = _sums(u, w, h, s, "categorical", "i1")
    got = dg.diagonal_sums(xp.asarray(u), xp.asarray(w), xp.asarray(h), xp.asarray(s),
                           likelihood="categorical", estimator="i1", variance=True)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-10, atol=1e-12)


def test_result_groups_and_chebyshev():
    values = {"fc.weight": np.full((2, 3), 2.0), "fc.bias": np.full(2, 2.0),
              "out.weight": np.array([1.0])}
    var = {"fc.weight": np.full((2, 3), 4.0), "fc.bias": np.full(2, 4.0), "out.weight": np.zeros(1)}
    res = dg.DiagonalFisher(values, var, dg.DiagonalBounds(var, var), "i1", "categorical", 5, 1)
    g = res.groups(0.1, delta=0.05)
    assert set(g) == {"fc", "out"} and g["fc"].size == 8
    assert g["fc"].fisher == 2.0 and g["fc"].std == 2.0
    assert g["fc"].samples == int(np.ceil(4.0 / (0.05 * 0.2 ** 2)))   # ε relative: 0.1·2
    assert g["out"].samples == 1
    assert res.groups(0.5, relative=False)["fc"].samples == int(np.ceil(4.0 / (0.05 * 0.25)))


@pytest.mark.parametrize("bad, err, match", [
    (dict(likelihood="poisson"), ValueError, "likelihood must be one of"),
    (dict(estimator="i3"), ValueError, "estimator must be one of"),
    (dict(mc_samples=0), ValueError, "mc_samples must be >= 1"),
    (dict(mc_samples=1.5), TypeError, "mc_samples must be an integer"),
])
def test_bad_options(bad, err, match):
    opts = dict(likelihood="categorical", estimator="i1", mc_samples=1) | bad
    with pytest.raises(err, match=match):
        dg.check_options(**opts)


def test_bad_outputs_and_labels():
    with pytest.raises(ValueError, match=r"outputs shaped \(N, C\)"):
        dg.check_outputs(np.zeros((2, 3, 4)), "categorical")
    with pytest.raises(ValueError, match="C >= 2"):
        dg.check_outputs(np.zeros((2, 1)), "categorical")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        dg.check_outputs(np.array([[0.0, np.nan]]), "gaussian")
    with pytest.raises(ValueError, match=r"lie in \[0, C\)"):
        dg.residuals(np.zeros((1, 3)), np.array([[3]]), "categorical")
    with pytest.raises(ValueError, match="gaussian labels"):
        dg.residuals(np.zeros((1, 3)), np.zeros((1, 1, 2)), "gaussian")
