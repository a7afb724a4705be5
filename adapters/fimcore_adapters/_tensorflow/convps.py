"""The Conv1D/2D/3D rule and its per-sample weight gradients (from a strided-slice unfold).

A convolution with kernel size k, stride s, dilation d and padding p reads, for kernel
offset o and output position u, the padded input at ``u·s + o·d``. Stacking one strided
slice of the padded input per kernel offset gives the patches (B, T, K, C_in) with
T output positions and K = prod(k) offsets; the per-sample kernel gradient of sample i is
then ``Σ_t patch_it ⊗ δ_it`` (a batched matrix product over T), grouped per channel group.
Only slicing, padding and matmul are used, so it runs in float64 on CPU (unlike TensorFlow's
grouped-convolution gradient) and under XLA.

For float32/float16 1-D and 2-D convolutions without dilation, :func:`grouped_filter_blocks`
gets the same gradients from filter-gradient calls of a convolution grouped over the batch
(samples folded into channels) where the build has a kernel for it
(:func:`grouped_filter_gradient_available`); :func:`grouped_kernel_columns` hands them to the
Gram as (P, B) columns.
"""

from __future__ import annotations

import functools
import itertools
import math

import keras
import tensorflow as tf

from . import cost, kernels
from .dense import _KernelBiasRule, _tokens, factor_grads, mirrored_factors
from .registry import register_layer_rule


def _pads(size, out, kernel, stride, dilation, padding):
    """(before, after) padding that makes ``out`` windows fit, for valid/same/causal."""
    if padding == "valid":
        return 0, 0
    span = (kernel - 1) * dilation + 1
    if padding == "causal":
        return span - 1, 0
    total = tf.maximum((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def unfold(x, *, out_shape, kernel_size, strides, dilation_rate, padding):
    """Patches of a channels-last input.

    Args:
        x: (B, *S, C_in) input of the convolution.
        out_shape: the output's spatial sizes (ints or scalar tensors).
        kernel_size, strides, dilation_rate: tuples of length N = len(S).
        padding: ``"valid"``, ``"same"`` or ``"causal"`` (Keras spelling).

    Returns:
        (B, T, K, C_in) patches, T = prod(out_shape), K = prod(kernel_size), offsets in
        row-major kernel order (the order of a Keras kernel's leading axes).
    """
    rank = len(kernel_size)
    shape = tf.shape(x)
    pads = [[0, 0]]
    for axis in range(rank):
        pads.append(list(_pads(shape[axis + 1], out_shape[axis], kernel_size[axis],
                               strides[axis], dilation_rate[axis], padding)))
    pads.append([0, 0])
    if padding != "valid":
        x = tf.pad(x, tf.convert_to_tensor(pads))
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        begin = [0] + [o * d for o, d in zip(offset, dilation_rate)] + [0]
        end = [0] + [o * d + (n - 1) * s + 1 for o, d, n, s in
                     zip(offset, dilation_rate, out_shape, strides)] + [0]
        step = [1, *strides, 1]
        slices.append(tf.strided_slice(x, tf.stack(begin), tf.stack(end), step,
                                       begin_mask=1 | (1 << (rank + 1)),
                                       end_mask=1 | (1 << (rank + 1))))
    patches = tf.stack(slices, axis=-2)  # (B, *out, K, C_in)
    batch = tf.shape(x)[0]
    return tf.reshape(patches, tf.stack([batch, -1, len(slices), tf.shape(x)[-1]]))


def per_sample_kernel_grads(patches, delta, *, groups: int, kernel_shape):
    """Per-sample kernel gradients (B, *kernel_shape) from patches and output gradients.

    Args:
        patches: (B, T, K, C_in) from :func:`unfold`.
        delta: (B, T, C_out) gradient of the loss at the convolution's pre-activation output.
        groups: channel groups G (C_in and C_out split into G contiguous blocks).
        kernel_shape: the Keras kernel shape (*k, C_in / G, C_out).
    """
    batch = tf.shape(patches)[0]
    k = patches.shape[2]
    c_in = patches.shape[3]
    c_out = delta.shape[-1]
    if groups == 1:
        rows = tf.matmul(tf.reshape(patches, tf.stack([batch, -1, k * c_in])), delta,
                         transpose_a=True)  # (B, K·C_in, C_out)
        return tf.reshape(rows, tf.concat([[batch], kernel_shape], 0))
    p = tf.reshape(patches, tf.stack([batch, -1, k, groups, c_in // groups]))
    d = tf.reshape(delta, tf.stack([batch, -1, groups, c_out // groups]))
    rows = tf.einsum("btkgc,btgo->bkcgo", p, d)
    return tf.reshape(rows, tf.concat([[batch], kernel_shape], 0))


@functools.cache
def grouped_filter_gradient_available() -> bool:
    """Whether this TensorFlow build has a kernel for a grouped filter gradient.

    TensorFlow's own CPU ``Conv2DBackpropFilter`` refuses an input whose channels are a
    multiple of the filter's ("filter_size does not have enough elements"); the oneDNN
    kernels accept it, and TensorFlow turns them on by default only on CPUs with AVX-512
    neural-network instructions (``TF_ENABLE_ONEDNN_OPTS=1`` forces them). Probed once,
    eagerly, on a 2×2 input with two channel groups.
    """
    with tf.init_scope():
        try:
            tf.raw_ops.Conv2DBackpropFilter(
                input=tf.zeros([1, 2, 2, 2]), filter_sizes=[1, 1, 1, 2],
                out_backprop=tf.zeros([1, 2, 2, 2]), strides=[1, 1, 1, 1], padding="VALID")
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError):
            return False
    return True


def grouped_applies(x, *, rank: int, dilation_rate) -> bool:
    """Whether :func:`grouped_filter_blocks` covers this call (TensorFlow has no float64 CPU
    kernel for a grouped filter gradient, and none at all without oneDNN, see
    :func:`grouped_filter_gradient_available`; 3-D and dilated filter gradients are left to
    the unfold)."""
    return (rank in (1, 2) and all(d == 1 for d in dilation_rate) and x.dtype != tf.float64
            and grouped_filter_gradient_available())


#: δ bytes per chunk of the grouped filter gradient (a chunk's batch-to-channels transposes stay
#: in cache).
CHUNK_BYTES = 2 * 2**20


def _chunk_sizes(delta, chunk_bytes: int):
    """Static sizes that split the batch into chunks of at most ``chunk_bytes`` of δ, or None
    (one call) when the batch size is not known when tracing."""
    batch = delta.shape[0]
    per_sample = delta.dtype.size
    for n in delta.shape[1:]:
        per_sample = None if n is None or per_sample is None else per_sample * n
    if batch is None or per_sample is None:
        return None
    size = max(1, chunk_bytes // per_sample)
    if size >= batch:
        return None
    return [size] * (batch // size) + ([batch % size] if batch % size else [])


def grouped_filter_blocks(x, delta, *, kernel_size, strides, padding, groups: int,
                          chunk_bytes: int | None = None):
    """Per-sample kernel gradients as (K·C_in/groups, n, C_out) blocks, one per batch chunk.

    Each chunk of n samples is folded into channels: input (1, *S, n·C_in) and output
    gradient (1, *out, n·C_out), a convolution with n·groups groups, whose filter gradient
    (*k, C_in/groups, n·C_out) holds every sample's kernel gradient (group b·groups + g reads
    sample b's channel group g on both sides). Chunks follow :data:`CHUNK_BYTES`.

    Args:
        x: (B, *S, C_in) input of the convolution (channels last, already causally padded).
        delta: (B, *out, C_out) gradient at the convolution's pre-activation output.
        kernel_size, strides: tuples of length 1 or 2.
        padding: ``"valid"`` or ``"same"``.
        groups: the layer's channel groups.
        chunk_bytes: δ bytes per chunk (default :data:`CHUNK_BYTES`); chunks need a batch
            size known when tracing.
    """
    kernel_size, strides = tuple(kernel_size), tuple(strides)
    if len(kernel_size) == 1:
        x, delta = x[:, None], delta[:, None]
        kernel_size, strides = (1,) + kernel_size, (1,) + strides
    c_in, c_out = x.shape[-1], delta.shape[-1]
    sizes = _chunk_sizes(delta, CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    pairs = [(x, delta)] if sizes is None else zip(tf.split(x, sizes), tf.split(delta, sizes))
    blocks = []
    for xs, ds in pairs:
        n = tf.shape(xs)[0]

        def fold(t, channels, n=n):
            s = tf.shape(t)
            return tf.reshape(tf.transpose(t, [1, 2, 0, 3]), tf.stack([1, s[1], s[2], n * channels]))

        filt = tf.raw_ops.Conv2DBackpropFilter(
            input=fold(xs, c_in), filter_sizes=tf.stack([*kernel_size, c_in // groups, n * c_out]),
            out_backprop=fold(ds, c_out), strides=[1, *strides, 1], padding=padding.upper())
        blocks.append(tf.reshape(filt, tf.stack([-1, n, c_out])))
    return blocks


def grouped_kernel_grads(x, delta, *, kernel_size, strides, padding, groups: int, kernel_shape,
                         chunk_bytes: int | None = None):
    """Per-sample kernel gradients (B, *kernel_shape) from :func:`grouped_filter_blocks`.

    Args:
        kernel_shape: the Keras kernel shape (*k, C_in / groups, C_out); the other
            arguments as for :func:`grouped_filter_blocks`.
    """
    blocks = grouped_filter_blocks(x, delta, kernel_size=kernel_size, strides=strides,
                                   padding=padding, groups=groups, chunk_bytes=chunk_bytes)
    filt = blocks[0] if len(blocks) == 1 else tf.concat(blocks, axis=1)
    return tf.reshape(tf.transpose(filt, [1, 0, 2]), tf.concat([[-1], kernel_shape], 0))


def grouped_kernel_columns(x, delta, *, kernel_size, strides, padding, groups: int, kernel_shape,
                           chunk_bytes: int | None = None):
    """Per-sample kernel gradients as columns (P, B), P = prod(kernel_shape), and their sum.

    The Gram is then ``tf.matmul(c, c, transpose_a=True)`` on the (P, B) columns.

    Returns:
        ``(columns, kernel_gradient)``: (P, B) and the batch kernel gradient (*kernel_shape).
    """
    blocks = grouped_filter_blocks(x, delta, kernel_size=kernel_size, strides=strides,
                                   padding=padding, groups=groups, chunk_bytes=chunk_bytes)
    p = math.prod(int(n) for n in kernel_shape)
    cols = [tf.reshape(tf.transpose(b, [0, 2, 1]), [p, -1]) for b in blocks]
    grad = tf.add_n([tf.reduce_sum(b, axis=1) for b in blocks])
    return (cols[0] if len(cols) == 1 else tf.concat(cols, axis=1)), tf.reshape(grad, kernel_shape)


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
        return unfold(x, out_shape=out_shape, kernel_size=tuple(layer.kernel_size),
                            strides=tuple(layer.strides),
                            dilation_rate=tuple(layer.dilation_rate), padding=padding)

    def per_sample(self, layer, capture, deltas):
        """Per-sample kernel gradients (grouped filter gradient or unfold) and bias rows."""
        x, g = self._channels_last(layer, capture, deltas)
        blocks = []
        if layer.kernel.trainable:
            kernel_shape = list(layer.kernel.shape)
            if grouped_applies(x, rank=layer.rank, dilation_rate=tuple(layer.dilation_rate)):
                blocks.append(grouped_kernel_grads(
                    x, g, kernel_size=layer.kernel_size, strides=layer.strides,
                    padding=capture["padding"], groups=layer.groups, kernel_shape=kernel_shape))
            else:
                blocks.append(per_sample_kernel_grads(
                    self._patches(layer, x, g, capture["padding"]), _tokens(g), groups=layer.groups,
                    kernel_shape=kernel_shape))
        if layer.bias is not None and layer.bias.trainable:
            blocks.append(tf.reduce_sum(_tokens(g), axis=1))
        return blocks

    def factored(self, layer, capture, deltas):
        operands = self.factors(layer, capture, deltas)
        if operands is None:
            return None
        a, g, bias = operands
        return kernels.factored_gram(a, g, bias=bias), factor_grads(layer, a, g), "factored"

    def factors(self, layer, capture, deltas):
        """The factored operands ``(a, g, bias)`` of an ungrouped, fully trainable layer, else None."""
        all_trainable = layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)
        if layer.groups != 1 or not all_trainable:
            return None
        x, g = self._channels_last(layer, capture, deltas)
        d_a = x.shape[-1] * math.prod(layer.kernel_size)
        patches = self._patches(layer, x, g, capture["padding"])
        a = tf.reshape(patches, tf.stack([tf.shape(patches)[0], -1, d_a]))
        g = _tokens(g)
        if a.shape[1] is None and g.shape[1] is not None:
            a = tf.ensure_shape(a, [None, g.shape[1], d_a])
        return a, g, layer.bias is not None

    def mirrored(self, layer, capture, deltas, sink, *, strategy):
        found = self.factors(layer, capture, deltas)
        return None if found is None else mirrored_factors(layer, *found[:2], sink, strategy=strategy)

    def gram_and_grads(self, layer, capture, deltas):
        x, g = self._channels_last(layer, capture, deltas)
        positions = 1
        for n in g.shape[1:-1]:
            positions = None if n is None or positions is None else positions * n
        d_a = x.shape[-1] * math.prod(layer.kernel_size)
        all_trainable = layer.kernel.trainable and (layer.bias is None or layer.bias.trainable)
        batch = g.shape[0] or 128
        if (layer.groups == 1 and all_trainable and positions is not None
                and cost.factored_cost(batch, positions, d_a, layer.filters)
                < cost.materialised_cost(batch, positions, d_a, layer.filters)):
            return self.factored(layer, capture, deltas)
        if layer.kernel.trainable and grouped_applies(
                x, rank=layer.rank, dilation_rate=tuple(layer.dilation_rate)):
            cols, grads = grouped_kernel_columns(
                x, g, kernel_size=layer.kernel_size, strides=layer.strides,
                padding=capture["padding"], groups=layer.groups,
                kernel_shape=list(layer.kernel.shape))
            cols, grads = [cols], [grads]
            if layer.bias is not None and layer.bias.trainable:
                rows = tf.reduce_sum(_tokens(g), axis=1)  # (B, C_out)
                cols.append(tf.transpose(rows))
                grads.append(tf.reduce_sum(rows, axis=0))
            return kernels.gram_of_columns(tf.concat(cols, axis=0)), grads, "materialised"
        return super().gram_and_grads(layer, capture, deltas)


for _cls in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D):
    register_layer_rule(_cls, ConvRule())
