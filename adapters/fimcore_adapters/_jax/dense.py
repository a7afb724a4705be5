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

Under ``memory_budget`` (bytes) the per-layer temporaries are bounded by processing the batch in
chunks of c samples: the factored form builds c rows of ``A Aᵀ`` and ``Gₒ Gₒᵀ`` at a time
(``2·c·B·T²`` entries), the materialised form holds the per-sample gradients of two chunks
(``2·c·P_l`` entries: chunk a against chunk b; the blocks of b < a are formed by recomputing
chunk b, exact, ``n(n+1)/2`` chunk evaluations for ``n = ⌈B/c⌉``). Both loops are ``lax.scan``
so XLA keeps one chunk's temporaries alive at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["budget_chunk", "chunked_gram", "dense_block", "factored_rows", "materialised_block"]


def dense_block(a, g, *, has_bias, form, dtype, chunk=None):
    """Gram block and batch gradients of ``y = a @ W + b`` (W: d_in × d_out).

    ``chunk``: None (the whole batch at once) or the number of samples processed at a time
    (from :func:`budget_chunk`).

    Returns ``(block, {"kernel": Σ_it a_itᵀ g_it, "bias": Σ_it g_it})``.
    """
    grads = {"kernel": jnp.einsum("bti,bto->io", a, g)}
    if has_bias:
        grads["bias"] = jnp.sum(g, axis=(0, 1))
    a64, g64 = a.astype(dtype), g.astype(dtype)
    positions = a.shape[1]
    size = a.shape[0]
    if chunk is not None and chunk < size:
        if form == "factored":
            def rows(ai, gi):
                aa = jnp.einsum("itd,jsd->ijts", ai, a64)
                gg = jnp.einsum("itd,jsd->ijts", gi, g64)
                out = jnp.sum(aa * gg, axis=(2, 3))
                if has_bias:
                    out = out + jnp.sum(gi, axis=1) @ jnp.sum(g64, axis=1).T
                return out
            return factored_rows(rows, (a64, g64), size, chunk), grads

        def per_sample(ops):
            ai, gi = ops
            out = {"kernel": jnp.einsum("bti,bto->bio", ai, gi)}
            if has_bias:
                out["bias"] = jnp.sum(gi, axis=1)
            return out
        return chunked_gram(per_sample, (a64, g64), size, chunk, dtype)[0], grads
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


def budget_chunk(budget, per_sample_bytes, size, what):
    """Samples per chunk so that ``chunk · per_sample_bytes ≤ budget`` (None: no chunking needed).

    Raises ``ValueError`` when not even one sample's temporaries fit, naming ``what`` must hold.
    """
    if budget is None or per_sample_bytes * size <= budget:
        return None
    if per_sample_bytes > budget:
        raise ValueError(
            f"memory_budget must hold the temporaries of at least one sample of {what}: "
            f"{per_sample_bytes} bytes; received memory_budget={budget!r}. Raise memory_budget to "
            f"at least {per_sample_bytes}, or pass None")
    return int(budget // per_sample_bytes)


def _pad(x, padded):
    return jnp.pad(x, [(0, padded - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def factored_rows(rows, operands, size, chunk):
    """``(B, B)`` from ``rows(*chunk_operands) -> (c, B)``, c samples at a time (``lax.map``)."""
    n = -(-size // chunk)
    padded = jax.tree_util.tree_map(lambda x: _pad(x, n * chunk), operands)

    def one(k):
        ops = jax.tree_util.tree_map(lambda x: lax.dynamic_slice_in_dim(x, k * chunk, chunk), padded)
        return rows(*ops)

    out = lax.map(one, jnp.arange(n))
    return out.reshape((n * chunk,) + out.shape[2:])[:size]


def chunked_gram(per_sample, operands, size, chunk, dtype):
    """``(Σ_leaves J Jᵀ, Σ_i J_i)`` from ``per_sample(chunk_operands) -> {name: (c, *shape)}``.

    The per-sample gradients must depend on each sample's slice of ``operands`` only (padding
    samples are zero rows and are masked anyway). Two chunks are alive at a time: chunk a and,
    recomputed, chunk b < a; ``n(n+1)/2`` chunk evaluations for ``n = ⌈B/c⌉``.
    """
    if chunk is None or chunk >= size:
        return materialised_block(per_sample(operands), dtype)
    n = -(-size // chunk)
    padded_ops = jax.tree_util.tree_map(lambda x: _pad(x, n * chunk), operands)
    mask = (jnp.arange(n * chunk) < size).reshape(n, chunk)

    def rows(k):
        ops = jax.tree_util.tree_map(lambda x: lax.dynamic_slice_in_dim(x, k * chunk, chunk),
                                     padded_ops)
        out = per_sample(ops)
        m = mask[k]
        return jax.tree_util.tree_map(
            lambda g: g * m.reshape((chunk,) + (1,) * (g.ndim - 1)).astype(g.dtype), out)

    def flat(tree):
        return jnp.concatenate([x.reshape(chunk, -1).astype(dtype)
                                for x in jax.tree_util.tree_leaves(tree)], axis=1)

    shapes = jax.eval_shape(rows, 0)
    zero_sum = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape[1:], s.dtype), shapes)

    def outer(carry, a):
        gram, total = carry
        ja = rows(a)
        fa = flat(ja)
        gram = lax.dynamic_update_slice(gram, fa @ fa.T, (a * chunk, a * chunk))

        def inner(b, g):
            fb = flat(rows(b))
            block = fa @ fb.T
            g = lax.dynamic_update_slice(g, block, (a * chunk, b * chunk))
            return lax.dynamic_update_slice(g, block.T, (b * chunk, a * chunk))

        gram = lax.fori_loop(0, a, inner, gram)
        total = jax.tree_util.tree_map(lambda s, x: s + jnp.sum(x, axis=0), total, ja)
        return (gram, total), None

    init = (jnp.zeros((n * chunk, n * chunk), dtype), zero_sum)
    (gram, total), _ = lax.scan(outer, init, jnp.arange(n))
    return gram[:size, :size], total
