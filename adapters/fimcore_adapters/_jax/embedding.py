"""``flax.linen.Embed``: Gram block of a lookup table from the ids and the output cotangents.

Sample i's gradient of row v is ``Σ_{t: ids_it = v} g_it``; rows are ``B ×`` the per-sample
contributions, as for every captured layer (the caller rescales the Gram by B²).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .dense import chunked_gram, factored_rows

__all__ = ["embed_block"]


def embed_block(ids, g, *, num_embeddings, form, dtype, param_dtype, chunk=None):
    """Gram block and gradient of an embedding lookup ``y_it = E[ids_it]``.

    Factored: ``G_ij = Σ_{t,s} [ids_it = ids_js] (g_it·g_js)``; materialised: per-sample
    (V × d) gradients by a one-hot contraction (chosen when ``V·d`` is small). ``chunk``: None or
    the samples processed at a time under ``memory_budget`` (see :mod:`.dense`).
    """
    ids = jnp.where(ids < 0, ids + num_embeddings, ids)
    onehot = jax.nn.one_hot(ids, num_embeddings, dtype=g.dtype)  # (B, T, V); out of range -> 0
    grads = {"embedding": jnp.einsum("btv,btd->vd", onehot, g).astype(param_dtype)}
    g64 = g.astype(dtype)
    size = ids.shape[0]
    valid = (ids >= 0) & (ids < num_embeddings)
    if chunk is not None and chunk < size:
        if form == "factored":
            def rows(ids_c, g_c):
                ok = (ids_c >= 0) & (ids_c < num_embeddings)
                same = (ids_c[:, None, :, None] == ids[None, :, None, :]) & ok[:, None, :, None] \
                    & valid[None, :, None, :]
                gg = jnp.einsum("itd,jsd->ijts", g_c, g64)
                return jnp.sum(jnp.where(same, gg, 0.0), axis=(2, 3))
            return factored_rows(rows, (ids, g64), size, chunk), grads

        def per_sample(ops):
            ids_c, g_c = ops
            hot = jax.nn.one_hot(ids_c, num_embeddings, dtype=dtype)
            return {"embedding": jnp.einsum("btv,btd->bvd", hot, g_c)}
        return chunked_gram(per_sample, (ids, g64), size, chunk, dtype)[0], grads
    if form == "factored":
        same = (ids[:, None, :, None] == ids[None, :, None, :]) & valid[:, None, :, None]
        gg = jnp.einsum("itd,jsd->ijts", g64, g64)
        block = jnp.sum(jnp.where(same, gg, 0.0), axis=(2, 3))
    else:
        per_sample = jnp.einsum("btv,btd->bvd", onehot.astype(dtype), g64).reshape(ids.shape[0], -1)
        block = per_sample @ per_sample.T
    return block, grads
