"""``flax.linen.Embed``: Gram block of a lookup table from the ids and the output cotangents.

Sample i's gradient of row v is ``Σ_{t: ids_it = v} g_it``; rows are ``B ×`` the per-sample
contributions, as for every captured layer (the caller rescales the Gram by B²).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["embed_block"]


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
