"""spectrum, truncated_condition_number, energy, weighted_energy, default_rtol.

References are plain NumPy float64 computed by other means (singular values of J,
eigenvalues of the P×P matrix Jᵀ J, the spectrum an SPD matrix was built from).
Tolerances are absolute on eigenvalues, c·n·eps·λ_max, so relative tolerances on small
eigenvalues and on c_k grow with the condition number.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fimcore
from tests.conftest import import_backend
from tests.core.helpers import EPS64, gamma, reference_sorted_eigs_from_svd, same_library, to_numpy
from tests.strategies import j_matrices, spd_with_spectrum

EIG_SLACK = 64  # constant in front of n·eps·λ_max


@given(case=j_matrices())
def test_nonzero_spectrum_of_JJt_equals_that_of_JtJ(xp, case):
    J = case.J
    B, P = J.shape
    eigs = fimcore.spectrum(fimcore.gram(xp.asarray(J)))
    assert same_library(eigs, xp) and eigs.dtype == xp.float64
    got = to_numpy(eigs)
    assert np.all(np.diff(got) >= 0) and np.all(got >= 0)
    lam_max = float(np.linalg.norm(J, 2) ** 2)
    atol = EIG_SLACK * max(B, P) * EPS64 * lam_max
    # P×P side: the r = min(B, P) largest eigenvalues of Jᵀ J, the rest of G's are 0
    r = min(B, P)
    jtj = np.sort(np.linalg.eigvalsh(J.T @ J))[::-1][:r]
    expected = np.concatenate([np.zeros(B - r), np.sort(np.clip(jtj, 0, None))])
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
    np.testing.assert_allclose(got, reference_sorted_eigs_from_svd(J), rtol=0, atol=atol)


@given(case=spd_with_spectrum())
def test_spectrum_matches_known_spectrum(xp, case):
    got = to_numpy(fimcore.spectrum(xp.asarray(case.G)))
    atol = EIG_SLACK * case.G.shape[0] * EPS64 * case.eigs[-1]
    np.testing.assert_allclose(got, case.eigs, rtol=0, atol=atol)


def _oracle_condition(eigs: np.ndarray, rtol: float) -> float:
    lam_max = max(eigs)
    return lam_max / min(v for v in eigs if v > rtol * lam_max)


RTOL_ORACLE = 1e-10  # far above float64 noise, far below the oracle's smallest ratio 1e-6


@given(case=spd_with_spectrum(), log_scale=st.integers(-3, 3), seed=st.integers(0, 2**16))
def test_condition_number_oracle_and_invariances(xp, case, log_scale, seed):
    B = case.G.shape[0]
    expected = _oracle_condition(case.eigs, RTOL_ORACLE)
    tol = EIG_SLACK * B * EPS64 * expected

    def c(G):
        return float(fimcore.truncated_condition_number(xp.asarray(G), rtol=RTOL_ORACLE))

    base = c(case.G)
    assert base >= 1.0
    assert math.isclose(base, expected, rel_tol=tol)
    perm = np.random.default_rng(seed).permutation(B)
    assert math.isclose(c(case.G[np.ix_(perm, perm)]), expected, rel_tol=tol)
    assert math.isclose(c(case.G * 10.0**log_scale), expected, rel_tol=tol)
    jac = float(
        fimcore.truncated_condition_number(xp.asarray(case.G), rtol=RTOL_ORACLE, convention="jacobian")
    )
    assert math.isclose(jac, math.sqrt(base), rel_tol=4 * EPS64)


@given(case=j_matrices())
def test_condition_number_at_least_one_with_default_rtol(xp, case):
    """1 ≤ c ≤ λ_max/λ_min⁺ of the exact spectrum (the strategy's J is never all zero: the
    zero Gram is tested on its own), and the Jacobian convention is its square root."""
    G = fimcore.gram(xp.asarray(case.J))
    c = fimcore.truncated_condition_number(G)
    assert same_library(c, xp) and c.dtype == xp.float64 and tuple(c.shape) == ()
    eigs = reference_sorted_eigs_from_svd(case.J)
    cut = EIG_SLACK * max(case.J.shape) * EPS64 * eigs[-1]  # below it an eigenvalue is rounding
    resolved = eigs[eigs > cut]
    assert 1.0 <= float(c) <= resolved[-1] / resolved[0] * (1 + 1e-6)
    jac = float(fimcore.truncated_condition_number(G, convention="jacobian"))
    assert jac == pytest.approx(math.sqrt(float(c)), rel=4 * EPS64)


def test_batch_of_one_gives_one(xp):
    for value in (1e-12, 3.0, 1e12):
        assert float(fimcore.truncated_condition_number(xp.asarray([[value]]))) == 1.0


def test_explicit_rtol_truncates_relative_to_lambda_max(xp):
    """An explicit rtol is the legacy rule: λ <= rtol·λ_max counts as zero."""
    eps32 = float(np.finfo(np.float32).eps)
    G = xp.asarray(np.diag([1.0, 1e-7]))
    assert float(fimcore.truncated_condition_number(G, rtol=2 * eps32)) == 1.0
    assert float(fimcore.truncated_condition_number(G, rtol=1e-8)) == pytest.approx(1e7, rel=1e-12)
    G32 = xp.asarray(np.diag([1.0, 4 * eps32]), dtype=xp.float32)
    assert float(fimcore.truncated_condition_number(G32, rtol=2 * eps32)) == pytest.approx(
        1 / (4 * eps32), rel=1e-6)
    # rtol=0 keeps every strictly positive eigenvalue (exact zero after clamping)
    G = xp.asarray(np.diag([1.0, 1e-20, 0.0]))
    assert float(fimcore.truncated_condition_number(G, rtol=0.0)) == pytest.approx(1e20)
    r = fimcore.resolution(G, rtol=0.0)
    assert int(r.rank) == 2 and int(r.zero_rows) == 1


def test_default_keeps_exact_small_eigenvalues_of_graded_grams(xp):
    """Diagonal Grams are exact in any dtype: nothing above the zero rows is cut."""
    G = xp.asarray(np.diag([1.0, 1e-7]))
    assert float(fimcore.truncated_condition_number(G)) == pytest.approx(1e7, rel=1e-12)
    assert float(fimcore.truncated_condition_number(G, grad_dtype=xp.float32)) == pytest.approx(1e7, rel=1e-12)
    G32 = xp.asarray(np.diag([1.0, 1e-7]), dtype=xp.float32)
    assert float(fimcore.truncated_condition_number(G32)) == pytest.approx(
        1.0 / float(np.float32(1e-7)), rel=1e-12)
    # a zero row is excluded and counted, the 1e-20 row is resolved
    G = xp.asarray(np.diag([1.0, 1e-20, 0.0]))
    r = fimcore.resolution(G)
    assert float(r.c) == pytest.approx(1e20) and int(r.rank) == 2 and int(r.zero_rows) == 1


def test_default_rtol_values(xp):
    assert fimcore.default_rtol(1, xp.float64) == EPS64
    assert fimcore.default_rtol(128, xp.float32) == 128 * float(np.finfo(np.float32).eps)
    assert fimcore.default_rtol(7, "float64") == 7 * EPS64


def test_float32_gram_eigenvalues_in_float64(xp):
    """A float32 Gram's spectrum is that of the matrix the core decomposes, in float64.

    The core decomposes S = (G + Gᵀ)/2 of the float64 copy of G (every float32 value is exact
    in float64), so the reference is NumPy's float64 ``eigvalsh`` of that same S: two backward
    stable float64 solvers on one input agree within c·B·eps64·λ_max, whatever the float32
    BLAS that produced G (it may round differently on another CPU; both sides read the same
    bits). Against the exact J Jᵀ of the stored float32 J, the float32 accumulation of P
    products adds |ΔG_ij| ≤ γ_P·(|J||J|ᵀ)_ij, γ_P = P·u/(1 − P·u), u = eps32/2, so by Weyl
    each eigenvalue moves by at most ‖ΔG‖_F.
    """
    J = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    G32 = fimcore.gram(xp.asarray(J))
    eigs = fimcore.spectrum(G32)
    assert eigs.dtype == xp.float64
    G = to_numpy(G32)
    expected = np.sort(np.linalg.eigvalsh((G + G.T) / 2))
    np.testing.assert_allclose(to_numpy(eigs), np.clip(expected, 0, None), rtol=0,
                               atol=EIG_SLACK * 6 * EPS64 * expected[-1])
    B, P = J.shape
    J64 = J.astype(np.float64)
    accumulation = gamma(P) * np.linalg.norm(np.abs(J64) @ np.abs(J64).T)
    exact = reference_sorted_eigs_from_svd(J64)
    np.testing.assert_allclose(to_numpy(eigs), exact, rtol=0,
                               atol=accumulation + EIG_SLACK * B * EPS64 * exact[-1])


# lr/B must stay a normal float: XLA on CPU flushes subnormal results to zero
@given(case=j_matrices(), lr=st.just(0.0) | st.floats(1e-200, 10.0), batch=st.none() | st.integers(1, 512))
def test_energy_and_weighted_energy_against_row_norms(xp, case, lr, batch):
    J = case.J
    G = fimcore.gram(xp.asarray(J))
    trace_ref = math.fsum(float(v) ** 2 for v in J.ravel())
    trace = fimcore.energy(G)
    assert same_library(trace, xp) and trace.dtype == xp.float64
    assert math.isclose(float(trace), trace_ref, rel_tol=8 * J.shape[1] * EPS64)
    b = J.shape[0] if batch is None else batch
    i_k = float(fimcore.weighted_energy(G, lr=lr, batch_size=batch))
    assert math.isclose(i_k, lr / b * math.sqrt(trace_ref), rel_tol=8 * J.shape[1] * EPS64, abs_tol=0)


def test_zero_gram_has_no_condition_number(xp):
    G = xp.zeros((3, 3), dtype=xp.float64)
    with pytest.raises(ValueError, match="all-zero Gram"):
        fimcore.truncated_condition_number(G)
    assert float(fimcore.energy(G)) == 0.0
    assert float(fimcore.weighted_energy(G, lr=0.1)) == 0.0
    assert np.all(to_numpy(fimcore.spectrum(G)) == 0.0)


# --- bad input ---------------------------------------------------------------------------

FUNCTIONS = [
    fimcore.spectrum,
    fimcore.truncated_condition_number,
    fimcore.energy,
    lambda g: fimcore.weighted_energy(g, lr=0.1),
]


@pytest.mark.parametrize("fn", FUNCTIONS, ids=["spectrum", "cond", "energy", "weighted"])
def test_bad_grams_are_rejected(xp, fn):
    with pytest.raises(ValueError, match="2-D \\(B, B\\) matrix"):
        fn(xp.ones((3,), dtype=xp.float64))
    with pytest.raises(ValueError, match="must be square"):
        fn(xp.ones((2, 3), dtype=xp.float64))
    with pytest.raises(TypeError, match="real floating-point dtype"):
        fn(xp.ones((2, 2), dtype=xp.int64))
    with pytest.raises(TypeError, match="real floating-point dtype"):
        fn(xp.ones((2, 2), dtype=xp.complex128))
    with pytest.raises(ValueError, match="must be symmetric"):
        fn(xp.asarray([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="must be finite"):
        fn(xp.asarray([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="non-negative diagonal"):
        fn(xp.asarray([[-1.0, 0.0], [0.0, 1.0]]))


def test_symmetry_tolerance_accepts_rounding(xp):
    G = np.array([[2.0, 1.0], [1.0 + 1e-12, 2.0]])
    assert float(fimcore.truncated_condition_number(xp.asarray(G))) == pytest.approx(3.0)
    G32 = np.array([[2.0, 1.0], [1.0 + 1e-6, 2.0]], dtype=np.float32)
    assert float(fimcore.truncated_condition_number(xp.asarray(G32))) == pytest.approx(3.0, rel=1e-5)


def test_bad_options_are_rejected(xp):
    G = xp.asarray(np.eye(2))
    with pytest.raises(ValueError, match="convention must be one of"):
        fimcore.truncated_condition_number(G, convention="svd")
    for rtol in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="0 <= rtol < 1"):
            fimcore.truncated_condition_number(G, rtol=rtol)
    with pytest.raises(TypeError, match="rtol must be a Python float"):
        fimcore.truncated_condition_number(G, rtol="small")
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        fimcore.weighted_energy(G, lr=-0.1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        fimcore.weighted_energy(G, lr=0.1, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be a positive integer"):
        fimcore.weighted_energy(G, lr=0.1, batch_size=2.0)


def test_default_rtol_errors():
    with pytest.raises(TypeError, match="real floating-point dtype"):
        fimcore.default_rtol(4, np.int32)
    with pytest.raises(ValueError, match="B·eps must be < 1"):
        fimcore.default_rtol(2048, np.float16)
    with pytest.raises(ValueError, match="positive integer"):
        fimcore.default_rtol(0, np.float64)


@pytest.mark.parametrize("shape", [(6, 3), (3, 9)], ids=["tall", "wide"])
def test_float32_gradients_spectrum_within_float32_rounding(xp, shape):
    """A float32 Gram of float32 J: eigenvalues within ~P·eps32·λ_max of the exact ones."""
    rng = np.random.default_rng(11)
    B, P = shape
    J = (rng.standard_normal((B, 2)) @ rng.standard_normal((2, P))).astype(np.float32)
    J[-1] = J[0]  # a duplicated row on top of rank 2
    eigs = to_numpy(fimcore.spectrum(fimcore.gram(xp.asarray(J))))
    exact = reference_sorted_eigs_from_svd(J.astype(np.float64))
    eps32 = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(eigs, exact, rtol=0, atol=EIG_SLACK * max(B, P) * eps32 * exact[-1])
    # rank 2: with the float32 default rtol, only two eigenvalues count
    G = fimcore.gram(xp.asarray(J))
    c = float(fimcore.truncated_condition_number(G))
    assert c == pytest.approx(exact[-1] / exact[-2], rel=1e-4)


def test_functions_trace_under_jax_jit():
    jax = import_backend("jax")
    jnp = import_backend("jax.numpy")
    G = jnp.asarray(np.diag([4.0, 1.0, 0.0]))
    np.testing.assert_allclose(np.asarray(jax.jit(fimcore.spectrum)(G)), [0.0, 1.0, 4.0])
    cond = jax.jit(lambda g: fimcore.truncated_condition_number(g, convention="jacobian"))
    assert float(cond(G)) == 2.0
    assert math.isnan(float(cond(jnp.zeros((3, 3)))))  # documented: NaN when traced
    assert float(jax.jit(lambda g: fimcore.weighted_energy(g, lr=0.5))(G)) == pytest.approx(0.5 / 3 * math.sqrt(5.0))


def test_results_stay_on_the_callers_device():
    """array_api_strict refuses to mix devices, so any op leaving 'device1' would raise."""
    xs = import_backend("array_api_strict")
    device = xs.Device("device1")
    J = xs.asarray(np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), device=device)
    G = fimcore.gram(J)
    results = [
        G,
        fimcore.spectrum(G),
        fimcore.truncated_condition_number(G),
        fimcore.energy(G),
        fimcore.weighted_energy(G, lr=0.1),
    ]
    state = fimcore.measure_update(fimcore.measure_init(xp=xs, device=device), G, lr=0.1)
    results += [state.steps, state.nonfinite, *[leaf for sub in state.stats for leaf in sub]]
    assert all(r.device == device for r in results)
    assert fimcore.MeasureTracker().update(G, lr=0.1).c_k == 4.0


@pytest.mark.filterwarnings("error")
def test_torch_autograd_tensors_pass_through_without_warnings():
    torch = import_backend("torch")
    J = torch.tensor(np.random.default_rng(5).standard_normal((4, 6)), requires_grad=True)
    G = fimcore.gram(J)
    fimcore.energy(G).backward()
    np.testing.assert_allclose(J.grad.numpy(), 2 * J.detach().numpy(), rtol=1e-12)
    assert fimcore.truncated_condition_number(G).requires_grad
    m = fimcore.MeasureTracker().update(G, lr=torch.tensor(0.1, requires_grad=True))
    assert isinstance(m.c_k, float) and isinstance(m.lr, float)
