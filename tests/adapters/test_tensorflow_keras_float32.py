"""A float32 Keras model in ``fit``: the tracker gets G in the dtype it was accumulated in."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import import_backend

tf = import_backend("tensorflow")
import keras  # noqa: E402

import fimcore  # noqa: E402
from fimcore_adapters.tensorflow import GramMeasureCallback, GramModel  # noqa: E402

N, B = 96, 32


class _Recording(fimcore.MeasureTracker):
    def __init__(self):
        super().__init__()
        self.grams = []

    def update(self, gram, **kwargs):
        self.grams.append(np.array(gram))
        return super().update(gram, **kwargs)


def _loop_gram_float64(net, x, y):
    """Rows B·∇ℓ_i of the mean loss, one tape per sample, in float64 from the float32 weights."""
    weights = [tf.constant(v.numpy(), tf.float64) for v in net.trainable_variables]
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            tape.watch(weights)
            h = tf.constant(x[i:i + 1], tf.float64)
            h = tf.nn.relu(h @ weights[0] + weights[1])
            h = tf.nn.relu(h @ weights[2] + weights[3])
            logits = h @ weights[4] + weights[5]
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y[i:i + 1], logits))
        rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, weights)]))
    J = np.stack(rows)
    return J @ J.T


def test_float32_fit_hands_the_tracker_a_float32_gram_and_true_condition_numbers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 20)).astype("float32")
    y = rng.integers(0, 10, N)
    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                            keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
    model = GramModel(net, every=1)
    # LR 0: every step sees the same weights, so each Gram has a float64 reference
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tracker = _Recording()
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0,
              callbacks=[GramMeasureCallback(tracker)])
    assert [g.dtype for g in tracker.grams] == [np.float32] * (N // B)
    for k, record in enumerate(tracker.history):
        sl = slice(k * B, (k + 1) * B)
        ref = _loop_gram_float64(net, x[sl], y[sl])
        np.testing.assert_allclose(tracker.grams[k], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
        eig = np.linalg.eigvalsh(ref)
        assert record.c_k == pytest.approx(eig[-1] / eig[0], rel=1e-2)
