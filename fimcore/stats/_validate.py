"""Shared front of the functional statistics: validate a Gram once, then compute in float64."""

from __future__ import annotations

from typing import Any

from .._namespace import check_gram, jit_for, resolve_namespace, validated_symmetric
from ..spectral import _eigs


def prepared(gram: Any, xp: Any = None, *, need_eigs: bool = False, min_batch: int = 1,
             what: str = "") -> tuple[Any, Any, Any]:
    """``(xp, (G + Gᵀ)/2 in the compute dtype, ascending clamped eigenvalues or None)``.

    Raises:
        ValueError: a bad Gram (see :func:`fimcore.spectrum`), or fewer than ``min_batch`` rows.
        TypeError: a non-floating dtype.
    """
    xp = resolve_namespace(gram, xp=xp)
    size = check_gram(gram, xp)
    if size < min_batch:
        raise ValueError(f"{what} needs a batch of at least {min_batch} samples (B >= {min_batch}); "
                         f"received a {size}×{size} Gram. It compares samples with each other, "
                         "which one sample cannot do.")
    sym, _ = validated_symmetric(gram, xp)
    eigs = jit_for(_eigs, xp)(sym) if need_eigs else None
    return xp, sym, eigs
