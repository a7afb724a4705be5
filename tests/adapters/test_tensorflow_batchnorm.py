"""TensorFlow adapter, BatchNormalization in train mode: every Gram entry against an oracle.

The oracle shares nothing with the adapter (no tape of the model, no layer rule): the batch
forward is written by hand with ``tf.nn`` ops from the layers' weights, and for each sample i
every parameter gets a copy θ_i used only where row i of its layer's output is formed (the
batch statistics are computed from all rows, as in training). Row i of J is ``B·∂L/∂θ_i`` at
θ_i = θ, sample i's contribution to the gradient of the batch mean loss L, in float64.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from fimcore_adapters.tensorflow import per_sample_gram
from tests.adapters._keras_float64 import keras_float64


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with keras_float64():
        yield


def conv_bn_model():
    L = keras.layers
    model = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(4, 3, padding="same"), L.BatchNormalization(),
                              L.ReLU(), L.GlobalAveragePooling2D(), L.Dense(5), L.BatchNormalization(epsilon=1e-4),
                              L.Activation("tanh"), L.Dense(3)])
    rng = np.random.default_rng(21)
    for v in model.trainable_variables:  # non-trivial γ and β as well
        v.assign(rng.normal(scale=0.5, size=v.shape) + (1.0 if v.name == "gamma" else 0.0))
    return model


def contribution_jacobian(model, x, y):
    """J (B × P, columns in ``model.trainable_variables`` order) from per-sample parameter copies."""
    conv, bn1, _, _, dense1, bn2, _, dense2 = model.layers
    x = tf.constant(x, tf.float64)
    n = x.shape[0]
    weights = {id(v): tf.constant(v.numpy()) for v in model.trainable_variables}

    def forward(own, i):
        """Logits; ``own[id(v)]`` replaces ``v`` where row i is formed (i = None: nowhere)."""
        mask = tf.one_hot(-1 if i is None else i, n, dtype=tf.float64)

        def rowwise(f):  # row i from f(own copies), every other row from f(the weights)
            mine, theirs = f(lambda v: own[id(v)]), f(lambda v: tf.stop_gradient(weights[id(v)]))
            m = tf.reshape(mask, [n] + [1] * (len(mine.shape) - 1))
            return m * mine + (1 - m) * theirs

        def batchnorm(h, layer, axes):
            mean = tf.reduce_mean(h, axis=axes)
            var = tf.reduce_mean(tf.square(h - mean), axis=axes)
            xhat = (h - mean) / tf.sqrt(var + layer.epsilon)
            return rowwise(lambda w: xhat * w(layer.gamma) + w(layer.beta))

        h = rowwise(lambda w: tf.nn.conv2d(x, w(conv.kernel), 1, "SAME") + w(conv.bias))
        h = tf.reduce_mean(tf.nn.relu(batchnorm(h, bn1, [0, 1, 2])), axis=[1, 2])
        h = tf.tanh(batchnorm(rowwise(lambda w: h @ w(dense1.kernel) + w(dense1.bias)), bn2, [0]))
        return rowwise(lambda w: h @ w(dense2.kernel) + w(dense2.bias))

    def batch_loss(logits):
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(y), logits))

    np.testing.assert_allclose(forward(weights, None).numpy(), model(x, training=True).numpy(), rtol=1e-12)
    rows = []
    for i in range(n):
        own = {k: tf.identity(w) for k, w in weights.items()}
        with tf.GradientTape() as tape:
            tape.watch(list(own.values()))
            loss = batch_loss(forward(own, i))
        grads = tape.gradient(loss, [own[id(v)] for v in model.trainable_variables])
        rows.append(n * np.concatenate([g.numpy().ravel() for g in grads]))
    return np.stack(rows)


def test_train_mode_batchnorm_gram_entries_match_the_contribution_oracle():
    model = conv_bn_model()
    rng = np.random.default_rng(22)
    x, y = rng.normal(size=(6, 6, 6, 2)), rng.integers(0, 3, 6)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    gram = per_sample_gram(model, loss_fn, x, y)
    jac = contribution_jacobian(model, x, y)
    expected = jac @ jac.T
    np.testing.assert_allclose(gram, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    # the oracle's rows sum to B × the batch gradient (checks the oracle, not the adapter)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grad = np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, model.trainable_variables)])
    np.testing.assert_allclose(jac.sum(0), len(y) * grad, rtol=1e-10, atol=1e-13)
