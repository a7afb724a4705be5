r"""Statistics of the per-step Gram, each a pure ``init``/``update`` pair over its own state.

The tracker (:class:`fimcore.MeasureTracker`) and the pure pair
(:func:`fimcore.measure_init` / :func:`fimcore.measure_update`) hold a tuple of them; the
default is ``(Condition(), Energy())``: :math:`c_k`/:math:`\bar C_K` and :math:`I_k`/:math:`L_K`.
Further statistics of one Gram: the gradient noise scale and the adaptive-sampling tests
(:mod:`fimcore.stats.batch`), effective/stable rank and Karakida's Fisher-spectrum statistics
(:mod:`fimcore.stats.spectral`), each as a function of a Gram and as a composable statistic;
:func:`per_layer` applies a function to per-layer blocks. See :mod:`fimcore.stats.base` for how
to write one.
"""

from .base import (Statistic, StepInputs, make_state, register_statistic, statistic_from_config,
                   statistics_from_names, to_host)
from .batch import (BatchTests, NoiseScale, NoiseScaleResult, TestsResult, inner_product_test,
                    noise_scale, norm_test, orthogonality_test)
from .condition import Condition, ConditionState
from .energy import Energy, EnergyState
from .per_layer import MEASURES, PerLayer, per_layer
from .spectral import (FisherSpectrum, FisherSpectrumResult, SpectrumShape, effective_rank,
                       fisher_spectrum_stats, stable_rank)

__all__ = ["BatchTests", "Condition", "ConditionState", "DEFAULT", "Energy", "EnergyState",
           "FisherSpectrum", "FisherSpectrumResult", "NoiseScale", "NoiseScaleResult",
           "PerLayer", "SpectrumShape", "MEASURES", "per_layer", "Statistic", "StepInputs", "TestsResult", "effective_rank",
           "fisher_spectrum_stats", "inner_product_test", "make_state", "noise_scale",
           "norm_test", "orthogonality_test", "register_statistic", "stable_rank",
           "statistic_from_config", "statistics_from_names", "to_host"]

#: the statistics a tracker keeps unless told otherwise
DEFAULT = (Condition(), Energy())
