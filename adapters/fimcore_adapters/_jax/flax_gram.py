"""Layer-factored Gram for ``flax.linen`` models: ``FlaxGram`` and its functional forms."""

from __future__ import annotations

from collections import defaultdict

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import flax_layers as layers
from ._checks import accumulation_dtype, batch_size, check_finite_if_concrete, check_params
from .flax_capture import Recorder
from .flax_fallback import fallback_rows

__all__ = ["FlaxGram", "flax_per_sample_gram", "flax_value_grad_and_gram"]


class FlaxGram:
    """One training step's mean loss, mean gradient and per-sample Gram for a Flax model.

    ``FlaxGram(model, loss_fn)(variables, inputs, *targets)`` runs ONE batch forward and
    backward of ``model.apply(variables, inputs)``, capturing each recognised layer's input
    and output cotangent, and returns ``(mean_loss, mean_grad, gram)``:

    - ``loss_fn(outputs, *targets)`` returns the per-example losses (shape (B,));
      ``mean_loss`` is their mean (the batch loss ``L``);
    - ``mean_grad = ∇ L`` with respect to ``variables["params"]`` (same pytree), for the step;
    - ``gram = J Jᵀ`` (B×B), rows ``J_i = B ×`` sample i's contribution to ``∇ L``
      (``1ᵀ G 1 = B²·‖∇L‖²``; without cross-sample layers ``J_i = ∇ ℓ_i``).

    Per layer, the cheaper of two exact forms: ``Dense``/``DenseGeneral`` use the factored form
    ``G_ij = Σ_{t,s}(a_it·a_js)(g_it·g_js)`` (``(A Aᵀ)⊙(Gₒ Gₒᵀ)`` for T = 1) or materialised
    per-sample weights, whichever costs fewer multiply-adds (``dense_form`` overrides);
    ``Conv`` materialises per-sample kernel gradients (``vmap`` of the convolution's VJP,
    which JAX lowers to a feature-grouped convolution), then ``J_l J_lᵀ``; ``Embed`` uses the
    factored id-equality form or a one-hot materialisation; ``LayerNorm``, ``GroupNorm``,
    ``BatchNorm``, ``RMSNorm``, ``InstanceNorm`` get per-sample affine blocks
    ``(Σ_t x̂_it δ_it, Σ_t δ_it)``. BatchNorm in train mode keeps its batch statistics: its rows
    are the per-sample contributions read off the batch backward (δ carries the coupling).
    Any other module that owns parameters is handled exactly (``fallback="vmap"``): its rows are
    ``(∂f(θ, X)_i/∂θ)ᵀ δ_i`` for its batch forward ``f`` and output cotangent ``δ``, formed by
    ``vmap`` of the VJP of the module on one sample when its parameter Jacobian is separable
    across samples, else (a module coupling samples: batch statistics, ``h − mean_b h``, a
    softmax over the batch) by the batch VJP at the cotangent masked to each sample's slice,
    at B times the module's backward; the check is made at each call's values (under ``jit``
    by ``lax.cond``). ``fallback="error"`` rejects such modules instead. After a call,
    ``report`` maps each parameterised module path to the path taken.

    Args:
        model: a ``flax.linen.Module``.
        loss_fn: ``loss_fn(outputs, *targets) -> (B,)`` per-example losses.
        mutable: collections the forward pass updates (e.g. ``["batch_stats"]``); when
            given, a fourth output holds the updated collections.
        apply_kwargs: extra keyword arguments for ``model.apply`` (e.g. ``{"train": True}``).
        dtype: Gram dtype; ``None`` = float64 when ``jax_enable_x64`` is on, else float32.
        dense_form: ``"auto"``, ``"factored"`` or ``"materialised"`` for dense-like layers.
        fallback: for unrecognised parameterised modules, ``"vmap"`` (exact rows from a re-run
            of the module: per sample, or masked batch VJPs when it couples samples) or
            ``"error"``.
        check_finite: outside ``jit``, raise if a parameter is NaN/Inf.

    Raises:
        TypeError: integer parameters; non-float ``dtype``.
        ValueError: per-example losses not of shape (B,); inputs/targets with different
            leading sizes; a layer not receiving the batch on axis 0, or an unrecognised
            module returning an output without it that the loss uses; non-finite parameters
            (outside ``jit``); bad ``dense_form``/``fallback``.
        NotImplementedError: unrecognised parameterised module with ``fallback="error"``, or
            one that draws random numbers; a recognised layer used through another method
            (tied embeddings).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from fimcore_adapters.jax import FlaxGram
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
        >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
        >>> variables = model.init(jax.random.key(0), x)
        >>> def loss_fn(logits, y):
        ...     return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]
        >>> step = FlaxGram(model, loss_fn)
        >>> loss, grads, gram = jax.jit(step)(variables, x, y)
        >>> gram.shape, sorted(step.report.values())
        ((4, 4), ['dense: factored (T=1)', 'dense: factored (T=1)'])
    """

    def __init__(self, model, loss_fn, *, mutable=False, apply_kwargs=None, dtype=None,
                 dense_form="auto", fallback="vmap", check_finite=True):
        if dense_form not in ("auto", "factored", "materialised"):
            raise ValueError(
                f"dense_form must be 'auto', 'factored' or 'materialised'; received {dense_form!r}."
            )
        if fallback not in ("vmap", "error"):
            raise ValueError(f"fallback must be 'vmap' or 'error'; received {fallback!r}.")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a flax.linen.Module; received {type(model).__name__}. "
                "For other JAX models use value_grad_and_gram with a per-example loss."
            )
        self.model, self.loss_fn = model, loss_fn
        self.mutable = mutable
        self.apply_kwargs = dict(apply_kwargs or {})
        self.dtype, self.dense_form, self.fallback = dtype, dense_form, fallback
        self.check_finite = check_finite
        self.report: dict[str, str] = {}

    # -- forward with capture -------------------------------------------------------------
    def _forward(self, recorder, variables, inputs, rngs):
        with nn.intercept_methods(recorder):
            result = self.model.apply(variables, inputs, mutable=self.mutable, rngs=rngs, **self.apply_kwargs)
        return result if self.mutable else (result, None)

    def __call__(self, variables, inputs, *targets, rngs=None):
        params = variables["params"]
        check_params(params, what='variables["params"]')
        if self.check_finite:
            check_finite_if_concrete(params, what='variables["params"]')
        size = batch_size((inputs, targets), what="(inputs, *targets)")
        acc = accumulation_dtype(self.dtype, params)

        discover = Recorder(size, None, self.fallback)
        out_shape = jax.eval_shape(lambda v, x: self._forward(discover, v, x, rngs)[0], variables, inputs)
        loss_shape = jax.eval_shape(lambda o, *t: self.loss_fn(o, *t), out_shape, *targets)
        if getattr(loss_shape, "shape", None) != (size,):
            raise ValueError(
                f"loss_fn(outputs, *targets) must return the per-example losses, shape ({size},); "
                f"received {jax.tree_util.tree_map(jnp.shape, loss_shape)}. Do not reduce over the "
                "batch: FlaxGram takes the mean itself."
            )
        zeros = [jnp.zeros(s.shape, s.dtype) for s in discover.out_shapes]

        rec = Recorder(size, None, self.fallback)

        def batch_loss(perturbations):
            rec.perturbations = perturbations
            out, state = self._forward(rec, variables, inputs, rngs)
            return jnp.mean(self.loss_fn(out, *targets)), (rec.arrays, state)

        (mean_loss, (arrays, state)), deltas = jax.value_and_grad(batch_loss, has_aux=True)(zeros)
        mean_grad, gram = self._assemble(rec.calls, arrays, deltas, params, size, acc)
        if self.mutable:
            return mean_loss, mean_grad, gram, state
        return mean_loss, mean_grad, gram

    # -- per-layer Gram blocks ------------------------------------------------------------
    def _assemble(self, calls, arrays, deltas, params, size, acc):
        groups, k = defaultdict(list), 0
        for call in calls:
            groups[call.path].append((call, arrays[call.index], deltas[k:k + call.n_out]))
            k += call.n_out
        grads = jax.tree_util.tree_map(jnp.zeros_like, nn.meta.unbox(params))
        grads = _to_dict(grads)
        gram = jnp.zeros((size, size), acc)
        report = {}
        for path, items in groups.items():
            block, layer_grads, how = self._group(items, size, acc)
            gram = gram + block
            node = grads
            for name in path:
                node = node[name]
            for name, value in layer_grads.items():
                node[name] = value.astype(node[name].dtype).reshape(node[name].shape)
            report["/".join(path) or "<root>"] = how
        self.report = report
        return grads, gram * jnp.asarray(size * size, acc)

    def _group(self, items, size, acc):
        call = items[0][0]
        module, kind = call.module, call.kind
        if kind in ("dense", "dense_general"):
            a_parts, g_parts = [], []
            for c, x, (d,) in items:
                x2, d2 = _dense_operands(c, x, d, size)
                a_parts.append(x2)
                g_parts.append(d2)
            a, g = jnp.concatenate(a_parts, 1), jnp.concatenate(g_parts, 1)
            form = layers.choose_dense_form(size, a.shape[1], a.shape[2], g.shape[2], self.dense_form)
            block, grads = layers.dense_block(a, g, has_bias=module.use_bias, form=form, dtype=acc)
            return block, grads, f"{kind.split('_')[0] if kind == 'dense' else kind}: {form} (T={a.shape[1]})"
        if kind == "embed":
            ids = jnp.concatenate([x.reshape(size, -1) for _, x, _ in items], 1)
            g = jnp.concatenate([d.reshape(size, -1, module.features) for _, _, (d,) in items], 1)
            t, v, f = ids.shape[1], module.num_embeddings, module.features
            form = self.dense_form if self.dense_form != "auto" else (
                "factored" if size * t * t * (f + 1) <= t * v * f + size * v * f else "materialised")
            block, grads = layers.embed_block(ids, g, num_embeddings=v, form=form, dtype=acc,
                                              param_dtype=module.param_dtype)
            return block, grads, f"embed: {form} (T={t})"
        per_sample, forms = None, set()
        for c, captured, d in items:
            ps, form = _per_sample(c, captured, d, size)
            forms.add(form)
            per_sample = ps if per_sample is None else jax.tree_util.tree_map(jnp.add, per_sample, ps)
        block, grads = layers.materialised_block(per_sample, acc)
        if kind == "conv":
            return block, grads, "conv: materialised per-sample kernel gradients by " + " and ".join(sorted(forms))
        if kind == "fallback":
            return block, grads, "; ".join(sorted(forms))
        return block, grads, "norm: per-sample affine"


def _to_dict(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _dense_operands(call, x, d, size):
    """Inputs as (B, T, d_in) and cotangents as (B, T, d_out) of a Dense/DenseGeneral call."""
    module = call.module
    if call.kind == "dense":
        return x.reshape(size, -1, x.shape[-1]), d.reshape(size, -1, d.shape[-1])
    features = module.features if isinstance(module.features, (tuple, list)) else (module.features,)
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axis = tuple(ax % x.ndim for ax in axis)
    rest = [ax for ax in range(x.ndim) if ax not in axis]
    d_in = 1
    for ax in axis:
        d_in *= x.shape[ax]
    d_out = 1
    for f in features:
        d_out *= f
    a = jnp.transpose(x, rest + list(axis)).reshape(size, -1, d_in)
    return a, d.reshape(size, -1, d_out)


def _per_sample(call, captured, deltas, size):
    """Per-sample gradients (leading axis B) of one conv / norm / fallback call, and how."""
    module = call.module
    if call.kind == "norm":
        (d,) = deltas
        axes = call.static["feature_axes"]
        reduce = tuple(ax for ax in range(1, d.ndim) if ax not in axes)
        out = {}
        if module.use_scale:
            out["scale"] = jnp.sum(captured.astype(d.dtype) * d, axis=reduce)
        if getattr(module, "use_bias", False):
            out["bias"] = jnp.sum(d, axis=reduce)
        return out, None
    if call.kind == "conv":
        (d,) = deltas
        kernel = nn.meta.unbox(module.variables["params"]["kernel"])
        per_sample = layers.conv_kernel_per_sample(module, captured, d)
        form = "patches (lax.map)"
        if per_sample is None:
            form = "vmap of the convolution VJP"
            plain = module.clone(parent=None, use_bias=False)

            def one(x_i, d_i):
                f = lambda k: plain.apply({"params": {"kernel": k}}, x_i[None])
                return jax.vjp(f, kernel)[1](d_i[None])[0]

            per_sample = jax.vmap(one)(captured, d)
        out = {"kernel": per_sample.astype(kernel.dtype)}
        if module.use_bias:
            out["bias"] = jnp.sum(d, axis=tuple(range(1, d.ndim - 1)))
        return out, form
    return fallback_rows(call, captured, deltas, size)


def flax_value_grad_and_gram(model, loss_fn, **options):
    """Functional form of :class:`FlaxGram`: ``fn(variables, inputs, *targets) -> (loss, grad, gram)``."""
    return FlaxGram(model, loss_fn, **options)


def flax_per_sample_gram(model, loss_fn, variables, inputs, *targets, **options):
    """Gram ``G = J Jᵀ`` (B×B) of a Flax model's per-sample gradients in one call (see :class:`FlaxGram`)."""
    return FlaxGram(model, loss_fn, **options)(variables, inputs, *targets)[2]
