"""The adapter contract's model cases for TensorFlow / Keras (see the package docstring).

The measured step is an eager ``GramTape`` step with ``keep_blocks=True``; the plain step is a
``tf.GradientTape`` on the same model and batch. The float64 reference is written here and shares
nothing with the adapter: row i of J is B·∂L/∂θ_i, the gradient of the batch loss with respect to
a copy θ_i of the parameters that only sample i's computation uses. Where no layer couples
samples that is ∇ℓ_i, one ``tf.GradientTape`` of sample i's loss (read off the whole-batch
forward) per sample; for BatchNormalization in train mode (batch statistics) the network is
written out by hand with one parameter copy per sample and differentiated once.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from fimcore_adapters.tensorflow import GramTape
from tests.adapters._keras_float64 import keras_float64
from tests.adapters.contract import CASES, ContractRun, NotApplicable  # noqa: F401

B = 6
L = keras.layers


class _Scale(L.Layer):
    """A layer the adapter has no rule for: it takes the generic (jacobian) path."""

    def build(self, shape):
        self.scale = self.add_weight(shape=(shape[-1],), dtype="float64",
                                     initializer=keras.initializers.Constant(np.linspace(0.5, 1.5, shape[-1])))

    def call(self, x):
        return tf.tanh(x) * self.scale


class _ReversibleEmbedding(L.Embedding):
    """An embedding whose table is also the output projection (``reverse=True``: logits
    ``h Eᵀ``), the Keras idiom for tied weights; its ``call`` differs from ``Embedding``'s, so
    the adapter takes the generic path for it, over both calls."""

    def call(self, inputs, reverse=False):
        if reverse:
            return tf.matmul(inputs, self.embeddings, transpose_b=True)
        return super().call(inputs)


class _Tied(keras.Model):
    """Tied embedding and a Dense layer applied twice."""

    def __init__(self):
        super().__init__()
        self.emb = _ReversibleEmbedding(7, 4, dtype="float64")
        self.mix = L.Dense(4, dtype="float64")

    def call(self, ids, training=None):
        h = tf.tanh(self.mix(tf.reduce_mean(self.emb(ids), axis=1)))
        return self.emb(tf.tanh(self.mix(h)), reverse=True)


def _sequential(shape, layers, dtype="float64"):
    model = keras.Sequential([keras.Input(shape, dtype=dtype)] + layers)
    return model


def _case(case: str, rng: np.random.Generator):
    keras.utils.set_random_seed(CASES.index(case))
    if case == "dense":
        model = _sequential((5,), [L.Dense(7, activation="tanh"), L.Dense(3)])
        x = rng.normal(size=(B, 5))
    elif case == "conv":
        model = _sequential((6, 6, 2), [L.Conv2D(3, 3, padding="same", activation="relu"),
                                        L.Conv2D(2, 2, strides=2), L.Flatten(), L.Dense(3)])
        x = rng.normal(size=(B, 6, 6, 2))
    elif case == "norm_train":
        model = _sequential((6, 6, 2), [L.Conv2D(3, 3), L.BatchNormalization(), L.ReLU(),
                                        L.Flatten(), L.Dense(3)])
        x = rng.normal(size=(B, 6, 6, 2))
    elif case == "embedding":
        model = _sequential((5,), [L.Embedding(9, 4), L.Flatten(), L.Dense(3)], dtype="int32")
        x = rng.integers(0, 9, (B, 5)).astype(np.int32)
    elif case == "tied":
        model = _Tied()
        x = rng.integers(0, 7, (B, 5)).astype(np.int32)
        model(x[:1])
    elif case == "generic":
        model = _sequential((5,), [L.Dense(4), _Scale(), L.Dense(3)])
        x = rng.normal(size=(B, 5))
    else:
        raise ValueError(f"unknown case {case!r}; cases are {CASES}")
    y = rng.integers(0, 7 if case == "tied" else 3, B).astype(np.int32)
    return model, tf.constant(x), tf.constant(y)


def _losses(logits, y):
    """Per-example cross-entropy, written here."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)


def _flat(grads, variables) -> np.ndarray:
    return np.concatenate([(tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)).numpy().ravel()
                           for g, v in zip(grads, variables)])


def _reference(model, x, y) -> np.ndarray:
    variables = model.trainable_variables
    rows = []
    for i in range(B):
        with tf.GradientTape() as tape:
            loss_i = _losses(model(x, training=True), y)[i]     # whole-batch forward every time
        rows.append(_flat(tape.gradient(loss_i, variables), variables))
    J = np.stack(rows)                                          # row i = B · ∂(ℓ_i / B)/∂θ
    return J @ J.T


def _reference_norm_train(model, x, y) -> np.ndarray:
    """Conv2D → BatchNormalization (batch statistics, biased variance) → ReLU → Dense written
    out by hand with one copy of every parameter per sample; row i = B·∂L/∂(sample i's copies)."""
    conv, bn, dense = model.layers[0], model.layers[1], model.layers[4]
    originals = [conv.kernel, conv.bias, bn.gamma, bn.beta, dense.kernel, dense.bias]
    copies = [[tf.Variable(tf.identity(v)) for v in originals] for _ in range(B)]
    with tf.GradientTape() as tape:
        h = tf.concat([tf.nn.conv2d(x[i:i + 1], c[0], strides=1, padding="VALID") + c[1]
                       for i, c in enumerate(copies)], axis=0)
        mean = tf.reduce_mean(h, axis=[0, 1, 2])
        var = tf.reduce_mean((h - mean) ** 2, axis=[0, 1, 2])
        xhat = (h - mean) / tf.sqrt(var + bn.epsilon)
        z = tf.reshape(tf.nn.relu(tf.concat([xhat[i:i + 1] * c[2] + c[3] for i, c in enumerate(copies)], 0)),
                       [B, -1])
        out = tf.concat([tf.matmul(z[i:i + 1], c[4]) + c[5] for i, c in enumerate(copies)], 0)
        loss = tf.reduce_mean(_losses(out, y))
    grads = tape.gradient(loss, copies)
    J = B * np.stack([np.concatenate([g.numpy().ravel() for g in row]) for row in grads])
    return J @ J.T


def run(case: str, strategy: str) -> ContractRun:
    with keras_float64():
        model, x, y = _case(case, np.random.default_rng(CASES.index(case) + 11))
        variables = model.trainable_variables
        reference = (_reference_norm_train if case == "norm_train" else _reference)(model, x, y)
        with tf.GradientTape() as tape:
            plain_loss = tf.reduce_mean(_losses(model(x, training=True), y))
        plain = _flat(tape.gradient(plain_loss, variables), variables)
        with GramTape(model, strategy=strategy, keep_blocks=True) as tape:
            loss = tf.reduce_mean(_losses(model(x, training=True), y))
        grads, _ = tape.gradient_and_gram(loss, variables)
        result = tape.result()
    return ContractRun(
        gram=np.asarray(result.gram, dtype=np.float64), gram_dtype=str(result.gram.dtype),
        blocks=dict(result.blocks), grad=_flat(grads, variables), plain_grad=plain,
        reference_gram=reference, batch_size=B, loss_reduction="mean",
        report_paths=result.report.paths())
