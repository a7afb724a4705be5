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
