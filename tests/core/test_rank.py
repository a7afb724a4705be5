"""The resolved rank of c_k (fimcore.rank) against independent float64 truths.

Truths come from the singular values of J in float64 (``numpy.linalg.svd``, which resolves
σ_min to absolute accuracy ~eps64·σ_max, i.e. λ_min = σ_min² to relative ~eps64·sqrt(c)),
never from the code under test. J is stored in float32 or float64; its Gram is accumulated in
float32 or float64; the truth is the exact spectrum of the J that was actually stored.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fimcore
from fimcore.rank import SEPARATION, SLACK, _separated_minimum, rank_tolerance, resolved
from fimcore.spectral import _eigs
from tests.conftest import import_backend
from tests.core.helpers import to_numpy

seeds = st.integers(0, 2**32 - 1)


def _svd_condition(J: np.ndarray, rank: int) -> float:
    """σ_1² / σ_r² of the stored J (float64 SVD)."""
    s = np.linalg.svd(J.astype(np.float64), compute_uv=False)
    return float((s[0] / s[rank - 1]) ** 2)


def _unit_rows(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    Q = rng.standard_normal((rows, cols))
    return Q / np.linalg.norm(Q, axis=1, keepdims=True)


def _log_uniform_scales(rng: np.random.Generator, rows: int, decades: float) -> np.ndarray:
    """Row norms log-uniform over [10^-decades, 1], both ends present."""
    logs = rng.uniform(-decades, 0.0, size=rows)
    logs[:2] = (0.0, -decades)
    return 10.0 ** rng.permutation(logs)


def _grams(J32: np.ndarray, xp) -> dict[str, object]:
    """The Gram of float32 J accumulated in float32 and in float64."""
    return {"float32 accumulation": fimcore.gram(xp.asarray(J32)),
            "float64 accumulation": fimcore.gram(xp.asarray(J32.astype(np.float64)))}


@given(batch=st.sampled_from([16, 64, 256]), decades=st.floats(0.0, 5.0), seed=seeds)
def test_graded_grams_resolved_to_one_percent(xp, batch, decades, seed):
    """J = D·Q, unit rows Q (P = 8B), D log-uniform over [10^-decades, 1]; c_k ≤ 1e10."""
    rng = np.random.default_rng(seed)
    J32 = (_log_uniform_scales(rng, batch, decades)[:, None]
           * _unit_rows(rng, batch, 8 * batch)).astype(np.float32)
    truth = _svd_condition(J32, batch)
    assume(truth <= 1e10)
    for name, G in _grams(J32, xp).items():
        r = fimcore.resolution(G, grad_dtype=xp.float32)
        assert int(r.rank) == batch and int(r.zero_rows) == 0, name
        assert float(r.c) == pytest.approx(truth, rel=1e-2), name
        assert not bool(r.limited), name
        legacy = float(fimcore.truncated_condition_number(
            G, rtol=fimcore.default_rtol(batch, np.float32)))
        if truth > 2 / (batch * float(np.finfo(np.float32).eps)):
            assert legacy < truth / 2  # the old tolerance cut real eigenvalues here


def _rank_deficient(kind: str, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, int]:
    """(J in float64, its exact rank) for the four kinds of null directions."""
    if kind == "tall":                         # B > P: rank P
        cols = batch // 4
        return rng.standard_normal((batch, cols)), cols
    cols = 4 * batch
    if kind == "duplicated":                   # a quarter of the rows repeat others
        J = rng.standard_normal((batch, cols))
        copies = batch // 4
        J[-copies:] = J[:copies]
        return J, batch - copies
    if kind == "subspace":                     # rows in a random r-dimensional subspace
        rank = batch // 2
        return rng.standard_normal((batch, rank)) @ _unit_rows(rng, rank, cols), rank
    J = rng.standard_normal((batch, cols))     # zero rows: samples with a zero gradient
    zeros = batch // 4
    J[rng.permutation(batch)[:zeros]] = 0.0
    return J, batch - zeros


@given(kind=st.sampled_from(["tall", "duplicated", "subspace", "zero_rows"]),
       batch=st.sampled_from([8, 32, 96]), decades=st.floats(0.0, 3.0),
       dtype=st.sampled_from(["float32", "float64"]), seed=seeds)
def test_rank_deficient_grams_exclude_exactly_the_null_directions(xp, kind, batch, decades,
                                                                  dtype, seed):
    rng = np.random.default_rng(seed)
    J, rank = _rank_deficient(kind, rng, batch)
    J = (J * _log_uniform_scales(rng, batch, decades)[:, None]).astype(dtype)
    truth = _svd_condition(J, rank)
    accumulations = [dtype] if dtype == "float64" else ["float32", "float64"]
    for acc in accumulations:
        G = fimcore.gram(xp.asarray(J.astype(acc)))
        r = fimcore.resolution(G, grad_dtype=getattr(xp, dtype))
        assert int(r.rank) == rank, (kind, acc)
        assert int(r.zero_rows) == (batch - rank if kind == "zero_rows" else 0)
        assert float(r.c) == pytest.approx(truth, rel=1e-2), (kind, acc)
        assert float(r.c) < float(r.limit)


def test_singular_float32_grams_give_no_rounding_garbage(xp):
    """B > P in float32: rounding noise in the null space never becomes λ_min⁺."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        J = rng.standard_normal((64, 8)).astype(np.float32)
        truth = _svd_condition(J, 8)
        G = fimcore.gram(xp.asarray(J))
        c = float(fimcore.truncated_condition_number(G))
        assert c == pytest.approx(truth, rel=1e-2) and c < 1e4
        assert float(fimcore.truncated_condition_number(G, rtol=0.0)) > 1e6  # rtol=0 keeps noise


def test_projection_takes_the_resolved_subspace_not_the_rth_largest(xp):
    """Two duplicated unit rows (rounding 1e-7 in their product) and a row of norm 1e-4.

    The rounding puts a noise eigenvalue 1e-7 above the real one, 1e-8; the rank is 2
    either way, but only the projection finds λ_min⁺ = 1e-8 (c = 2e8, not 2e7).
    """
    G = np.array([[1.0, 1.0 - 1e-7, 0.0], [1.0 - 1e-7, 1.0, 0.0], [0.0, 0.0, 1e-8]])
    eigs = np.linalg.eigvalsh(G)
    assert eigs[0] < 2e-8 and eigs[1] == pytest.approx(1e-7, rel=1e-6)
    r = fimcore.resolution(xp.asarray(G, dtype=xp.float32))
    assert int(r.rank) == 2
    assert float(r.c) == pytest.approx(2e8, rel=1e-3)


@given(batch=st.sampled_from([5, 12, 40]), kind=st.sampled_from(["full", "deficient", "zeros"]),
       decades=st.floats(0.0, 4.0), seed=seeds)
def test_host_fast_route_equals_projection_route(batch, kind, decades, seed):
    """The Cholesky shortcut (full rank) and the value-independent projection agree."""
    rng = np.random.default_rng(seed)
    cols = batch // 2 if kind == "deficient" else 3 * batch
    J = rng.standard_normal((batch, cols)) * _log_uniform_scales(rng, batch, decades)[:, None]
    if kind == "zeros":
        J[0] = 0.0
    G = J @ J.T
    sym = (G + G.T) / 2
    eigs = _eigs(sym, xp=np)
    eps = float(np.finfo(np.float64).eps)
    fast = resolved(sym, eigs, eps_acc=eps, eps_grad=eps, xp=np, project=False)
    proj = resolved(sym, eigs, eps_acc=eps, eps_grad=eps, xp=np, project=True)
    assert int(fast.rank) == int(proj.rank) and int(fast.zero_rows) == int(proj.zero_rows)
    # the separated shortcut is exact to 1/SEPARATION by Weyl's inequality, the others to rounding
    assert float(fast.c) == pytest.approx(float(proj.c), rel=2 / SEPARATION)
    assert float(fast.limit) == float(proj.limit)


def test_separated_shortcut_taken_only_when_weyl_bound_holds():
    """Deficient but well separated: the eigvalsh-only shortcut answers (and matches the
    projection); the noisy duplicated-rows case of the test above must fall back."""
    rng = np.random.default_rng(3)
    J = rng.standard_normal((40, 20))
    sym = J @ J.T
    sym = (sym + sym.T) / 2
    eigs = _eigs(sym, xp=np)
    d = np.sqrt(np.diag(sym))
    c_mat = sym / np.outer(d, d)
    tau = rank_tolerance(40, np.float64)
    got = _separated_minimum(c_mat, eigs, np.diag(sym), tau, xp=np)
    assert got is not None and int(got[1]) == 20
    proj = resolved(sym, eigs, eps_acc=float(np.finfo(float).eps), eps_grad=float(np.finfo(float).eps),
                    xp=np, project=True)
    assert float(got[0]) == pytest.approx(float(proj.lambda_min), rel=1 / SEPARATION)
    G = np.array([[1.0, 1.0 - 1e-7, 0.0], [1.0 - 1e-7, 1.0, 0.0], [0.0, 0.0, 1e-8]], dtype=np.float32)
    G64 = G.astype(np.float64)
    d = np.sqrt(np.diag(G64))
    tau32 = rank_tolerance(3, np.float32)
    assert _separated_minimum(G64 / np.outer(d, d), np.linalg.eigvalsh(G64), np.diag(G64), tau32,
                              xp=np) is None


@given(batch=st.sampled_from([4, 16]), seed=seeds, scale=st.integers(-8, 8))
def test_resolution_is_invariant_to_scale_and_permutation(xp, batch, seed, scale):
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((batch, batch // 2)) * _log_uniform_scales(rng, batch, 3.0)[:, None]
    G = J @ J.T
    perm = rng.permutation(batch)
    base = fimcore.resolution(xp.asarray(G))
    for other in (G[np.ix_(perm, perm)], G * 10.0**scale):
        r = fimcore.resolution(xp.asarray(other))
        assert int(r.rank) == int(base.rank) == batch // 2
        assert float(r.c) == pytest.approx(float(base.c), rel=1e-8)


def test_resolution_limit_and_flag(xp):
    eps64 = float(np.finfo(np.float64).eps)
    # the eigen-solver's floor 8·B·eps·λ_max: a 1e-16 eigenvalue is beyond it
    r = fimcore.resolution(xp.asarray(np.diag([1.0, 1e-16])))
    assert float(r.limit) == pytest.approx(1 / (SLACK * 2 * eps64))
    assert bool(r.limited) and int(r.rank) == 2
    # the data floor τ·min G_ii for a float32 Gram: c_limit = λ_max / (τ·G_min)
    G = np.diag([1.0, 1e-3]).astype(np.float32)
    r = fimcore.resolution(xp.asarray(G))
    tau = fimcore.rank_tolerance(2, np.float32)
    assert float(r.limit) == pytest.approx(1.0 / (tau * float(np.float32(1e-3))), rel=1e-6)
    assert not bool(r.limited)
    # an explicit rtol: c_limit = 1/rtol
    r = fimcore.resolution(xp.asarray(np.diag([1.0, 1e-3])), rtol=9e-4)
    assert float(r.limit) == pytest.approx(1 / 9e-4) and bool(r.limited)


def test_all_zero_and_single_row_grams(xp):
    r = fimcore.resolution(xp.zeros((4, 4), dtype=xp.float64))
    assert not bool(r.defined) and math.isnan(float(r.c)) and int(r.zero_rows) == 4
    assert int(r.rank) == 0 and not bool(r.limited)
    r = fimcore.resolution(xp.asarray(np.diag([0.0, 2.5, 0.0])))
    assert float(r.c) == 1.0 and int(r.rank) == 1 and int(r.zero_rows) == 2


def test_rank_tolerance_follows_both_dtypes():
    eps32, eps64 = (float(np.finfo(t).eps) for t in (np.float32, np.float64))
    assert fimcore.rank_tolerance(64, np.float32) == pytest.approx(8 * 64 * (eps32 + eps32**2))
    assert fimcore.rank_tolerance(64, np.float64, np.float32) == pytest.approx(
        8 * 64 * (eps64 + eps32**2))
    assert fimcore.rank_tolerance(64, np.float64) == pytest.approx(8 * 64 * (eps64 + eps64**2))


def test_jitted_pure_update_matches_the_host_tracker():
    """Under jax.jit the projection route runs always; it agrees with numpy's host route."""
    jax = import_backend("jax")
    jnp = import_backend("jax.numpy")
    rng = np.random.default_rng(7)
    J = rng.standard_normal((12, 5)) * _log_uniform_scales(rng, 12, 3.0)[:, None]
    J[3] = 0.0
    G = J @ J.T
    step = jax.jit(lambda s, g: fimcore.measure_update(s, g, lr=0.1))
    state = step(fimcore.measure_init(xp=jnp), jnp.asarray(G))
    m = fimcore.MeasureTracker().update(G, lr=0.1)
    assert int(state.rank) == m.rank == 5 and int(state.zero_rows) == m.zero_rows == 1
    assert float(state.c_k) == pytest.approx(m.c_k, rel=1e-8)
    assert float(state.c_limit) == pytest.approx(m.c_limit, rel=1e-12)
    assert bool(state.resolution_limited) == m.resolution_limited
    assert float(state.c_k_legacy) == pytest.approx(m.c_k_legacy, rel=1e-8)
    np.testing.assert_allclose(to_numpy(state.c_k), m.c_k, rtol=1e-8)
