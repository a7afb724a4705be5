r"""``GramResult``: the one object every adapter hands to the core.

The adapters (PyTorch, JAX, TensorFlow) return the Gram of one training step together with
what the core needs to judge it: the dtype of the per-sample gradients (it sets the rank
threshold of :mod:`fimcore.rank`), the batch size, the number of parameters covered and,
when asked for, the per-layer blocks :math:`G = \sum_l J_l J_l^\top` and the per-layer report.
:meth:`fimcore.MeasureTracker.update` accepts it directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["GramResult"]


@dataclasses.dataclass
class GramResult:
    r"""The per-sample Gram of one step and its provenance.

    Attributes:
        gram: (B, B) :math:`G = JJ^\top` in the framework's array type (TensorFlow: NumPy), in
            the dtype it was accumulated in.
        grad_dtype: dtype of the per-sample gradients it was built from.
        batch_size: B.
        num_params: P, the number of parameters (columns of J) it covers, or None.
        blocks: ``{layer name: (B, B) block}`` with :math:`\sum_l` blocks :math:`= G`, or None
            when per-layer blocks were not kept.
        report: the per-layer :class:`fimcore.layers.Report` (path taken, why, share of Tr G).
        loss_reduction: ``"mean"`` (G scaled by :math:`B^2`) or ``"sum"``.
        checked: True when an adapter formed G as :math:`\sum_l J_l J_l^\top` itself: G is then
            symmetric up to rounding and has a non-negative diagonal by construction, and the core
            skips re-validating it (:func:`fimcore.spectrum` and
            :meth:`fimcore.MeasureTracker.update` read its finiteness off :math:`\operatorname{Tr} G`
            alone, since :math:`|G_{ij}| \le \sqrt{G_{ii}G_{jj}}`). Leave it False for a Gram
            assembled by other means: it is then checked in full. The numbers computed from G are
            the same either way.

    Example:
        >>> import numpy as np
        >>> from fimcore import GramResult, MeasureTracker
        >>> r = GramResult(gram=np.diag([4.0, 1.0]), grad_dtype=np.float32, batch_size=2)
        >>> MeasureTracker().update(r, lr=0.1).c_k
        4.0
    """

    gram: Any
    grad_dtype: Any
    batch_size: int
    num_params: int | None = None
    blocks: dict[str, Any] | None = None
    report: Any = None
    loss_reduction: str = "mean"
    checked: bool = False

    def __array__(self, dtype=None, copy=None):  # numpy.asarray(result) gives the Gram
        import numpy as np

        g = self.gram
        detach = getattr(g, "detach", None)
        if callable(detach):
            g = detach().cpu()
        return np.asarray(g, dtype=dtype)
