"""Cost model: factored versus materialised Gram contribution of one layer.

For a weight applied at T positions per sample (T = 1 for a dense layer on vectors, tokens for a
sequence, output pixels for a convolution), with per-position inputs a_it (width ``d_a``) and
output gradients g_it (width ``d_g``) and a per-sample weight gradient of ``p`` entries:

* factored: ``G_ij = Σ_{t,s} (a_it·a_js)(g_it·g_js)`` costs ≈ ``B²T²(d_a + d_g + 1)``
  multiply-adds and never forms a per-sample gradient;
* materialised: ``J_i = Σ_t g_it a_itᵀ`` costs ``B·T·p`` plus ``B²·p`` for ``J Jᵀ``.

Both are exact; the cheaper one wins (``strategy`` overrides). On a 2-core CPU the factored form
wins for dense layers on vectors and loses for every convolution with T ≥ 64.
"""

from __future__ import annotations

import functools

__all__ = ["factored_cost", "materialize_cost", "choose", "STRATEGIES"]

STRATEGIES = ("auto", "factored", "materialize", "generic")


def factored_cost(batch: int, positions: int, d_a: int, d_g: int) -> float:
    """Multiply-adds of the factored form, ``B²T²(d_a + d_g + 1)``."""
    return float(batch) ** 2 * float(positions) ** 2 * (d_a + d_g + 1)


def materialize_cost(batch: int, positions: int, p: int) -> float:
    """Multiply-adds of per-sample gradients plus their Gram, ``B·T·p + B²·p``."""
    return float(batch) * positions * p + float(batch) ** 2 * p


@functools.lru_cache(maxsize=4096)
def choose(strategy: str, batch: int, positions: int, d_a: int, d_g: int, p: int) -> tuple[str, str]:
    """Pick ``"factored"`` or ``"materialize"`` and say why.

    Args:
        strategy: ``"auto"`` (cost model), ``"factored"`` or ``"materialize"``.
        batch, positions, d_a, d_g, p: B, T, input width, output width, per-sample gradient size.

    Returns:
        (path, reason).

    Example:
        >>> choose("auto", 128, 1, 512, 256, 512 * 256)[0]
        'factored'
        >>> choose("auto", 128, 1024, 144, 16, 144 * 16)[0]
        'materialize'
    """
    f = factored_cost(batch, positions, d_a, d_g)
    m = materialize_cost(batch, positions, p)
    figures = f"factored {f:.2g} vs materialize {m:.2g} MACs (B={batch}, T={positions})"
    if strategy == "factored":
        return "factored", "forced by strategy; " + figures
    if strategy == "materialize":
        return "materialize", "forced by strategy; " + figures
    return ("factored", figures) if f < m else ("materialize", figures)
