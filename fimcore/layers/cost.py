r"""Cost model: factored versus materialised Gram contribution of one layer (one formula).

For a weight applied at T positions per sample, with inputs of width :math:`d_a`, output
gradients of width :math:`d_g` and a per-sample weight gradient of :math:`p` entries:

* factored, :math:`\sum_{t,s}(a_{it}\cdot a_{js})(g_{it}\cdot g_{js})`: about
  :math:`B^2T^2(d_a + d_g + 1)` multiply-adds (two T×T inner-product blocks per pair of samples
  and their elementwise product), and no per-sample gradient is formed;
* materialised: :math:`B\,T\,p` to form the per-sample gradients plus :math:`B^2 p` for
  :math:`J_l J_l^\top`.

Both are exact; the cheaper one wins unless a strategy forces one. Dense layers on vectors
(T = 1) are factored, convolutions with many output positions materialised.
"""

from __future__ import annotations

import functools

__all__ = ["choose", "factored_cost", "materialize_cost"]


def factored_cost(batch: int, positions: int, d_a: int, d_g: int) -> float:
    """Multiply-adds of the factored form, :math:`B^2T^2(d_a + d_g + 1)`.

    Example:
        >>> factored_cost(2, 3, 4, 5)
        360.0
    """
    return float(batch) ** 2 * float(positions) ** 2 * (d_a + d_g + 1)


def materialize_cost(batch: int, positions: int, p: int) -> float:
    """Multiply-adds of per-sample gradients plus their Gram, :math:`BTp + B^2p`.

    Example:
        >>> materialize_cost(2, 3, 20)
        200.0
    """
    return float(batch) * positions * p + float(batch) ** 2 * p


@functools.lru_cache(maxsize=4096)
def choose(strategy: str, batch: int, positions: int, d_a: int, d_g: int, p: int) -> tuple[str, str]:
    """Pick ``"factored"`` or ``"materialize"`` for one layer and say why.

    Args:
        strategy: ``"auto"`` (cost model), ``"factored"`` or ``"materialize"``.
        batch, positions, d_a, d_g, p: B, T, input width, output width, per-sample gradient size.

    Returns:
        ``(path, reason)``; the reason carries both costs.

    Example:
        >>> choose("auto", 128, 1, 512, 256, 512 * 256)[0]
        'factored'
        >>> choose("auto", 128, 1024, 144, 16, 144 * 16)[0]
        'materialize'
    """
    f = factored_cost(batch, positions, d_a, d_g)
    m = materialize_cost(batch, positions, p)
    figures = f"factored {f:.2g} vs materialize {m:.2g} MACs (B={batch}, T={positions})"
    if strategy in ("factored", "materialize"):
        return strategy, "forced by strategy; " + figures
    return ("factored", figures) if f < m else ("materialize", figures)
