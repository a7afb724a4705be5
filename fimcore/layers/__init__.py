r"""Framework-free layer math shared by the PyTorch, JAX and TensorFlow adapters.

Every adapter splits the Gram :math:`G = J J^\top` into per-layer contributions
:math:`G = \sum_l J_l J_l^\top` and forms each one by one of a few exact *paths*:

* ``"factored"`` — a weight applied at T positions per sample (T = 1 for a dense layer on
  vectors, tokens of a sequence, output pixels of an unfolded convolution), with per-position
  inputs :math:`a_{it}` and output gradients :math:`g_{it}`:
  :math:`(J_l J_l^\top)_{ij} = \sum_{t,s} (a_{it}\cdot a_{js} + \beta)(g_{it}\cdot g_{js})`
  (β = 1 with a bias, else 0), never forming a per-sample gradient;
* ``"materialize"`` — the layer's per-sample gradients :math:`J_l` (B × P_l), then
  :math:`J_l J_l^\top`;
* ``"norm"`` — per-sample affine blocks of a normalisation layer,
  :math:`\gamma_i = \sum_t \hat x_{it}\delta_{it}`, :math:`\beta_i = \sum_t \delta_{it}`;
* ``"generic"`` — the framework's own per-sample differentiation of a module it has no rule for.

This package holds what the three adapters must agree on: the path and strategy names
(:mod:`.paths`), the cost model that picks factored or materialised (:mod:`.cost`), the
loss-reduction scaling (:mod:`.reduction`), the ``[B, T, d]`` weight-sharing convention
(:mod:`.tokens`), the per-layer report (:mod:`.report`), the sink seam rules emit their
contributions to (:mod:`.sink`) and array-API reference kernels (:mod:`.kernels`) against which
every adapter's rules are tested.
"""

from .cost import choose, factored_cost, materialize_cost
from .kernels import (embedding_gram, factored_gram, norm_affine_rows, per_sample_weight_grads,
                      rows_gram)
from .paths import PATHS, STRATEGIES, check_strategy
from .reduction import REDUCTIONS, check_reduction, gram_scale
from .report import LayerRecord, Report
from .sink import PerLayerSink, Sink, SummingSink
from .tokens import as_tokens

__all__ = [
    "LayerRecord", "PATHS", "PerLayerSink", "REDUCTIONS", "Report", "STRATEGIES", "Sink",
    "SummingSink", "as_tokens", "check_reduction",
    "check_strategy", "choose", "embedding_gram", "factored_cost", "factored_gram",
    "gram_scale", "materialize_cost", "norm_affine_rows", "per_sample_weight_grads", "rows_gram",
]
