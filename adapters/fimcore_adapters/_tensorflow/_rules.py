"""Layer registry: exact per-layer Gram contributions for Keras layers.

A :class:`LayerRule` knows one layer type's forward well enough to capture, during the
ordinary forward pass, the tensors its per-sample gradients are made of (the layer input
``a`` and the pre-activation output, whose loss gradient ``δ`` the ordinary backward
provides), and turns them into that layer's Gram contribution and its batch gradients.

Rows are per-sample *contributions* to the gradient of the batch loss (architecture.md §3):
for a layer without cross-sample coupling row i is sample i's own gradient; behind a
train-mode BatchNormalization the coupling is already inside ``δ``.

Users extend the registry with :func:`register_layer_rule`.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
import tensorflow as tf

from . import _conv, _linalg

_REGISTRY: dict[type, "LayerRule"] = {}


class LayerRule:
    """How one Keras layer type contributes to the Gram.

    Subclasses implement :meth:`variables`, :meth:`forward` and :meth:`per_sample`;
    :meth:`gram_and_grads` may be overridden with a cheaper exact form (e.g. factored).
    """

    #: name used in path reports
    name = "rule"

    def supports(self, layer: keras.layers.Layer) -> bool:
        """Whether this rule is exact for ``layer`` (else the generic path is taken)."""
        return True

    def variables(self, layer: keras.layers.Layer) -> list:
        """The trainable variables of ``layer`` this rule covers, in a fixed order."""
        raise NotImplementedError

    def forward(self, layer, call: Callable, args: tuple, kwargs: dict):
        """Run the layer; return ``(outputs, capture)``.

        ``capture`` is a dict whose ``"watch"`` entry lists the tensors whose loss gradient
        :meth:`per_sample` needs; return ``capture=None`` to send this call to the generic path.
        """
        raise NotImplementedError

    def per_sample(self, layer, capture: dict, deltas: list) -> list:
        """Per-sample gradient blocks (B, *v.shape), one per :meth:`variables` entry."""
        raise NotImplementedError

    def gram_and_grads(self, layer, capture: dict, deltas: list):
        """``(gram contribution (B, B), batch gradients, path)`` of one call."""
        blocks = self.per_sample(layer, capture, deltas)
        rows = tf.concat([_linalg.flat_rows(b) for b in blocks], axis=1)
        return _linalg.gram_of_rows(rows), [tf.reduce_sum(b, axis=0) for b in blocks], "materialised"


def register_layer_rule(layer_type: type, rule: LayerRule | None = None):
    """Register ``rule`` for ``layer_type`` (usable as a class decorator on the rule).

    The rule applies to ``layer_type`` and to subclasses that do not override ``call``.

    Example:
        >>> import keras
        >>> from fimcore_adapters.tensorflow import LayerRule, register_layer_rule, rule_for
        >>> class Scale(keras.layers.Layer):
        ...     def build(self, shape):
        ...         self.w = self.add_weight(shape=(shape[-1],), initializer="ones")
        ...     def call(self, x):
        ...         return x * self.w
        >>> @register_layer_rule(Scale)
        ... class ScaleRule(LayerRule):
        ...     name = "scale"
        ...     def variables(self, layer):
        ...         return [layer.w]
        ...     def forward(self, layer, call, args, kwargs):
        ...         y = call(*args, **kwargs)
        ...         return y, {"x": args[0], "watch": [y]}
        ...     def per_sample(self, layer, capture, deltas):
        ...         return [capture["x"] * deltas[0]]
        >>> rule_for(Scale()).name
        'scale'
    """
    if not isinstance(layer_type, type) or not issubclass(layer_type, keras.layers.Layer):
        raise TypeError(
            "register_layer_rule needs a keras.layers.Layer subclass; received "
            f"{layer_type!r}. Pass the layer class, e.g. register_layer_rule(MyLayer, MyRule())."
        )

    def _store(r):
        instance = r() if isinstance(r, type) else r
        if not isinstance(instance, LayerRule):
            raise TypeError(
                f"a layer rule must be a LayerRule instance or subclass; received {r!r}. "
                "Subclass fimcore_adapters.tensorflow.LayerRule."
            )
        _REGISTRY[layer_type] = instance
        return r

    if rule is None:
        return _store
    _store(rule)
    return rule


def rule_for(layer: keras.layers.Layer) -> LayerRule | None:
    """The registered rule that applies exactly to ``layer``, or None (generic path)."""
    for cls in type(layer).__mro__:
        rule = _REGISTRY.get(cls)
        if rule is None:
            continue
        if type(layer).call is not cls.call:  # a subclass changed the math
            return None
        return rule if rule.supports(layer) else None
    return None


def own_trainable_variables(layer: keras.layers.Layer) -> list:
    """Trainable variables created by ``layer`` itself (not by its sub-layers)."""
    if not layer.trainable:
        return []
    return [v for v in getattr(layer, "_trainable_variables", []) if v.trainable]


def _plain(layer) -> bool:
    return (not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None)


def _present(*variables):
    return [v for v in variables if v is not None and v.trainable]


# --------------------------------------------------------------------------- dense


class DenseRule(LayerRule):
    """``keras.layers.Dense``: factored :math:`(AA^\\top+1)\\odot(G_oG_o^\\top)` for 2-D inputs;
    for inputs with T token positions the cheaper of the factored T×T form and materialised
    per-sample gradients (cost model in :mod:`._linalg`)."""

    name = "dense"

    def supports(self, layer):
        return _plain(layer)

    def variables(self, layer):
        return _present(layer.kernel, layer.bias)

    def forward(self, layer, call, args, kwargs):
        x = args[0]
        y = keras.ops.matmul(x, layer.kernel)
        if layer.bias is not None:
            y = keras.ops.add(y, layer.bias)
        out = layer.activation(y) if layer.activation is not None else y
        return out, {"a": x, "watch": [y]}

    @staticmethod
    def _tokens(x, d):
        if x.shape.rank == 2:
            return x
        return tf.reshape(x, tf.stack([tf.shape(x)[0], -1, x.shape[-1]]))

    def per_sample(self, layer, capture, deltas):
        a = self._tokens(capture["a"], None)
        g = self._tokens(deltas[0], None)
        blocks = []
        if layer.kernel.trainable:
            blocks.append(_linalg.per_sample_outer(a, g))
        if layer.bias is not None and layer.bias.trainable:
            blocks.append(g if g.shape.rank == 2 else tf.reduce_sum(g, axis=1))
        return blocks

    def gram_and_grads(self, layer, capture, deltas):
        a = self._tokens(capture["a"], None)
        g = self._tokens(deltas[0], None)
        if not (layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)):
            return super().gram_and_grads(layer, capture, deltas)
        positions = 1 if a.shape.rank == 2 else a.shape[1]
        batch = a.shape[0] or 128
        d_in, d_out = a.shape[-1], g.shape[-1]
        if positions is not None and (positions == 1 or _linalg.factored_cost(
                batch, positions, d_in, d_out) < _linalg.materialised_cost(batch, positions, d_in, d_out)):
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
        return super().gram_and_grads(layer, capture, deltas)


# --------------------------------------------------------------------------- einsum dense


class EinsumDenseRule(LayerRule):
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

    def variables(self, layer):
        return _present(layer.kernel, layer.bias)

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


class ConvRule(LayerRule):
    """``Conv1D/2D/3D`` (strides, padding incl. causal, dilation, groups, both data formats):
    per-sample kernel gradients materialised from a strided-slice unfold (one batched matmul
    over output positions), bias rows ``Σ_t δ_t``; the factored T×T form when cheaper
    (ungrouped only)."""

    name = "conv"

    def supports(self, layer):
        return _plain(layer)

    def variables(self, layer):
        return _present(layer.kernel, layer.bias)

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

    def _factors(self, layer, capture, deltas):
        x, g = capture["a"], deltas[0]
        if layer.data_format == "channels_first":
            perm = [0, *range(2, layer.rank + 2), 1]
            x, g = tf.transpose(x, perm), tf.transpose(g, perm)
        out_shape = [g.shape[i + 1] if g.shape[i + 1] is not None else tf.shape(g)[i + 1]
                     for i in range(layer.rank)]
        patches = _conv.unfold(x, out_shape=out_shape, kernel_size=tuple(layer.kernel_size),
                               strides=tuple(layer.strides),
                               dilation_rate=tuple(layer.dilation_rate), padding=capture["padding"])
        g = tf.reshape(g, tf.stack([tf.shape(g)[0], -1, g.shape[-1]]))
        return patches, g

    def per_sample(self, layer, capture, deltas):
        patches, g = self._factors(layer, capture, deltas)
        blocks = []
        if layer.kernel.trainable:
            blocks.append(_conv.per_sample_kernel_grads(
                patches, g, groups=layer.groups, kernel_shape=list(layer.kernel.shape)))
        if layer.bias is not None and layer.bias.trainable:
            blocks.append(tf.reduce_sum(g, axis=1))
        return blocks

    def gram_and_grads(self, layer, capture, deltas):
        patches, g = self._factors(layer, capture, deltas)
        positions, k, c_in = patches.shape[1], patches.shape[2], patches.shape[3]
        all_trainable = layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)
        batch = patches.shape[0] or 128
        if (layer.groups == 1 and all_trainable and positions is not None
                and _linalg.factored_cost(batch, positions, k * c_in, layer.filters)
                < _linalg.materialised_cost(batch, positions, k * c_in, layer.filters)):
            a = tf.reshape(patches, tf.stack([tf.shape(patches)[0], -1, k * c_in]))
            gram = _linalg.factored_gram(a, g, bias=layer.bias is not None)
            grads = [tf.reshape(tf.einsum("btd,bto->do", a, g), layer.kernel.shape)]
            if layer.bias is not None:
                grads.append(tf.reduce_sum(g, axis=[0, 1]))
            return gram, grads, "factored"
        blocks = []
        if layer.kernel.trainable:
            blocks.append(_conv.per_sample_kernel_grads(
                patches, g, groups=layer.groups, kernel_shape=list(layer.kernel.shape)))
        if layer.bias is not None and layer.bias.trainable:
            blocks.append(tf.reduce_sum(g, axis=1))
        rows = tf.concat([_linalg.flat_rows(b) for b in blocks], axis=1)
        return _linalg.gram_of_rows(rows), [tf.reduce_sum(b, axis=0) for b in blocks], "materialised"


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

    def gram_and_grads(self, layer, capture, deltas):
        ids, g = self._flat(capture["ids"], deltas[0])
        flat_g = tf.reshape(g, [-1, g.shape[-1]])
        grad = tf.math.unsorted_segment_sum(flat_g, tf.reshape(ids, [-1]), layer.input_dim)
        positions = ids.shape[1]
        batch = ids.shape[0] or 128
        if positions is not None and positions * positions <= batch * positions:
            same = tf.cast(tf.equal(ids[:, None, :, None], ids[None, :, None, :]), g.dtype)
            gram = tf.reduce_sum(same * tf.einsum("itd,jsd->ijts", g, g), axis=[2, 3])
            return gram, [grad], "factored"
        _, rows = self._unique_rows(ids, g)
        rows = _linalg.flat_rows(rows)
        return _linalg.gram_of_rows(rows), [grad], "materialised"


# --------------------------------------------------------------------------- normalisation


class _AffineNormRule(LayerRule):
    r"""Shared part of the normalisation rules: rows of :math:`\gamma` are
    :math:`\sum \hat x_i \delta_i` and of :math:`\beta` are :math:`\sum \delta_i`, summed
    over every axis except the batch and the parameter axes, with :math:`\hat x` the input
    normalised by the statistics the layer used (recomputed from its input; no gradient)."""

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


for _cls, _rule in (
    (keras.layers.Dense, DenseRule()),
    (keras.layers.EinsumDense, EinsumDenseRule()),
    (keras.layers.Conv1D, ConvRule()),
    (keras.layers.Conv2D, ConvRule()),
    (keras.layers.Conv3D, ConvRule()),
    (keras.layers.Embedding, EmbeddingRule()),
    (keras.layers.BatchNormalization, BatchNormalizationRule()),
    (keras.layers.LayerNormalization, LayerNormalizationRule()),
    (keras.layers.GroupNormalization, GroupNormalizationRule()),
):
    register_layer_rule(_cls, _rule)
