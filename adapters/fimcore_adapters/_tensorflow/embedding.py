"""The Embedding rule (registered on import; the registry is :mod:`.registry`)."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from . import kernels
from .registry import LayerRule, _plain, _present, register_layer_rule


# --------------------------------------------------------------------------- embedding


class EmbeddingRule(LayerRule):
    r"""``keras.layers.Embedding``: row i is :math:`\sum_t e_{id_{it}} \delta_{it}^\top`.

    Gram: factored :math:`\sum_{t,s}[id_{it}=id_{js}]\,\delta_{it}\cdot\delta_{js}` when
    T² ≤ B·T, else per-sample gradients restricted to the ids present in the batch
    (``tf.unique`` + segment sums, never V-sized per sample)."""

    name = "embedding"
    batch_major = True

    def supports(self, layer):
        return _plain(layer)

    def variables(self, layer):
        return _present(layer.embeddings)

    def forward(self, layer, call, args, kwargs):
        ids = args[0]
        if ids.dtype not in (tf.int32, tf.int64):
            ids = tf.cast(ids, tf.int32)
        y = call(*args, **kwargs)
        return y, {"ids": ids, "watch": [y]}

    @staticmethod
    def _flat(ids, g):
        batch = tf.shape(ids)[0]
        ids = tf.reshape(ids, tf.stack([batch, -1]))
        g = tf.reshape(g, tf.stack([batch, -1, g.shape[-1]]))
        return ids, g

    def _unique_rows(self, ids, g):
        batch = tf.shape(ids)[0]
        unique, index = tf.unique(tf.reshape(ids, [-1]))
        n_unique = tf.shape(unique)[0]
        segments = tf.reshape(tf.range(batch)[:, None] * n_unique + tf.reshape(index, tf.shape(ids)), [-1])
        rows = tf.math.unsorted_segment_sum(tf.reshape(g, [-1, g.shape[-1]]), segments, batch * n_unique)
        return unique, tf.reshape(rows, tf.stack([batch, n_unique, g.shape[-1]]))

    def per_sample(self, layer, capture, deltas):
        ids, g = self._flat(capture["ids"], deltas[0])
        onehot = tf.one_hot(ids, layer.input_dim, dtype=g.dtype)  # (B, T, V): shared layers only
        return [tf.matmul(onehot, g, transpose_a=True)]

    def factored(self, layer, capture, deltas):
        ids, g = self._flat(capture["ids"], deltas[0])
        flat_g = tf.reshape(g, [-1, g.shape[-1]])
        grad = tf.math.unsorted_segment_sum(flat_g, tf.reshape(ids, [-1]), layer.input_dim)
        same = tf.cast(tf.equal(ids[:, None, :, None], ids[None, :, None, :]), g.dtype)
        gram = tf.reduce_sum(same * tf.einsum("itd,jsd->ijts", g, g), axis=[2, 3])
        return gram, [grad], "factored"

    def mirrored(self, layer, capture, deltas, sink, *, strategy):
        ids, g = self._flat(capture["ids"], deltas[0])
        if None not in capture["ids"].shape[1:]:       # static T for the gathered-bytes count
            positions = math.prod(capture["ids"].shape[1:])
            ids = tf.ensure_shape(ids, [None, positions])
            g = tf.ensure_shape(g, [None, positions, g.shape[-1]])
        flat_g = tf.reshape(g, [-1, g.shape[-1]])
        grad = tf.math.unsorted_segment_sum(flat_g, tf.reshape(ids, [-1]), layer.input_dim)
        return sink.add_matched(layer.name, ids, g), [grad], "factored"

    def gram_and_grads(self, layer, capture, deltas):
        ids, g = self._flat(capture["ids"], deltas[0])
        positions = ids.shape[1]
        batch = ids.shape[0] or 128
        if positions is not None and positions * positions <= batch * positions:
            return self.factored(layer, capture, deltas)
        flat_g = tf.reshape(g, [-1, g.shape[-1]])
        grad = tf.math.unsorted_segment_sum(flat_g, tf.reshape(ids, [-1]), layer.input_dim)
        _, rows = self._unique_rows(ids, g)
        rows = kernels.flat_rows(rows)
        return kernels.gram_of_rows(rows), [grad], "materialised"


register_layer_rule(keras.layers.Embedding, EmbeddingRule())
