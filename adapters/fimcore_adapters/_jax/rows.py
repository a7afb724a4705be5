"""Per-sample gradient rows of one recorded Flax call, from its captured arrays and cotangents.

For a call with captured input ``a`` (or normalised input x̂) and output cotangent δ of the batch
loss, row i is sample i's contribution ``(∂f(θ, X)_i/∂θ)ᵀ δ_i`` to the batch gradient (B × it
for the Gram's rows): dense ``Σ_t a_itᵀ δ_it``, embedding one-hot rows, conv per-sample kernels
(:mod:`.convps`), norm affine rows (:mod:`.norm`), a registered rule's ``per_sample``
(:mod:`.registry`) or the exact re-run of the fallback (:mod:`.fallback`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .convps import conv_kernel_per_sample
from .fallback import fallback_rows
from .norm import norm_rows

__all__ = ["call_rows", "dense_operands", "per_sample"]


def call_rows(call, captured, deltas, size):
    """Per-sample gradients ``{name: (B, *shape)}`` of any one recorded call, and how."""
    if call.kind in ("dense", "dense_general"):
        a, g = dense_operands(call, captured, deltas[0], size)
        out = {"kernel": jnp.einsum("bti,bto->bio", a, g)}
        if call.module.use_bias:
            out["bias"] = jnp.sum(g, axis=1)
        kernel = nn.meta.unbox(call.module.variables["params"]["kernel"])
        out["kernel"] = out["kernel"].reshape((size,) + kernel.shape)
        return out, "dense per-sample outer products"
    if call.kind == "embed":
        module = call.module
        ids = captured.reshape(size, -1)
        ids = jnp.where(ids < 0, ids + module.num_embeddings, ids)
        g = deltas[0].reshape(size, -1, module.features)
        onehot = jax.nn.one_hot(ids, module.num_embeddings, dtype=g.dtype)
        return {"embedding": jnp.einsum("btv,btd->bvd", onehot, g)}, "embed one-hot rows"
    return per_sample(call, captured, deltas, size)


def dense_operands(call, x, d, size):
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


def per_sample(call, captured, deltas, size):
    """Per-sample gradients (leading axis B) of one conv / norm / fallback call, and how."""
    module = call.module
    if call.kind == "user":
        return _user_rows(call, captured, deltas, size), None
    if call.kind == "norm":
        return norm_rows(module, captured, deltas[0], call.static["feature_axes"]), None
    if call.kind == "conv":
        (d,) = deltas
        kernel = nn.meta.unbox(module.variables["params"]["kernel"])
        kernels = conv_kernel_per_sample(module, captured, d)
        form = "patches (lax.map)"
        if kernels is None:
            form = "vmap of the convolution VJP"
            plain = module.clone(parent=None, use_bias=False)

            def one(x_i, d_i):
                f = lambda k: plain.apply({"params": {"kernel": k}}, x_i[None])
                return jax.vjp(f, kernel)[1](d_i[None])[0]

            kernels = jax.vmap(one)(captured, d)
        out = {"kernel": kernels.astype(kernel.dtype)}
        if module.use_bias:
            out["bias"] = jnp.sum(d, axis=tuple(range(1, d.ndim - 1)))
        return out, form
    return fallback_rows(call, captured, deltas, size)


def _user_rows(call, captured, deltas, size):
    """Per-sample gradients of a call with a registered :class:`LayerRule`, checked against the
    module's own parameters."""
    rule, module = call.static["rule"], call.module
    own = {k: nn.meta.unbox(v) for k, v in module.variables.get("params", {}).items()
           if not hasattr(v, "items")}
    where = f"module {'/'.join(call.path) or '<root>'} ({type(module).__name__})"
    out = rule.per_sample(module, captured, list(deltas))
    if not hasattr(out, "items") or set(out) != set(own):
        got = sorted(out) if hasattr(out, "items") else type(out).__name__
        raise ValueError(
            f"layer rule {rule.name!r} for {where} must return per-sample gradients "
            f"{{name: (B, *shape)}} for exactly the parameters the module owns, {sorted(own)}; "
            f"received {got}")
    for k, v in out.items():
        if tuple(jnp.shape(v)) != (size, *jnp.shape(own[k])):
            raise ValueError(
                f"layer rule {rule.name!r} for {where}: the per-sample gradient of {k!r} must have "
                f"shape (B, *shape) = {(size, *jnp.shape(own[k]))}; received {tuple(jnp.shape(v))}")
    return {k: out[k] for k in own}
