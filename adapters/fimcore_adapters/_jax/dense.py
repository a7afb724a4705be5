"""Dense layers (``Dense``/``DenseGeneral``): Gram block from captured inputs and output cotangents.

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

import jax
import jax.numpy as jnp

__all__ = ["dense_block", "materialised_block"]


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


def materialised_block(per_sample, dtype):
    """``Σ_leaves J_l J_lᵀ`` and the batch gradients ``Σ_i J_l[i]`` of per-sample gradient trees."""
    block = None
    for leaf in jax.tree_util.tree_leaves(per_sample):
        flat = leaf.reshape(leaf.shape[0], -1).astype(dtype)
        b = flat @ flat.T
        block = b if block is None else block + b
    grads = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), per_sample)
    return block, grads
