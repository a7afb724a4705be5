r"""fimcore: Fisher-information measures of deep-network training, for any array library.

Implements the measures of Liao, Drummond, Reid, Carneiro, "Approximate Fisher Information
Matrix to Characterise the Training of Deep Neural Networks", IEEE TPAMI 42(1), 2020,
arXiv 1810.06767, on the B×B Gram matrix :math:`G_k = J_k J_k^\top` of a batch's per-sample
gradients:

* :math:`c_k = \lambda_{\max}(G_k)/\lambda_{\min}^{+}(G_k)` (truncated condition number, with
  :math:`\lambda_{\min}^{+}` the smallest eigenvalue the Gram resolves: :mod:`fimcore.rank`) and
  :math:`\bar C_K = \frac{1}{|\mathcal M|}\sum_{k\in\mathcal M} c_k`;
* :math:`I_k = (\alpha_k/B_k)\sqrt{\operatorname{Tr} G_k}` and :math:`L_K = \sum_k w_k I_k`;
* dynamic sampling: a batch size growing over stages (:class:`StagedBatchSchedule`).

The core imports only the standard library, numpy and array-api-compat; it computes in the
caller's namespace (numpy, torch, jax.numpy and array_api_strict are tested) and device, and
imports no framework.
"""

from .gram import gram
from .record import Measurement
from .results import GramResult
from .schedule import StagedBatchSchedule, paper_lr_milestones
from .rank import Resolution, rank_tolerance
from .spectral import (
    default_rtol,
    energy,
    resolution,
    spectrum,
    truncated_condition_number,
    weighted_energy,
)
from .measures import MeasureState, measure_init, measure_update
from .tracker import MeasureTracker
from . import diagonal, layers, mbf, policy, stats

__version__ = "0.1.0"

__all__ = [
    "GramResult",
    "MeasureState",
    "MeasureTracker",
    "Measurement",
    "Resolution",
    "StagedBatchSchedule",
    "default_rtol",
    "energy",
    "gram",
    "measure_init",
    "measure_update",
    "paper_lr_milestones",
    "rank_tolerance",
    "resolution",
    "spectrum",
    "truncated_condition_number",
    "weighted_energy",
]
