r"""``G += J Jᵀ`` for per-sample gradient rows J (B, p), one block triangle computed.

:math:`JJ^\top` is symmetric, so with the rows split into ``n`` blocks only the blocks on and
below the diagonal need a product: row block i gives :math:`J_i [J_1 \dots J_i]^\top`, whose
part left of the diagonal block is also, transposed, the part above it. That is
:math:`(n+1)/2n` of the multiply-adds of the full product (3/4 for two blocks, 5/8 for four),
plus a B × B copy. The entries are the same dot products as the full product's (each pair of
rows once, mirrored): only their summation order inside the library's kernel may differ.

Measured on this 2-core CPU (one thread, medians of 15): at B = 128 the two-block form took
0.80–0.86 and the four-block form 0.68–0.84 of the full product's time for p = 2,304 to 36,864; at
B = 32 the small products lost (up to 1.8×), so the split starts at :data:`MIN_BATCH`.
"""

from __future__ import annotations

import torch

__all__ = ["add_outer", "MIN_BATCH", "MIN_COLUMNS", "BLOCKS"]

MIN_BATCH = 64
"""Smallest B for which the rows are split (below it one full product)."""
MIN_COLUMNS = 1024
"""Smallest p for which the rows are split (short rows: the extra calls cost more than they save)."""
BLOCKS = 2
"""Row blocks of the split."""


def add_outer(acc: torch.Tensor, J: torch.Tensor) -> None:
    """``acc += J Jᵀ`` (acc (B, B), J (B, p), same dtype), the upper blocks mirrored from the lower."""
    B, p = J.shape
    if B < MIN_BATCH or p < MIN_COLUMNS or BLOCKS < 2:
        acc.addmm_(J, J.T)
        return
    size = -(-B // BLOCKS)
    for i0 in range(0, B, size):
        i1 = min(i0 + size, B)
        block = torch.mm(J[i0:i1], J[:i1].T)          # rows i0:i1, columns 0:i1
        acc[i0:i1, :i1] += block
        if i0:
            acc[:i0, i0:i1] += block[:, :i0].T
