"""TensorFlow / Keras adapter: per-sample Gram ``G = J Jᵀ`` inside a ``GradientTape`` or ``fit``.

Importing this module imports TensorFlow and Keras (that import is the opt-in); Keras must
run on its TensorFlow backend. Two roles, as in every fimcore adapter:

* in-step: :class:`GramTape` replaces ``tf.GradientTape`` in a training step and returns the
  ordinary gradients together with the (B, B) Gram, from one forward and one backward;
  :class:`GramModel` / :class:`GramStepMixin` put it into a Keras ``train_step`` every n-th
  step, :class:`GramMeasureCallback` turns it into ``c_k``, ``I_k``, ``C_bar``, ``L`` in the
  ``fit`` logs, :class:`PolicyBatchSize` / :func:`fit_policy` let a ``fimcore.policy`` rule
  set the batch size at epoch boundaries, :class:`StagedBatchSize` / :func:`fit_staged` apply a
  :class:`fimcore.StagedBatchSchedule`;
* functional: :func:`per_sample_gram` for one model, loss and batch (returns NumPy:
  TensorFlow has no array-API namespace yet).

``fisher="sampled"`` (in :meth:`GramTape.gradient_and_gram` and :func:`per_sample_gram`) gives the
Gram at labels drawn from the model (the Monte-Carlo "true" Fisher); :func:`output_jacobian_gram`
the (B·C, B·C) NTK Gram and its loss-Hessian-weighted form.

Per layer the Gram contribution is exact: factored ``(A Aᵀ) ⊙ (Gₒ Gₒᵀ)`` for dense layers,
materialised per-layer per-sample gradients for convolutions, affine rows for norm layers,
and an exact ``GradientTape.jacobian`` path for layers without a rule (:class:`LayerRule`,
:func:`register_layer_rule`). ``GramTape.report`` says which path each layer took.
``params=`` selects the columns of J by layer, layer name, ``tf.Variable`` or variable path;
``memory_budget=`` caps each layer's Gram temporaries (bytes).

Data-parallel: under ``tf.distribute.MirroredStrategy`` (``GramTape`` inside ``strategy.run``,
``GramModel`` fitted under ``strategy.scope()``) the Gram is that of the global batch, each
layer's factors or rows all-gathered across replicas before the products (tested on logical
CPU devices; untested on GPUs/TPUs).
"""

from __future__ import annotations

import keras
import tensorflow as tf  # noqa: F401  (the opt-in import)

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "fimcore_adapters.tensorflow needs Keras on its TensorFlow backend; received "
        f"KERAS_BACKEND={keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before "
        "importing keras."
    )

from ._tensorflow.functional import per_sample_gram  # noqa: E402
from ._tensorflow.keras import (  # noqa: E402
    GramMeasureCallback,
    GramModel,
    GramStepMixin,
    PolicyBatchSize,
    StagedBatchSize,
    fit_policy,
    fit_staged,
)
from ._tensorflow.ntk import output_jacobian_gram  # noqa: E402
from ._tensorflow.registry import (  # noqa: E402
    LayerRule,
    register_layer_rule,
    rule_for,
)
from ._tensorflow.recorder import GramTape  # noqa: E402

__all__ = [
    "GramMeasureCallback",
    "GramModel",
    "GramStepMixin",
    "GramTape",
    "LayerRule",
    "PolicyBatchSize",
    "StagedBatchSize",
    "fit_policy",
    "fit_staged",
    "output_jacobian_gram",
    "per_sample_gram",
    "register_layer_rule",
    "rule_for",
]
