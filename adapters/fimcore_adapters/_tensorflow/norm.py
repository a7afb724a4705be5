"""Rules for BatchNormalization, LayerNormalization and GroupNormalization affine parameters."""

from __future__ import annotations

import keras
import tensorflow as tf

from .registry import LayerRule, _present, register_layer_rule


# --------------------------------------------------------------------------- normalisation


class _AffineNormRule(LayerRule):
    r"""Shared part of the normalisation rules: rows of :math:`\gamma` are
    :math:`\sum \hat x_i \delta_i` and of :math:`\beta` are :math:`\sum \delta_i`, summed
    over every axis except the batch and the parameter axes, with :math:`\hat x` the input
    normalised by the statistics the layer used (recomputed from its input; no gradient)."""

    batch_major = True

    def variables(self, layer):
        return _present(getattr(layer, "gamma", None), getattr(layer, "beta", None))

    def param_axes(self, layer, rank):
        raise NotImplementedError

    def normalised(self, layer, x, state, kwargs):
        raise NotImplementedError

    def read_state(self, layer, kwargs):
        return None

    def forward(self, layer, call, args, kwargs):
        x = args[0]
        if kwargs.get("mask") is not None:
            return call(*args, **kwargs), None
        state = self.read_state(layer, kwargs)
        out = call(*args, **kwargs)
        with tf.name_scope("fimcore_xhat"):
            x_hat = tf.stop_gradient(self.normalised(layer, tf.cast(x, out.dtype), state, kwargs))
        return out, {"x_hat": x_hat, "watch": [out]}

    def per_sample(self, layer, capture, deltas):
        x_hat, g = capture["x_hat"], deltas[0]
        rank = g.shape.rank
        keep = [a % rank for a in self.param_axes(layer, rank)]
        axes = [a for a in range(1, rank) if a not in keep]
        blocks = []
        for var, value in ((getattr(layer, "gamma", None), x_hat * g),
                           (getattr(layer, "beta", None), g)):
            if var is None or not var.trainable:
                continue
            rows = tf.reduce_sum(value, axis=axes) if axes else value
            blocks.append(tf.reshape(rows, tf.concat([tf.shape(g)[:1], list(var.shape)], 0)))
        return blocks


class BatchNormalizationRule(_AffineNormRule):
    """``BatchNormalization``: train mode keeps the batch statistics; rows are the per-sample
    contributions of the ordinary batch backward (they sum to B × the batch gradient)."""

    name = "batch_norm"

    def supports(self, layer):
        return not getattr(layer, "renorm", False) and not getattr(layer, "synchronized", False)

    def param_axes(self, layer, rank):
        return [layer.axis]

    def read_state(self, layer, kwargs):
        return tf.identity(layer.moving_mean), tf.identity(layer.moving_variance)

    def normalised(self, layer, x, state, kwargs):
        if kwargs.get("training") and layer.trainable:
            mean, variance = keras.ops.moments(x, axes=layer._reduction_axes, keepdims=True)
        else:
            shape = [1] * x.shape.rank
            shape[layer.axis] = -1
            mean = tf.reshape(tf.cast(state[0], x.dtype), shape)
            variance = tf.reshape(tf.cast(state[1], x.dtype), shape)
        return (x - mean) * tf.math.rsqrt(variance + layer.epsilon)


class LayerNormalizationRule(_AffineNormRule):
    """``LayerNormalization`` (per-sample statistics over ``axis``)."""

    name = "layer_norm"

    def supports(self, layer):
        return not getattr(layer, "rms_scaling", False)

    def param_axes(self, layer, rank):
        return list(layer.axis) if isinstance(layer.axis, (list, tuple)) else [layer.axis]

    def normalised(self, layer, x, state, kwargs):
        axes = [a % x.shape.rank for a in self.param_axes(layer, x.shape.rank)]
        mean, variance = keras.ops.moments(x, axes=axes, keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + layer.epsilon)


class GroupNormalizationRule(_AffineNormRule):
    """``GroupNormalization`` (per-sample statistics over each channel group)."""

    name = "group_norm"

    def param_axes(self, layer, rank):
        return [layer.axis]

    def normalised(self, layer, x, state, kwargs):
        rank = x.shape.rank
        axis = layer.axis % rank
        shape = tf.shape(x)
        grouped = tf.concat([shape[:axis], [layer.groups, x.shape[axis] // layer.groups],
                             shape[axis + 1:]], 0)
        xg = tf.reshape(x, grouped)
        axes = [a for a in range(1, rank + 1) if a != axis]
        mean, variance = keras.ops.moments(xg, axes=axes, keepdims=True)
        return tf.reshape((xg - mean) * tf.math.rsqrt(variance + layer.epsilon), shape)


register_layer_rule(keras.layers.BatchNormalization, BatchNormalizationRule())
register_layer_rule(keras.layers.LayerNormalization, LayerNormalizationRule())
register_layer_rule(keras.layers.GroupNormalization, GroupNormalizationRule())
