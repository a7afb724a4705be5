r"""The Gram matrix of a batch's per-sample gradients.

Liao et al. (TPAMI 2020, arXiv 1810.06767) approximate the Fisher information of a
mini-batch by the second moment of its per-sample gradients. With the B×P matrix

.. math:: J = \begin{bmatrix} \nabla_\theta \ell_1 & \cdots & \nabla_\theta \ell_B \end{bmatrix}^\top

the P×P matrix :math:`\tilde F = J^\top J` and the B×B Gram matrix :math:`G = J J^\top`
share their non-zero eigenvalues, so only :math:`G` is ever formed (no 1/B factor).

When the parameters come in blocks (layers), :math:`J = [J_1, \dots, J_L]` column-wise and

.. math:: G = \sum_l J_l J_l^\top,

which :func:`gram` computes without concatenating the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._namespace import check_real_floating, jit_for, resolve_namespace

__all__ = ["gram"]


def gram(J: Any, /, *, xp: Any = None) -> Any:
    r"""Gram matrix :math:`G = J J^\top` of per-sample gradients.

    Args:
        J: per-sample gradients, a (B, P) array with one row per sample, or a sequence of
            per-block arrays (B, P_l) (e.g. one per layer) whose Grams are summed,
            :math:`G = \sum_l J_l J_l^\top`, without concatenating them.
        xp: array namespace; resolved from ``J`` when None.

    Returns:
        The (B, B) Gram matrix in the namespace, dtype (the promoted dtype of the blocks)
        and device of ``J``.

    Raises:
        ValueError: if an array is not 2-D, the blocks disagree on B, the sequence is empty,
            or B = 0.
        TypeError: if a dtype is not real floating, or the blocks come from different
            array libraries.

    Example:
        >>> import numpy as np
        >>> import fimcore
        >>> J = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
        >>> fimcore.gram(J)
        array([[5., 0.],
               [0., 9.]])
        >>> fimcore.gram([J[:, :1], J[:, 1:]])
        array([[5., 0.],
               [0., 9.]])
    """
    blocks = list(J) if _is_sequence(J) else [J]
    if not blocks:
        raise ValueError(
            "J must be a (B, P) array or a non-empty sequence of (B, P_l) blocks; received "
            "an empty sequence. Pass at least one block of per-sample gradients."
        )
    xp = resolve_namespace(*blocks, xp=xp)
    batch = None
    for index, block in enumerate(blocks):
        label = "J" if len(blocks) == 1 and not _is_sequence(J) else f"J[{index}]"
        shape = tuple(block.shape)
        if len(shape) != 2:
            raise ValueError(
                f"{label} must be a 2-D (B, P) array of per-sample gradients (one row per "
                f"sample); received shape {shape}. Flatten each sample's gradient, e.g. "
                "J.reshape(B, -1)."
            )
        check_real_floating(block, xp, name=label)
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise ValueError(
                f"all blocks must have the same number of rows B (one per sample); "
                f"J[0] has B={batch} but {label} has shape {shape}. Pass the blocks of the "
                "same batch."
            )
    if batch == 0:
        raise ValueError(
            "J must hold at least one sample (B >= 1); received B = 0 rows."
        )
    return jit_for(_gram, xp)(blocks)


def _gram(blocks: list[Any], *, xp: Any) -> Any:
    dtype = xp.result_type(*[b.dtype for b in blocks])
    total = None
    for block in blocks:
        if block.dtype != dtype:
            block = xp.astype(block, dtype)
        part = xp.matmul(block, xp.matrix_transpose(block))
        total = part if total is None else total + part
    return total


def _is_sequence(J: Any) -> bool:
    return isinstance(J, Sequence) and not hasattr(J, "shape")
