"""Rules for Dense and EinsumDense (registered on import; the registry is :mod:`.registry`)."""

from __future__ import annotations

import keras
import tensorflow as tf

from . import cost, kernels
from .registry import LayerRule, _plain, _present, register_layer_rule


def _tokens(x):
    """(B, T, C) view of a (B, *positions, C) tensor; a (B, C) tensor is returned as is."""
    if x.shape.rank == 2:
        return x
    return tf.reshape(x, tf.stack([tf.shape(x)[0], -1, x.shape[-1]]))


class _KernelBiasRule(LayerRule):
    """Layers whose variables are a ``kernel`` and an optional ``bias`` (Dense, EinsumDense, Conv)."""

    batch_major = True

    def supports(self, layer):
        return _plain(layer)

    def variables(self, layer):
        return _present(layer.kernel, layer.bias)


def factor_grads(layer, a, g):
    """Batch gradients of ``kernel`` (and ``bias``) from factors a (B, [T,] d_a), g (B, [T,] d_g)."""
    if a.shape.rank == 2:
        grads = [tf.matmul(a, g, transpose_a=True)]
        axes = [0]
    else:
        grads = [tf.einsum("btd,bto->do", a, g)]
        axes = [0, 1]
    grads = [tf.reshape(grads[0], layer.kernel.shape)]
    if layer.bias is not None:
        grads.append(tf.reduce_sum(g, axis=axes))
    return grads


def mirrored_factors(layer, a, g, sink, *, strategy):
    """Gather the factors (b, [T,] d_a), (b, [T,] d_g) when they are no larger per sample than
    the rows (d_a·d_g [+ d_g]) or ``strategy="factored"``; else None (the rows are gathered)."""
    positions = 1 if a.shape.rank == 2 else a.shape[1]
    d_a, d_g = a.shape[-1], g.shape[-1]
    per_row = d_a * d_g + (d_g if layer.bias is not None else 0)
    if strategy != "factored" and (positions is None or positions * (d_a + d_g) > per_row):
        return None
    gram = sink.add_factors(layer.name, a, g, bias=layer.bias is not None)
    return gram, factor_grads(layer, a, g), "factored"


# --------------------------------------------------------------------------- dense


class DenseRule(_KernelBiasRule):
    """``keras.layers.Dense``: factored :math:`(AA^\\top+1)\\odot(G_oG_o^\\top)` for 2-D inputs;
    for inputs with T token positions the cheaper of the factored T×T form and materialised
    per-sample gradients (cost model in :mod:`.cost`)."""

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
            blocks.append(kernels.per_sample_outer(a, g))
        if layer.bias is not None and layer.bias.trainable:
            blocks.append(g if g.shape.rank == 2 else tf.reduce_sum(g, axis=1))
        return blocks

    def factored(self, layer, capture, deltas):
        if not (layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)):
            return None
        a = _tokens(capture["a"])
        g = _tokens(deltas[0])
        gram = kernels.factored_gram(a, g, bias=layer.bias is not None)
        return gram, factor_grads(layer, a, g), "factored"

    def factors(self, layer, capture, deltas):
        if not (layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)):
            return None
        return _tokens(capture["a"]), _tokens(deltas[0]), layer.bias is not None

    def mirrored(self, layer, capture, deltas, sink, *, strategy):
        found = self.factors(layer, capture, deltas)
        return None if found is None else mirrored_factors(layer, *found[:2], sink, strategy=strategy)

    def gram_and_grads(self, layer, capture, deltas):
        a = _tokens(capture["a"])
        g = _tokens(deltas[0])
        if not (layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)):
            return super().gram_and_grads(layer, capture, deltas)
        positions = 1 if a.shape.rank == 2 else a.shape[1]
        batch = a.shape[0] or 128
        d_in, d_out = a.shape[-1], g.shape[-1]
        if positions is not None and (positions == 1 or cost.factored_cost(
                batch, positions, d_in, d_out) < cost.materialised_cost(batch, positions, d_in, d_out)):
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


register_layer_rule(keras.layers.Dense, DenseRule())
register_layer_rule(keras.layers.EinsumDense, EinsumDenseRule())
