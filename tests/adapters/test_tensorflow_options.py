"""Documented TensorFlow/Keras options: ``sample_weight`` in ``GramModel.fit`` and the
BatchNormalization variants without a rule (``renorm``, ``synchronized``), which take the
generic path.

References: a float64 loop of one ``GradientTape`` per sample (weighted loss w_i·ℓ_i), the
plain Keras ``fit`` with the same sample weights, and ``1ᵀG1 = B²‖∇L‖²`` with the gradient of
an ordinary tape.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import fimcore
from fimcore_adapters.tensorflow import GramModel, GramMeasureCallback, GramTape
from tests.adapters._keras_float64 import keras_float64

B, LR = 6, 0.0625


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with keras_float64():
        yield


def xent(**kwargs):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64", **kwargs)


def net(seed=0, norm=None):
    keras.utils.set_random_seed(seed)
    L = keras.layers
    layers = [keras.Input((5,), dtype="float64"), L.Dense(6, activation="tanh", dtype="float64")]
    if norm is not None:
        layers.append(norm)
    layers.append(L.Dense(3, dtype="float64"))
    return keras.Sequential(layers)


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(B, 5)), rng.integers(0, 3, B), rng.uniform(0.2, 3.0, B)


def test_sample_weight_scales_each_row_by_its_weight():
    """Keras averages w_i·ℓ_i over the batch, so row i is w_i·∇ℓ_i."""
    x, y, w = data()
    model = net()
    loss_one = xent(reduction="sum")
    rows = []
    for i in range(B):
        with tf.GradientTape() as tape:
            loss = w[i] * loss_one(y[i:i + 1], model(x[i:i + 1], training=True))
        rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, model.trainable_variables)]))
    J = np.stack(rows)
    expected = fimcore.MeasureTracker().update(J @ J.T, lr=LR)
    unweighted = fimcore.MeasureTracker().update((J / w[:, None]) @ (J / w[:, None]).T, lr=LR)
    plain = net()
    plain.set_weights(model.get_weights())
    wrapped = GramModel(model, every=1)
    cb = GramMeasureCallback()
    for m in (plain, wrapped):
        m.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
        m.fit(x, y, sample_weight=w, batch_size=B, epochs=1, shuffle=False, verbose=0,
              callbacks=[cb] if m is wrapped else [])
    got = cb.tracker.history[0]
    assert got.I_k == pytest.approx(expected.I_k, rel=1e-12)
    assert got.c_k == pytest.approx(expected.c_k, rel=1e-9)
    assert abs(got.I_k - unweighted.I_k) > 1e-3 * unweighted.I_k  # the weights did enter G
    for a, b in zip(plain.get_weights(), model.get_weights()):      # and the step is Keras' own
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("option", [dict(renorm=True), dict(synchronized=True)], ids=["renorm", "synchronized"])
def test_batchnorm_variants_without_a_rule_take_the_generic_path(option):
    model = net(norm=keras.layers.BatchNormalization(dtype="float64", **option))
    x, y, _ = data()
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    with GramTape(model) as tape:
        loss = xent()(y, model(x, training=True))
    grads, gram = tape.gradient_and_gram(loss)
    paths = {kind: path for _, kind, path in tape.report}
    assert paths["BatchNormalization"] == "generic", tape.report
    assert paths["Dense"] != "generic"
    for v, b in zip(model.non_trainable_variables, before):  # state as the ordinary step leaves it
        v.assign(b)
    with tf.GradientTape() as plain:
        ref_loss = xent()(y, model(x, training=True))
    want = plain.gradient(ref_loss, model.trainable_variables)
    for g, r in zip(grads, want):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-12, atol=1e-14)
    flat = np.concatenate([r.numpy().ravel() for r in want])
    assert float(np.sum(gram)) == pytest.approx(B**2 * float(flat @ flat), rel=1e-10)
