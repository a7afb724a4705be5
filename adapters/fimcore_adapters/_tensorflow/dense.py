"""Rules for Dense, EinsumDense, Conv1D/2D/3D and Embedding (see :mod:`._registry`)."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from . import _conv, _linalg
from ._registry import LayerRule, _plain, _present


def _tokens(x):
    """(B, T, C) view of a (B, *positions, C) tensor; a (B, C) tensor is returned as is."""
    if x.shape.rank == 2:
        return x
    return tf.reshape(x, tf.stack([tf.shape(x)[0], -1, x.shape[-1]]))


class _KernelBiasRule(LayerRule):
    """Layers whose variables are a ``kernel`` and an optional ``bias`` (Dense, EinsumDense, Conv)."""

    def supports(self, layer):
        return _plain(layer)

    def variables(self, layer):
        return _present(layer.kernel, layer.bias)


# --------------------------------------------------------------------------- dense


class DenseRule(_KernelBiasRule):
    """``keras.layers.Dense``: factored :math:`(AA^\\top+1)\\odot(G_oG_o^\\top)` for 2-D inputs;
    for inputs with T token positions the cheaper of the factored T×T form and materialised
    per-sample gradients (cost model in :mod:`._linalg`)."""

    name = "dense"

    def forward(self, layer, call, args, kwargs):
        x = args[0]
        y = keras.ops.matmul(x, layer.kernel)
        if layer.bias is not None:
            y = keras.ops.add(y, layer.bias)
        out = layer.activation(y) if layer.activation is not None else y
        return out, {"a": x, "watch": [y]}

    def per_sample(self, layer, capture, deltas):
        a = _tokens(capture["a"])
        g = _tokens(deltas[0])
        blocks = []
        if layer.kernel.trainable:
            blocks.append(_linalg.per_sample_outer(a, g))
        if layer.bias is not None and layer.bias.trainable:
            blocks.append(g if g.shape.rank == 2 else tf.reduce_sum(g, axis=1))
        return blocks

    def factored(self, layer, capture, deltas):
        if not (layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)):
            return None
        a = _tokens(capture["a"])
        g = _tokens(deltas[0])
        gram = _linalg.factored_gram(a, g, bias=layer.bias is not None)
        if a.shape.rank == 2:
            grads = [tf.matmul(a, g, transpose_a=True)]
            if layer.bias is not None:
                grads.append(tf.reduce_sum(g, axis=0))
        else:
            grads = [tf.einsum("btd,bto->do", a, g)]
            if layer.bias is not None:
                grads.append(tf.reduce_sum(g, axis=[0, 1]))
        return gram, grads, "factored"

    def gram_and_grads(self, layer, capture, deltas):
        a = _tokens(capture["a"])
        g = _tokens(deltas[0])
        if not (layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)):
            return super().gram_and_grads(layer, capture, deltas)
        positions = 1 if a.shape.rank == 2 else a.shape[1]
        batch = a.shape[0] or 128
        d_in, d_out = a.shape[-1], g.shape[-1]
        if positions is not None and (positions == 1 or _linalg.factored_cost(
                batch, positions, d_in, d_out) < _linalg.materialised_cost(batch, positions, d_in, d_out)):
            return self.factored(layer, capture, deltas)
        return super().gram_and_grads(layer, capture, deltas)


# --------------------------------------------------------------------------- einsum dense


class EinsumDenseRule(_KernelBiasRule):
    """``keras.layers.EinsumDense``: per-sample kernel gradients from one einsum that keeps
    the batch index, bias rows by summing δ over the broadcast axes."""

    name = "einsum_dense"

    def supports(self, layer):
        if not _plain(layer):
            return False
        try:
            spec_in, rest = layer.equation.split(",")
            spec_k, spec_out = rest.split("->")
        except ValueError:
            return False
        if "." in layer.equation:
            return False
        b = spec_in[:1]
        return bool(b) and spec_out[:1] == b and b not in spec_k

    def forward(self, layer, call, args, kwargs):
        x = args[0]
        y = keras.ops.einsum(layer.equation, x, layer.kernel)
        if layer.bias is not None:
            y = keras.ops.add(y, layer.bias)
        out = layer.activation(y) if layer.activation is not None else y
        return out, {"a": x, "watch": [y]}

    def per_sample(self, layer, capture, deltas):
        spec_in, rest = layer.equation.split(",")
        spec_k, spec_out = rest.split("->")
        g = deltas[0]
        blocks = []
        if layer.kernel.trainable:
            b = spec_in[0]
            blocks.append(tf.einsum(f"{spec_in},{spec_out}->{b}{spec_k}", capture["a"], g))
        if layer.bias is not None and layer.bias.trainable:
            blocks.append(_reduce_to_shape(g, tuple(layer.bias.shape)))
        return blocks


def _reduce_to_shape(g, shape):
    """Sum ``g`` (B, *out) to per-sample blocks (B, *shape), ``shape`` broadcast from the right."""
    rank = g.shape.rank - 1
    lead = list(range(1, 1 + rank - len(shape)))
    if lead:
        g = tf.reduce_sum(g, axis=lead)
    axes = [i + 1 for i, n in enumerate(shape) if n == 1 and g.shape[i + 1] != 1]
    if axes:
        g = tf.reduce_sum(g, axis=axes, keepdims=True)
    return tf.reshape(g, tf.concat([tf.shape(g)[:1], list(shape)], 0))


# --------------------------------------------------------------------------- convolutions


class ConvRule(_KernelBiasRule):
    """``Conv1D/2D/3D`` (strides, padding incl. causal, dilation, groups, both data formats):
    per-sample kernel gradients materialised from a grouped filter gradient over the batch
    (float32, 1-D/2-D, no dilation; handed to the Gram as (P, B) columns) or else from a
    strided-slice unfold (one batched matmul over output positions), bias rows ``Σ_t δ_t``;
    the factored T×T form when cheaper (ungrouped only)."""

    name = "conv"

    def forward(self, layer, call, args, kwargs):
        x = args[0]
        padding = layer.padding
        if padding == "causal":  # Conv1D pads on the left, then runs a valid convolution
            x = keras.ops.pad(x, layer._compute_causal_padding())
            padding = "valid"
        y = keras.ops.conv(x, layer.kernel, strides=list(layer.strides), padding=padding,
                           dilation_rate=layer.dilation_rate, data_format=layer.data_format)
        if layer.use_bias:
            if layer.data_format == "channels_last":
                shape = (1,) * (layer.rank + 1) + (layer.filters,)
            else:
                shape = (1, layer.filters) + (1,) * layer.rank
            y = keras.ops.add(y, keras.ops.reshape(layer.bias, shape))
        out = layer.activation(y) if layer.activation is not None else y
        return out, {"a": x, "padding": padding, "watch": [y]}

    @staticmethod
    def _channels_last(layer, capture, deltas):
        x, g = capture["a"], deltas[0]
        if layer.data_format == "channels_first":
            perm = [0, *range(2, layer.rank + 2), 1]
            x, g = tf.transpose(x, perm), tf.transpose(g, perm)
        return x, g

    @staticmethod
    def _patches(layer, x, g, padding):
        out_shape = [g.shape[i + 1] if g.shape[i + 1] is not None else tf.shape(g)[i + 1]
                     for i in range(layer.rank)]
        return _conv.unfold(x, out_shape=out_shape, kernel_size=tuple(layer.kernel_size),
                            strides=tuple(layer.strides),
                            dilation_rate=tuple(layer.dilation_rate), padding=padding)

    def per_sample(self, layer, capture, deltas):
        """Per-sample kernel gradients (grouped filter gradient or unfold) and bias rows."""
        x, g = self._channels_last(layer, capture, deltas)
        blocks = []
        if layer.kernel.trainable:
            kernel_shape = list(layer.kernel.shape)
            if _conv.grouped_applies(x, rank=layer.rank, dilation_rate=tuple(layer.dilation_rate)):
                blocks.append(_conv.grouped_kernel_grads(
                    x, g, kernel_size=layer.kernel_size, strides=layer.strides,
                    padding=capture["padding"], groups=layer.groups, kernel_shape=kernel_shape))
            else:
                blocks.append(_conv.per_sample_kernel_grads(
                    self._patches(layer, x, g, capture["padding"]), _tokens(g), groups=layer.groups,
                    kernel_shape=kernel_shape))
        if layer.bias is not None and layer.bias.trainable:
            blocks.append(tf.reduce_sum(_tokens(g), axis=1))
        return blocks

    def factored(self, layer, capture, deltas):
        all_trainable = layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)
        if layer.groups != 1 or not all_trainable:
            return None
        x, g = self._channels_last(layer, capture, deltas)
        d_a = x.shape[-1] * math.prod(layer.kernel_size)
        patches = self._patches(layer, x, g, capture["padding"])
        a = tf.reshape(patches, tf.stack([tf.shape(patches)[0], -1, d_a]))
        g = _tokens(g)
        gram = _linalg.factored_gram(a, g, bias=layer.bias is not None)
        grads = [tf.reshape(tf.einsum("btd,bto->do", a, g), layer.kernel.shape)]
        if layer.bias is not None:
            grads.append(tf.reduce_sum(g, axis=[0, 1]))
        return gram, grads, "factored"

    def gram_and_grads(self, layer, capture, deltas):
        x, g = self._channels_last(layer, capture, deltas)
        positions = 1
        for n in g.shape[1:-1]:
            positions = None if n is None or positions is None else positions * n
        d_a = x.shape[-1] * math.prod(layer.kernel_size)
        all_trainable = layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)
        batch = g.shape[0] or 128
        if (layer.groups == 1 and all_trainable and positions is not None
                and _linalg.factored_cost(batch, positions, d_a, layer.filters)
                < _linalg.materialised_cost(batch, positions, d_a, layer.filters)):
            return self.factored(layer, capture, deltas)
        if layer.kernel.trainable and _conv.grouped_applies(
                x, rank=layer.rank, dilation_rate=tuple(layer.dilation_rate)):
            cols, grads = _conv.grouped_kernel_columns(
                x, g, kernel_size=layer.kernel_size, strides=layer.strides,
                padding=capture["padding"], groups=layer.groups,
                kernel_shape=list(layer.kernel.shape))
            cols, grads = [cols], [grads]
            if layer.bias is not None and layer.bias.trainable:
                rows = tf.reduce_sum(_tokens(g), axis=1)  # (B, C_out)
                cols.append(tf.transpose(rows))
                grads.append(tf.reduce_sum(rows, axis=0))
            return _linalg.gram_of_columns(tf.concat(cols, axis=0)), grads, "materialised"
        return super().gram_and_grads(layer, capture, deltas)


# --------------------------------------------------------------------------- embedding


class EmbeddingRule(LayerRule):
    r"""``keras.layers.Embedding``: row i is :math:`\sum_t e_{id_{it}} \delta_{it}^\top`.

    Gram: factored :math:`\sum_{t,s}[id_{it}=id_{js}]\,\delta_{it}\cdot\delta_{js}` when
    T² ≤ B·T, else per-sample gradients restricted to the ids present in the batch
    (``tf.unique`` + segment sums, never V-sized per sample)."""

    name = "embedding"

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

    def gram_and_grads(self, layer, capture, deltas):
        ids, g = self._flat(capture["ids"], deltas[0])
        positions = ids.shape[1]
        batch = ids.shape[0] or 128
        if positions is not None and positions * positions <= batch * positions:
            return self.factored(layer, capture, deltas)
        flat_g = tf.reshape(g, [-1, g.shape[-1]])
        grad = tf.math.unsorted_segment_sum(flat_g, tf.reshape(ids, [-1]), layer.input_dim)
        _, rows = self._unique_rows(ids, g)
        rows = _linalg.flat_rows(rows)
        return _linalg.gram_of_rows(rows), [grad], "materialised"
