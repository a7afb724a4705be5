"""JAX adapter: the per-sample Gram ``G = J Jᵀ`` (B×B) as one more output of a jitted step.

Importing this module imports JAX (and Flax for the layer-factored path); that import is the opt-in.

Two roles:

1. **Transforms returning loss, mean gradient and Gram together**, so the measured step is the
   step you already jit:

   - :func:`value_grad_and_gram` — any JAX model. ``loss_fn(params, *example)`` is the loss ℓ_i of
     ONE example; per-sample gradients come from ``vmap(grad)`` and the Gram is accumulated leaf
     by leaf (``Σ_l J_l J_lᵀ``, never a concatenated B×P matrix); ``chunk_size`` bounds memory
     exactly (off-diagonal chunk blocks are recomputed). Rows of J are ``∇ℓ_i``.
   - :class:`FlaxGram` / :func:`flax_value_grad_and_gram` — ``flax.linen`` models. One batch
     forward and backward captures each layer's input and output cotangent (method interception
     plus zero perturbations at layer outputs); dense layers use the factored form
     ``(A Aᵀ) ⊙ (Gₒ Gₒᵀ)``, convolutions materialise per-sample kernel gradients, norm layers give
     per-sample affine blocks, and BatchNorm in train mode keeps its batch statistics (rows are
     the per-sample contributions to the batch gradient, summing to B × it). The weight gradients
     of the step are formed from the same captured quantities, never by a second backward.
     A custom module type gets an exact rule of its own with :func:`register_layer_rule` (a
     :class:`LayerRule`: what to capture in its ``__call__``, and the per-sample gradients of its
     parameters from that and the output cotangent).

2. **One-off functions**: :func:`per_sample_gram` and :func:`flax_per_sample_gram`.

Sampled-label ("true") Fisher: build the loss as :func:`output_loss` ``(predict, "cross_entropy")``
(or ``"mse"``) and pass ``fisher="sampled"`` (``mc_samples``, ``seed``, ``key=`` per step) to
:func:`value_grad_and_gram`; :func:`output_jacobian_gram` gives the (B·C, B·C) NTK Gram and its
loss-Hessian-weighted form.

Everything runs inside the traced computation (no host round-trips), on whatever device JAX
places it.

Data-parallel: under ``jax.jit`` with the batch sharded over a mesh axis (``NamedSharding(mesh,
P("data"))``) and the parameters replicated, both transforms return the Gram of the GLOBAL batch
(rows in global batch order, sharded by rows over the axis unless ``out_shardings`` replicates it)
and the unsharded gradient; in ``FlaxGram`` BatchNorm in train mode uses the global batch
statistics. Inside ``jax.shard_map``, pass ``axis_name=`` to :func:`value_grad_and_gram`: each
shard's per-sample gradients are all-gathered along the axis before the products. Tested on CPU
with 4 host devices, untested on GPU/TPU; see the README section "Data-parallel JAX" (including
the JAX 0.10.2 fault with sharded ``vmap(grad)`` of convolutions under ``jit``). Dtype: with ``jax_enable_x64`` on, the Gram is accumulated in float64 by default
(per-sample gradients are cast before the products); with x64 off it is float32 (JAX cannot hold
float64 arrays) and asking for ``dtype=float64`` raises. Pass :func:`gradient_dtype` of the
parameters as ``grad_dtype`` to ``fimcore.MeasureTracker.update`` so its default
``rtol = B·eps`` follows the gradients' precision, not the Gram's.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import fimcore
    >>> from fimcore_adapters.jax import gradient_dtype, value_grad_and_gram
    >>> def loss(w, x, y):                       # ONE example
    ...     return 0.5 * (jnp.dot(x, w) - y) ** 2
    >>> step = jax.jit(value_grad_and_gram(loss))
    >>> w = jnp.array([0.5, -0.5])
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]); y = jnp.array([1.0, 0.0, 1.0])
    >>> mean_loss, grad, gram = step(w, x, y)
    >>> tracker = fimcore.MeasureTracker()
    >>> m = tracker.update(gram, lr=0.1, grad_dtype=gradient_dtype(w))
    >>> gram.shape, m.rank
    ((3, 3), 2)
"""

from __future__ import annotations

import jax  # noqa: F401  (the framework import is the opt-in)

from ._jax._checks import gradient_dtype
from ._jax.diagonal import diagonal_fisher
from ._jax.recorder import FlaxGram, flax_per_sample_gram, flax_value_grad_and_gram
from ._jax.registry import LayerRule, register_layer_rule
from ._jax.generic import per_sample_gram, value_grad_and_gram
from ._jax.mbf import MBFState, MBFTransformation, mbf, mbf_partition
from ._jax.sampled import OutputLoss, output_jacobian_gram, output_loss, sample_labels

__all__ = [
    "FlaxGram",
    "LayerRule",
    "MBFState",
    "MBFTransformation",
    "OutputLoss",
    "diagonal_fisher",
    "flax_per_sample_gram",
    "flax_value_grad_and_gram",
    "gradient_dtype",
    "mbf",
    "mbf_partition",
    "output_jacobian_gram",
    "output_loss",
    "per_sample_gram",
    "register_layer_rule",
    "sample_labels",
    "value_grad_and_gram",
]
