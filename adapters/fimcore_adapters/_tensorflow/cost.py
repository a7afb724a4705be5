"""Cost model of the layer rules: multiply-adds of the factored and the materialised Gram forms
(the rules take the cheaper exact form; see :mod:`.kernels` for the forms themselves)."""

from __future__ import annotations


def factored_cost(batch: int, positions: int, d_in: int, d_out: int) -> float:
    """Multiply-adds of :func:`factored_gram` (B² T² (d_in + d_out))."""
    return float(batch) ** 2 * float(positions) ** 2 * (d_in + d_out)


def materialised_cost(batch: int, positions: int, d_in: int, d_out: int) -> float:
    """Multiply-adds of per-sample gradients plus their Gram (B T d_in d_out + B² d_in d_out)."""
    return float(batch) * positions * d_in * d_out + float(batch) ** 2 * d_in * d_out
