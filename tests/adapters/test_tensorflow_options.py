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
from fimcore_adapters.tensorflow import GramModel, GramMeasureCallback, GramTape, per_sample_gram
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
    paths = {r.module: r.path for r in tape.report()}
    assert paths["BatchNormalization"] == "generic", tape.report()
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


def test_old_spellings_warn_and_keep_working():
    """``mode=``/``layers=`` are ``strategy=``/``params=``; ``report`` read as a list is ``report()``."""
    x, y, _ = data()
    model = net()
    first = model.layers[0]
    with pytest.warns(DeprecationWarning, match=r"mode=.*strategy="):
        old = per_sample_gram(model, xent(), x, y, mode="generic")
    np.testing.assert_array_equal(old, per_sample_gram(model, xent(), x, y, strategy="generic"))
    with pytest.warns(DeprecationWarning, match=r"layers=.*params="):
        old = per_sample_gram(model, xent(), x, y, layers=[first])
    np.testing.assert_array_equal(old, per_sample_gram(model, xent(), x, y, params=[first]))
    with GramTape(model) as tape:
        loss = xent()(y, model(x, training=True))
    tape.gradient_and_gram(loss)
    with pytest.warns(DeprecationWarning, match=r"call GramTape.report\(\)"):
        assert [t[2] for t in tape.report] == ["factored", "factored"]
    assert list(tape.report().paths().values()) == ["factored", "factored"]


@pytest.mark.parametrize("options, match", [
    ({"strategy": "fast"}, "strategy must be one of"),
    ({"strategy": {"nope": "factored"}}, "strategy names layers that hold no"),
    ({"strategy": "generic", "mode": "generic"}, "not both"),
    ({"keep_blocks": "yes"}, "keep_blocks must be True or False"),
])
def test_bad_common_options(options, match):
    model = net()
    x, y, _ = data()
    with pytest.raises(ValueError, match=match):
        with GramTape(model, **options):
            model(x)


def test_keep_blocks_and_result_feed_the_tracker():
    """Blocks per layer sum to G exactly; result() carries B, P, dtype and the report."""
    x, y, _ = data()
    model = net()
    with GramTape(model, keep_blocks=True) as tape:
        loss = xent()(y, model(x, training=True))
    _, gram = tape.gradient_and_gram(loss)
    blocks = tape.blocks()
    assert sorted(blocks) == sorted(layer.name for layer in model.layers)
    np.testing.assert_array_equal(sum(b.numpy() for b in blocks.values()), gram.numpy())
    result = tape.result()
    assert (result.batch_size, result.num_params, result.grad_dtype) == (B, 5 * 6 + 6 + 6 * 3 + 3, np.float64)
    assert sum(r.trace for r in result.report) == pytest.approx(float(np.trace(result.gram)), rel=1e-12)
    G = per_sample_gram(model, xent(), x, y)
    np.testing.assert_allclose(result.gram, G, rtol=1e-12, atol=1e-14 * np.abs(G).max())
    m = fimcore.MeasureTracker().update(result, lr=LR)
    assert m.c_k == pytest.approx(fimcore.MeasureTracker().update(G, lr=LR).c_k, rel=1e-9)
    with GramTape(model) as plain:
        model(x)
    with pytest.raises(RuntimeError, match="keep_blocks=True"):
        plain.blocks()


def test_report_traces_without_kept_blocks_and_inside_tf_function():
    """Eagerly the report's traces add up to Tr G with or without kept blocks; inside a
    tf.function there are no values, so no traces, and result() says what to do."""
    x, y, _ = data()
    model = net()
    with GramTape(model) as tape:
        loss = xent()(y, model(x, training=True))
    _, gram = tape.gradient_and_gram(loss)
    assert sum(r.trace for r in tape.report()) == pytest.approx(float(np.trace(gram.numpy())), rel=1e-12)

    graph_tape = GramTape(model, keep_blocks=True)

    @tf.function
    def step():
        with graph_tape:
            loss = xent()(y, model(x, training=True))
        return graph_tape.gradient_and_gram(loss)[1], graph_tape.blocks()

    g, blocks = step()
    np.testing.assert_allclose(g.numpy(), gram.numpy(), rtol=1e-12, atol=1e-14 * np.abs(gram.numpy()).max())
    np.testing.assert_array_equal(sum(b.numpy() for b in blocks.values()), g.numpy())
    assert [r.trace for r in graph_tape.report()] == [None, None]
    with pytest.raises(RuntimeError, match="inside a tf.function"):
        graph_tape.result()
