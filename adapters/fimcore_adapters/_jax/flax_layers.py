"""Per-layer Gram contributions from captured layer inputs and output cotangents.

Notation: ``a`` (B, T, d_in) are a layer's inputs at its T positions, ``g`` (B, T, d_out) the
cotangents of the batch loss at its outputs. Rows of ``J`` are ``B ×`` the per-sample
contributions (``J_i = B·∂L/∂θ`` restricted to sample i's cotangent, so ``Σ_i J_i = B·∇L``),
so the caller multiplies the summed Gram by B².
Each function returns ``(gram_block, param_grads)`` with ``param_grads`` a dict of the layer's
batch gradients (sums of the per-sample contributions, for the optimiser step).

Two exact forms (the cheaper one is taken per layer):

- factored: ``G_ij = Σ_{t,s} (a_it·a_js)(g_it·g_js)``; for T = 1 this is ``(A Aᵀ) ⊙ (Gₒ Gₒᵀ)``;
- materialised: per-sample weight gradients ``J_l`` (B × P_l), then ``J_l J_lᵀ``.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "choose_dense_form",
    "conv_kernel_per_sample",
    "dense_block",
    "embed_block",
    "materialised_block",
]


def choose_dense_form(batch, positions, d_in, d_out, form="auto"):
    """``"factored"`` or ``"materialised"`` for a dense-like layer, by multiply-add count.

    factored ≈ B²T²(d_in + d_out); materialised ≈ B·T·d_in·d_out + B²·d_in·d_out.
    """
    if form in ("factored", "materialised"):
        return form
    factored = batch * batch * positions * positions * (d_in + d_out)
    materialised = batch * positions * d_in * d_out + batch * batch * d_in * d_out
    return "factored" if factored <= materialised else "materialised"


def dense_block(a, g, *, has_bias, form, dtype):
    """Gram block and batch gradients of ``y = a @ W + b`` (W: d_in × d_out).

    Returns ``(block, {"kernel": Σ_it a_itᵀ g_it, "bias": Σ_it g_it})``.
    """
    grads = {"kernel": jnp.einsum("bti,bto->io", a, g)}
    if has_bias:
        grads["bias"] = jnp.sum(g, axis=(0, 1))
    a64, g64 = a.astype(dtype), g.astype(dtype)
    positions = a.shape[1]
    if form == "factored":
        if positions == 1:
            aa = a64[:, 0] @ a64[:, 0].T
            gsum = g64[:, 0]
            gg = gsum @ gsum.T
            block = (aa + 1.0) * gg if has_bias else aa * gg
        else:
            aa = jnp.einsum("itd,jsd->ijts", a64, a64)
            gg = jnp.einsum("itd,jsd->ijts", g64, g64)
            block = jnp.sum(aa * gg, axis=(2, 3))
            if has_bias:
                gsum = jnp.sum(g64, axis=1)
                block = block + gsum @ gsum.T
    else:
        per_sample = jnp.einsum("bti,bto->bio", a64, g64).reshape(a.shape[0], -1)
        block = per_sample @ per_sample.T
        if has_bias:
            gsum = jnp.sum(g64, axis=1)
            block = block + gsum @ gsum.T
    return block, grads


def embed_block(ids, g, *, num_embeddings, form, dtype, param_dtype):
    """Gram block and gradient of an embedding lookup ``y_it = E[ids_it]``.

    Factored: ``G_ij = Σ_{t,s} [ids_it = ids_js] (g_it·g_js)``; materialised: per-sample
    (V × d) gradients by a one-hot contraction (chosen when ``V·d`` is small).
    """
    ids = jnp.where(ids < 0, ids + num_embeddings, ids)
    onehot = jax.nn.one_hot(ids, num_embeddings, dtype=g.dtype)  # (B, T, V); out of range -> 0
    grads = {"embedding": jnp.einsum("btv,btd->vd", onehot, g).astype(param_dtype)}
    g64 = g.astype(dtype)
    if form == "factored":
        valid = (ids >= 0) & (ids < num_embeddings)
        same = (ids[:, None, :, None] == ids[None, :, None, :]) & valid[:, None, :, None]
        gg = jnp.einsum("itd,jsd->ijts", g64, g64)
        block = jnp.sum(jnp.where(same, gg, 0.0), axis=(2, 3))
    else:
        per_sample = jnp.einsum("btv,btd->bvd", onehot.astype(dtype), g64).reshape(ids.shape[0], -1)
        block = per_sample @ per_sample.T
    return block, grads


def materialised_block(per_sample, dtype):
    """``Σ_leaves J_l J_lᵀ`` and the batch gradients ``Σ_i J_l[i]`` of per-sample gradient trees."""
    block = None
    for leaf in jax.tree_util.tree_leaves(per_sample):
        flat = leaf.reshape(leaf.shape[0], -1).astype(dtype)
        b = flat @ flat.T
        block = b if block is None else block + b
    grads = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), per_sample)
    return block, grads


def _explicit_conv_padding(x, padding, kernel_size, strides, dilation):
    """``(x, pads)`` with Flax's padding rule resolved to explicit (low, high) pairs, or None.

    Mirrors ``flax.linen.Conv``: ``"CIRCULAR"``/``"REFLECT"`` and ``"CAUSAL"`` pad the input
    itself, ``"SAME"``/``"VALID"`` follow ``lax.padtype_to_pads``, ints and pairs are explicit.
    None when a pad is negative (cropping; left to the vmap path).
    """
    from flax.linen.linear import canonicalize_padding

    rank = len(kernel_size)
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    pad = canonicalize_padding(padding, rank)
    if pad in ("CIRCULAR", "REFLECT"):
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad]
        x = jnp.pad(x, [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)], mode=mode)
        pad = "VALID"
    elif pad == "CAUSAL":
        x = jnp.pad(x, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
        pad = "VALID"
    if isinstance(pad, str):
        pad = lax.padtype_to_pads(x.shape[1:-1], dilated, strides, pad)
    pad = [tuple(int(v) for v in p) for p in pad]
    if any(v < 0 for p in pad for v in p):
        return None
    return x, pad


def conv_kernel_per_sample(module, x, g, *, over_samples="auto"):
    """Per-sample kernel gradients (B, *kernel_size, C/groups, O) of a ``flax.linen.Conv`` call.

    Sample i's gradient is ``Σ_t P_i[t]ᵀ g_i[t]``, with ``P_i`` its input patches (T positions ×
    kernel offsets × channels) taken by strided slices of the padded input. On CPU the samples go
    through ``lax.map``, one plain matrix product each, instead of ``vmap`` of the convolution's
    VJP (a convolution grouped over the batch; ``over_samples`` chooses). On accelerators, where a loop of
    B small products would leave the device idle, the same body is ``vmap``-ed into one batched
    product.

    Args:
        module: the bound or unbound ``nn.Conv`` (its strides, padding, dilations, groups).
        x: the call's input, (B, *spatial, C) (one batch axis).
        g: the cotangent at the call's output, (B, *out_spatial, O).
        over_samples: ``"map"``, ``"vmap"`` or ``"auto"`` (``"map"`` on the CPU backend).

    Returns:
        The per-sample kernel gradients, or None where this form does not apply (input
        dilation, a kernel mask, unshared weights, negative padding): use the vmap path then.
    """
    kernel_size = tuple(module.kernel_size) if not isinstance(module.kernel_size, int) else (module.kernel_size,)
    rank = len(kernel_size)

    def spread(v):
        v = 1 if v is None else v
        return (v,) * rank if isinstance(v, int) else tuple(v)

    strides, in_dil, dil = spread(module.strides), spread(module.input_dilation), spread(module.kernel_dilation)
    if (any(d != 1 for d in in_dil) or getattr(module, "mask", None) is not None
            or not getattr(module, "shared_weights", True) or x.ndim != rank + 2):
        return None
    resolved = _explicit_conv_padding(x, module.padding, kernel_size, strides, dil)
    if resolved is None:
        return None
    x, pads = resolved
    x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)])
    out = g.shape[1:-1]
    groups = module.feature_group_count
    c_in, c_out = x.shape[-1], g.shape[-1]
    t = math.prod(out)
    dtype = jnp.result_type(x, g)
    x, g = x.astype(dtype), g.astype(dtype)

    def one(pair):
        xi, gi = pair
        cols = []
        for offset in itertools.product(*(range(k) for k in kernel_size)):
            start = [o * d for o, d in zip(offset, dil)]
            stop = [s0 + (n - 1) * st + 1 for s0, n, st in zip(start, out, strides)]
            cols.append(lax.slice(xi, start + [0], stop + [c_in], list(strides) + [1]).reshape(t, c_in))
        gi = gi.reshape(t, c_out)
        if groups == 1:
            patches = jnp.concatenate(cols, axis=-1)                         # (T, K·C)
            return jnp.matmul(patches.T, gi, precision=module.precision)     # (K·C, O)
        patches = jnp.stack(cols, axis=1).reshape(t, len(cols), groups, c_in // groups)
        per_group = jnp.einsum("tkgc,tgo->kcgo", patches, gi.reshape(t, groups, c_out // groups),
                               precision=module.precision)
        return per_group.reshape(len(cols) * (c_in // groups), c_out)

    if over_samples == "auto":
        over_samples = "map" if jax.default_backend() == "cpu" else "vmap"
    if over_samples not in ("map", "vmap"):
        raise ValueError(f"over_samples must be 'auto', 'map' or 'vmap'; received {over_samples!r}.")
    per_sample = lax.map(one, (x, g)) if over_samples == "map" else jax.vmap(one)((x, g))
    return per_sample.reshape((x.shape[0],) + kernel_size + (c_in // groups, c_out))
