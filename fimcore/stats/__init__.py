r"""Statistics of the per-step Gram, each a pure ``init``/``update`` pair over its own state.

The tracker (:class:`fimcore.MeasureTracker`) and the pure pair
(:func:`fimcore.measure_init` / :func:`fimcore.measure_update`) hold a tuple of them; the
default is ``(Condition(), Energy())``: :math:`c_k`/:math:`\bar C_K` and :math:`I_k`/:math:`L_K`.
See :mod:`fimcore.stats.base` for how to write one.
"""

from .base import (Statistic, StepInputs, make_state, register_statistic, statistic_from_config,
                   to_host)
from .condition import Condition, ConditionState
from .energy import Energy, EnergyState

__all__ = ["Condition", "ConditionState", "DEFAULT", "Energy", "EnergyState", "Statistic",
           "StepInputs", "make_state", "register_statistic", "statistic_from_config", "to_host"]

#: the statistics a tracker keeps unless told otherwise
DEFAULT = (Condition(), Energy())
