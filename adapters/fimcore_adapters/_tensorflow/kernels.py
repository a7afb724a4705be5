"""Small tensor helpers shared by the layer rules (TensorFlow only, no Keras state).

Every helper takes per-sample factors whose leading axis is the batch (size B) and
returns TensorFlow tensors; nothing here leaves the device TensorFlow placed the step on.
"""

from __future__ import annotations

import tensorflow as tf


def flat_rows(block):
    """Reshape a per-sample block (B, *shape) into a (B, prod(shape)) matrix."""
    return tf.reshape(block, tf.stack([tf.shape(block)[0], -1]))


def gram_of_rows(rows):
    """``J_l J_lᵀ`` of a materialised (B, P_l) block."""
    return tf.matmul(rows, rows, transpose_b=True)


def gram_of_columns(columns):
    """``J_l J_lᵀ`` of a materialised block held as (P_l, B) columns (``J_lᵀ``)."""
    return tf.matmul(columns, columns, transpose_a=True)


def factored_gram(a, g, *, bias: bool):
    r"""Exact Gram of a weight used at T positions, without forming per-sample gradients.

    For a weight :math:`W` with per-sample gradient :math:`\sum_t g_{it} a_{it}^\top`
    (``a``: (B, T, d_in) inputs, ``g``: (B, T, d_out) output gradients),

    .. math:: G_{ij} = \sum_{t,s} (a_{it}\cdot a_{js})\,(g_{it}\cdot g_{js}),

    which for T = 1 is :math:`(A A^\top)\odot(G_o G_o^\top)`. A bias adds
    :math:`\sum_{t,s} g_{it}\cdot g_{js}`, i.e. a column of ones appended to ``a``.
    """
    if a.shape.rank == 2:  # T = 1: (A Aᵀ + 1) ⊙ (Gₒ Gₒᵀ)
        aa = tf.matmul(a, a, transpose_b=True)
        gg = tf.matmul(g, g, transpose_b=True)
        return (aa + 1.0) * gg if bias else aa * gg
    aa = tf.einsum("itd,jsd->ijts", a, a)
    gg = tf.einsum("ito,jso->ijts", g, g)
    if bias:
        aa = aa + 1.0
    return tf.reduce_sum(aa * gg, axis=[2, 3])


def per_sample_outer(a, g):
    """Per-sample weight gradients ``Σ_t a_it g_itᵀ``: (B, d_in, d_out) from (B, T, ·) or (B, ·)."""
    if a.shape.rank == 2:
        return a[:, :, None] * g[:, None, :]
    return tf.matmul(a, g, transpose_a=True)


# --------------------------------------------------------------------------- memory_budget


def row_blocks(batch, size, block, dtype):
    """The (B, ·) matrix stacked from ``block(i0, i1)`` (rows i0:i1) over chunks of ``size``
    samples, in a ``tf.while_loop`` (so ``batch`` may be known only at run time)."""
    count = (batch + size - 1) // size
    parts = tf.TensorArray(dtype, size=count, infer_shape=False)

    def body(c, parts):
        i0 = c * size
        return c + 1, parts.write(c, block(i0, tf.minimum(i0 + size, batch)))

    _, parts = tf.while_loop(lambda c, _: c < count, body, (tf.constant(0, batch.dtype), parts))
    return parts.concat()


def factored_gram_chunked(a, g, *, bias: bool, size):
    r""":func:`factored_gram` in row chunks of ``size`` samples: for rows i0:i1 only the
    (n, B, T, T) products are alive (n·B·T² entries each for a and g, instead of B²T²)."""
    batch = tf.shape(a)[0]

    def block(i0, i1):
        if a.shape.rank == 2:
            aa = tf.matmul(a[i0:i1], a, transpose_b=True)
            gg = tf.matmul(g[i0:i1], g, transpose_b=True)
            return (aa + 1.0) * gg if bias else aa * gg
        aa = tf.einsum("itd,jsd->ijts", a[i0:i1], a)
        gg = tf.einsum("ito,jso->ijts", g[i0:i1], g)
        return tf.reduce_sum((aa + 1.0 if bias else aa) * gg, axis=[2, 3])

    return row_blocks(batch, size, block, a.dtype)


def rows_gram_chunked(batch, size, rows, dtype):
    r""":math:`J_l J_l^\top` from ``rows(i0, i1)`` (the (n, P_l) rows of samples i0:i1), two
    chunks alive at a time: block (I, J) is :math:`R_I R_J^\top`, every chunk's rows recomputed
    for each row chunk (k² calls of ``rows`` for k chunks: memory traded for time)."""
    def block(i0, i1):
        mine = rows(i0, i1)
        other = row_blocks(batch, size, lambda j0, j1: tf.matmul(rows(j0, j1), mine,
                                                                 transpose_b=True), dtype)
        return tf.transpose(other)       # (n_I, B)

    return row_blocks(batch, size, block, dtype)
