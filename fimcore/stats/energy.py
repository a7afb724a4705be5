r"""The weighted energy term :math:`I_k` and its cumulative sum :math:`L_K`.

Source: Liao, Drummond, Reid, Carneiro, IEEE TPAMI 42(1), 2020, arXiv 1810.06767:

.. math:: I_k = \frac{\alpha_k}{B_k}\sqrt{\operatorname{Tr} G_k},\qquad
          L_K = \sum_{k\in\mathcal M} w_k\, I_k,

with :math:`\alpha_k` the learning rate in force, :math:`B_k` the actual batch size and
:math:`w_k` the number of training iterations measurement k stands for (itself and the
unmeasured ones after it), so measuring every n-th step still estimates the full sum. A
non-finite Gram adds nothing; an all-zero one adds :math:`I_k = 0`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from .base import Statistic, StepInputs, make_state, register_statistic

__all__ = ["Energy", "EnergyState"]


class EnergyState(NamedTuple):
    """``L`` = :math:`L_K` so far; the last step's ``I_k`` and ``trace`` (NaN if not finite)."""

    L: Any
    I_k: Any
    trace: Any
    finite: Any


@register_statistic
@dataclasses.dataclass(frozen=True)
class Energy(Statistic):
    r""":math:`I_k` and :math:`L_K` (see the module docstring).

    Example:
        >>> import numpy as np
        >>> from fimcore import MeasureTracker
        >>> t = MeasureTracker()
        >>> round(t.update(np.diag([5.0, 11.0]), lr=0.1, weight=3).L, 12)
        0.6
    """

    name = "energy"
    fields = ("I_k", "trace", "L")

    def init(self, *, xp: Any = None, device: Any = None) -> EnergyState:
        nan = float("nan")
        return make_state(EnergyState, dict(L=0.0, I_k=nan, trace=nan, finite=True),
                          xp=xp, device=device)

    def update(self, state: EnergyState, step: StepInputs, *, xp: Any) -> EnergyState:
        trace = xp.sum(xp.linalg.diagonal(step.gram))
        i_k = (step.lr / step.batch) * xp.sqrt(xp.maximum(trace, xp.zeros_like(trace)))
        nan = xp.full_like(trace, float("nan"))
        zero = xp.zeros_like(trace)
        return EnergyState(
            L=state.L + xp.where(step.finite, step.weight * i_k, zero),
            I_k=xp.where(step.finite, i_k, nan),
            trace=xp.where(step.finite, trace, nan),
            finite=step.finite,
        )

    def record(self, state: EnergyState) -> dict[str, Any]:
        finite = bool(state.finite)
        return {"I_k": state.I_k if finite else None, "trace": state.trace if finite else None,
                "L": state.L}
