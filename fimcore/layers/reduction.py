r"""Loss reduction over the batch, and the scaling of G it implies.

Row i of J is B × sample i's contribution to the gradient of the batch loss L when the loss
averages over the batch (``"mean"``), and that contribution itself when it sums (``"sum"``).
Frameworks hand the adapters the gradients of L, so with ``"mean"`` each per-sample piece
carries a factor 1/B, and the accumulated Gram is multiplied by :math:`B^2`. Either way

.. math:: \mathbf 1^\top G\,\mathbf 1 = \|\textstyle\sum_i J_i\|^2 =
          B^2\|\nabla L\|^2\ (\text{mean}),\quad \|\nabla L\|^2\ (\text{sum}),

the cheap invariant every adapter test checks.
"""

from __future__ import annotations

__all__ = ["REDUCTIONS", "check_reduction", "gram_scale"]

REDUCTIONS = ("mean", "sum")


def check_reduction(loss_reduction: str) -> str:
    """Return ``loss_reduction`` if it is ``"mean"`` or ``"sum"``.

    Raises:
        ValueError: anything else.

    Example:
        >>> check_reduction("mean")
        'mean'
    """
    if loss_reduction not in REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {REDUCTIONS}; received {loss_reduction!r}. "
                         "Pass the reduction your loss uses over the batch.")
    return loss_reduction


def gram_scale(loss_reduction: str, batch: int) -> float:
    """The factor the accumulated Gram of loss-gradient pieces is multiplied by: B² or 1.

    Example:
        >>> gram_scale("mean", 8), gram_scale("sum", 8)
        (64.0, 1.0)
    """
    return float(batch) ** 2 if check_reduction(loss_reduction) == "mean" else 1.0
