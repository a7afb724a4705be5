r"""The truncated condition number :math:`c_k` and its running mean :math:`\bar C_K`.

Source: Liao, Drummond, Reid, Carneiro, IEEE TPAMI 42(1), 2020, arXiv 1810.06767:

.. math:: c_k = \frac{\lambda_{\max}(G_k)}{\lambda_{\min}^{+}(G_k)},\qquad
          \bar C_K = \frac{1}{|\mathcal M|}\sum_{k\in\mathcal M} c_k,

over the measured iterations :math:`\mathcal M` with a defined :math:`c_k` (an all-zero or
non-finite Gram has none: it is counted in ``skipped`` and left out). :math:`\lambda_{\min}^{+}`
is the smallest eigenvalue the Gram resolves (:mod:`fimcore.rank`), or, with an explicit
``rtol``, the smallest above :math:`\mathrm{rtol}\cdot\lambda_{\max}`. ``C_bar_jacobian`` is the
mean of :math:`\sqrt{c_k}` (singular values of :math:`J_k`, the released code's convention; a
mean of square roots is not the square root of a mean). Each step also records the resolved
rank, the zero rows, :math:`c_{\mathrm{limit}}` and whether :math:`c_k \ge c_{\mathrm{limit}}/2`;
``c_k_legacy``/``C_bar_legacy`` keep, for one release, the values under the previous default
tolerance :math:`B\varepsilon_{\mathrm{grad}}\lambda_{\max}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from ..rank import legacy
from ..spectral import condition_of, resolve_rtol
from .base import Statistic, StepInputs, finite_or_none, make_state, register_statistic

__all__ = ["Condition", "ConditionState"]


class ConditionState(NamedTuple):
    """Running totals (``measured``, ``skipped``, ``limited``, sums) and the last step's values."""

    measured: Any
    skipped: Any
    limited: Any
    c_sum: Any
    c_jacobian_sum: Any
    c_legacy_sum: Any
    legacy_measured: Any
    c_k: Any
    c_k_jacobian: Any
    lambda_max: Any
    rank: Any
    zero_rows: Any
    c_limit: Any
    resolution_limited: Any
    c_k_legacy: Any
    defined: Any
    finite: Any


@register_statistic
@dataclasses.dataclass(frozen=True)
class Condition(Statistic):
    r""":math:`c_k` and :math:`\bar C_K` (see the module docstring).

    Args:
        rtol: None (the resolved rank) or an explicit tolerance in [0, 1) relative to
            :math:`\lambda_{\max}` (``rtol=0``: exact zero after clamping).

    Example:
        >>> import numpy as np
        >>> from fimcore import MeasureTracker
        >>> from fimcore.stats import Condition, Energy
        >>> t = MeasureTracker(statistics=(Condition(rtol=0.0), Energy()))
        >>> t.update(np.diag([4.0, 1.0]), lr=0.1).c_k
        4.0
    """

    rtol: float | None = None
    name = "condition"
    fields = ("c_k", "c_k_jacobian", "lambda_max", "rank", "defined", "C_bar", "C_bar_jacobian",
              "zero_rows", "c_limit", "resolution_limited", "c_k_legacy", "C_bar_legacy")

    def __post_init__(self) -> None:
        if self.rtol is not None:
            object.__setattr__(self, "rtol", resolve_rtol(self.rtol, 1, None, None))

    def init(self, *, xp: Any = None, device: Any = None) -> ConditionState:
        nan = float("nan")
        return make_state(ConditionState, dict(
            measured=0, skipped=0, limited=0, c_sum=0.0, c_jacobian_sum=0.0, c_legacy_sum=0.0,
            legacy_measured=0, c_k=nan, c_k_jacobian=nan, lambda_max=nan, rank=0, zero_rows=0,
            c_limit=nan, resolution_limited=False, c_k_legacy=nan, defined=False, finite=True,
        ), xp=xp, device=device)

    def update(self, state: ConditionState, step: StepInputs, *, xp: Any) -> ConditionState:
        res = condition_of(step.gram, step.eigs, rtol=self.rtol, eps_acc=step.eps_acc,
                           eps_grad=step.eps_grad, project=step.project, xp=xp)
        old = legacy(step.eigs, xp.linalg.diagonal(step.gram), rtol=step.legacy_rtol, xp=xp)
        finite = step.finite
        defined = xp.logical_and(res.defined, finite)
        limited = xp.logical_and(res.limited, finite)
        legacy_ok = xp.logical_and(defined, xp.isfinite(old.c))
        zero = xp.zeros_like(res.c)
        nan = xp.full_like(res.c, float("nan"))
        count = _counter(state.measured, xp)
        return ConditionState(
            measured=state.measured + count(defined),
            skipped=state.skipped + count(xp.logical_not(defined)),
            limited=state.limited + count(limited),
            c_sum=state.c_sum + xp.where(defined, res.c, zero),
            c_jacobian_sum=state.c_jacobian_sum + xp.where(defined, xp.sqrt(res.c), zero),
            c_legacy_sum=state.c_legacy_sum + xp.where(legacy_ok, old.c, zero),
            legacy_measured=state.legacy_measured + count(legacy_ok),
            c_k=res.c,
            c_k_jacobian=xp.sqrt(res.c),
            lambda_max=xp.where(finite, res.lambda_max, nan),
            rank=res.rank,
            zero_rows=res.zero_rows,
            c_limit=res.limit,
            resolution_limited=limited,
            c_k_legacy=old.c,
            defined=defined,
            finite=finite,
        )

    def record(self, state: ConditionState) -> dict[str, Any]:
        s = state
        defined, finite = bool(s.defined), bool(s.finite)
        return {
            "c_k": s.c_k if defined else None,
            "c_k_jacobian": s.c_k_jacobian if defined else None,
            "lambda_max": s.lambda_max if finite else None,
            "rank": int(s.rank) if finite else None,
            "defined": defined,
            "C_bar": s.c_sum / s.measured if s.measured else None,
            "C_bar_jacobian": s.c_jacobian_sum / s.measured if s.measured else None,
            "zero_rows": int(s.zero_rows) if finite else None,
            "c_limit": s.c_limit if defined else None,
            "resolution_limited": bool(s.resolution_limited),
            "c_k_legacy": finite_or_none(s.c_k_legacy) if defined else None,
            "C_bar_legacy": s.c_legacy_sum / s.legacy_measured if s.legacy_measured else None,
        }


def _counter(like: Any, xp: Any):
    """``flag -> 0/1`` in the dtype of the running count ``like``."""
    dtype = getattr(like, "dtype", None)
    if dtype is None:
        return lambda flag: xp.astype(flag, xp.asarray(0).dtype)
    return lambda flag: xp.astype(flag, dtype)
