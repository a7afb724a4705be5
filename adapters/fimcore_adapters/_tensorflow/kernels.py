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
