"""fimcore.gram: J Jᵀ, block sums, namespace/dtype preservation and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fimcore
from tests.conftest import import_backend
from tests.core.helpers import EPS64, same_library, to_numpy
from tests.strategies import j_matrices


def _loop_gram(J: np.ndarray) -> np.ndarray:
    """Slow reference: one dot product per pair of rows, summed with math.fsum."""
    import math

    rows = [list(map(float, r)) for r in J]
    return np.array([[math.fsum(a * b for a, b in zip(ri, rj)) for rj in rows] for ri in rows])


@given(case=j_matrices(), split=st.booleans())
def test_gram_matches_loop_reference_whole_and_in_blocks(xp, case, split):
    J = case.J
    reference = _loop_gram(J)
    atol = 4 * J.shape[1] * EPS64 * float(np.max(np.sum(J * J, axis=1)))
    whole = fimcore.gram(xp.asarray(J))
    assert same_library(whole, xp)
    assert whole.dtype == xp.float64
    np.testing.assert_allclose(to_numpy(whole), reference, rtol=0, atol=atol)
    # few distinct block shapes (JAX compiles per shape): first column, then halves
    cuts = sorted({c for c in (1, J.shape[1] // 2) if 0 < c < J.shape[1]}) if split else []
    blocks = [xp.asarray(b) for b in np.split(J, cuts, axis=1)]
    np.testing.assert_allclose(to_numpy(fimcore.gram(blocks)), reference, rtol=0, atol=atol)


def test_gram_keeps_float32_and_promotes_mixed_blocks(xp):
    J = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    g32 = fimcore.gram(xp.asarray(J, dtype=xp.float32))
    assert g32.dtype == xp.float32
    mixed = fimcore.gram([xp.asarray(J[:, :2], dtype=xp.float32), xp.asarray(J[:, 2:])])
    assert mixed.dtype == xp.float64
    np.testing.assert_allclose(to_numpy(mixed), J @ J.T, rtol=1e-6)


def test_gram_rows_sum_invariant(xp):
    """1ᵀ G 1 = ‖Σ_i J_i‖² (the invariant the adapters rely on)."""
    J = np.random.default_rng(3).standard_normal((5, 9))
    G = to_numpy(fimcore.gram(xp.asarray(J)))
    np.testing.assert_allclose(G.sum(), np.sum(J.sum(axis=0) ** 2), rtol=1e-12)


@pytest.mark.parametrize(
    ("shape", "match"),
    [((4,), "2-D \\(B, P\\) array"), ((2, 3, 4), "2-D \\(B, P\\) array"), ((0, 3), "at least one sample")],
)
def test_gram_rejects_bad_shapes(xp, shape, match):
    with pytest.raises(ValueError, match=match):
        fimcore.gram(xp.zeros(shape, dtype=xp.float64))


def test_gram_rejects_mismatched_blocks(xp):
    with pytest.raises(ValueError, match="same number of rows B"):
        fimcore.gram([xp.ones((3, 2)), xp.ones((4, 2))])


def test_gram_rejects_empty_sequence():
    with pytest.raises(ValueError, match="non-empty sequence"):
        fimcore.gram([])


def test_gram_rejects_integer_and_complex(xp):
    with pytest.raises(TypeError, match="real floating-point dtype"):
        fimcore.gram(xp.ones((2, 3), dtype=xp.int32))
    with pytest.raises(TypeError, match="real floating-point dtype"):
        fimcore.gram(xp.ones((2, 3), dtype=xp.complex128))


def test_gram_rejects_mixed_libraries():
    torch = import_backend("torch")
    with pytest.raises(TypeError, match="one array library"):
        fimcore.gram([np.ones((2, 3)), torch.ones((2, 3), dtype=torch.float64)])


def test_gram_rejects_non_arrays():
    with pytest.raises(TypeError, match="array-API namespace"):
        fimcore.gram([[1.0, 2.0], [3.0, 4.0]])
