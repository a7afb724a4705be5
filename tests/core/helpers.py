"""Small helpers shared by the core tests (reference side: plain NumPy float64)."""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

EPS64 = float(np.finfo(np.float64).eps)


def to_numpy(x: Any) -> np.ndarray:
    """Any backend's array as a float64 NumPy array (the reference side)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


def same_library(result: Any, xp: Any) -> bool:
    """True when ``result`` belongs to the namespace ``xp`` (no silent conversion)."""
    return array_api_compat.array_namespace(result) is array_api_compat.array_namespace(
        xp.asarray(0.0)
    )


def reference_sorted_eigs_from_svd(J: np.ndarray) -> np.ndarray:
    """Eigenvalues of J Jᵀ (ascending, length B) from the singular values of J."""
    s = np.linalg.svd(J, compute_uv=False)
    eigs = np.zeros(J.shape[0])
    eigs[: s.size] = s**2
    return np.sort(eigs)


def gamma(n: int, dtype: Any = np.float32) -> float:
    """γ_n = n·u/(1 − n·u), u = eps/2: the worst-case relative error of a sum of n products."""
    u = float(np.finfo(dtype).eps) / 2
    if n * u >= 1:
        raise ValueError(f"n·u must be < 1 for the bound γ_n; received n = {n}")
    return n * u / (1 - n * u)


def float32_sum_bound(abs_sum: Any, n_terms: int) -> np.ndarray:
    """Bound on the difference of two float32 evaluations of one sum of n products.

    Each evaluation, in any order, is within γ_n·Σ|x_k y_k| of the exact value; ``abs_sum``
    is Σ|x_k y_k| (if itself computed in float32 from non-negative terms, within a factor
    1 + γ_n of the exact one, which the bound includes).
    """
    g = gamma(n_terms)
    return 2 * g * (1 + g) * np.asarray(abs_sum, dtype=np.float64)


def assert_within(actual: Any, expected: Any, bound: Any) -> None:
    """Element-wise |actual − expected| ≤ bound (float64 NumPy on the reference side)."""
    err = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g} over the derived bound"
