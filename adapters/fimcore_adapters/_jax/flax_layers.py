"""Per-layer Gram contributions from captured layer inputs and output cotangents.

Notation: ``a`` (B, T, d_in) are a layer's inputs at its T positions, ``g`` (B, T, d_out) the
cotangents of the batch loss at its outputs. Rows of ``J`` are ``B ×`` the per-sample
contributions (architecture.md §3), so the caller multiplies the summed Gram by B².
Each function returns ``(gram_block, param_grads)`` with ``param_grads`` a dict of the layer's
batch gradients (sums of the per-sample contributions, for the optimiser step).

Two exact forms (architecture.md §5):

- factored: ``G_ij = Σ_{t,s} (a_it·a_js)(g_it·g_js)``; for T = 1 this is ``(A Aᵀ) ⊙ (Gₒ Gₒᵀ)``;
- materialised: per-sample weight gradients ``J_l`` (B × P_l), then ``J_l J_lᵀ``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "choose_dense_form",
    "dense_block",
    "embed_block",
    "materialised_block",
    "norm_block",
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


def norm_block(xhat, g, *, feature_axes, use_scale, use_bias, dtype):
    """Per-sample affine blocks of a normalisation layer ``y = x̂·γ + β``.

    ``∂/∂γ_i = Σ_t x̂_it δ_it`` and ``∂/∂β_i = Σ_t δ_it`` over every axis except the batch
    axis and the feature axes (for BatchNorm in train mode ``δ`` already carries the
    coupling through the batch statistics, so these are the batch-contribution rows).
    """
    reduce = tuple(ax for ax in range(1, g.ndim) if ax not in feature_axes)
    batch = g.shape[0]
    grads, rows = {}, []
    if use_scale:
        s = jnp.sum(xhat.astype(g.dtype) * g, axis=reduce)
        grads["scale"] = jnp.sum(s, axis=0)
        rows.append(s.reshape(batch, -1).astype(dtype))
    if use_bias:
        b = jnp.sum(g, axis=reduce)
        grads["bias"] = jnp.sum(b, axis=0)
        rows.append(b.reshape(batch, -1).astype(dtype))
    block = None
    for r in rows:
        block = r @ r.T if block is None else block + r @ r.T
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
