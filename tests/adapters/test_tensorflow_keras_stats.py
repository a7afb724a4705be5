"""GramMeasureCallback(statistics=...): every statistic of fimcore.stats in the Keras fit logs.

Expected values come from the functions of fimcore.stats applied to the Gram of the same batch
taken by a float64 per-sample loop written here (one GradientTape per sample), not from the
callback's tracker.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.adapters._keras_float64 import keras_float64
from tests.conftest import import_backend

tf = import_backend("tensorflow")
keras = import_backend("keras")

import fimcore  # noqa: E402
from fimcore.stats import (  # noqa: E402
    effective_rank,
    fisher_spectrum_stats,
    noise_scale,
    norm_test,
    stable_rank,
)
from fimcore.stats.base import ALWAYS, registered_fields  # noqa: E402
from fimcore_adapters.tensorflow import GramMeasureCallback, GramModel  # noqa: E402

N, B, LR = 8, 8, 0.0625


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with keras_float64():
        yield


def xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")


def net():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,), dtype="float64"),
                             keras.layers.Dense(6, activation="tanh", dtype="float64", name="hidden"),
                             keras.layers.Dense(3, dtype="float64", name="head")])


def data():
    r = np.random.default_rng(0)
    return r.normal(size=(N, 5)), r.integers(0, 3, N)


def loop_grams(model, x, y):
    """Full Gram and per-layer blocks from one tape per sample (rows ∇ℓ_i, float64)."""
    rows = {layer.name: [] for layer in model.layers}
    for i in range(x.shape[0]):
        with tf.GradientTape() as t:
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=y[i:i + 1], logits=model(x[i:i + 1])))
        grads = t.gradient(loss, [v for layer in model.layers for v in layer.trainable_variables])
        k = 0
        for layer in model.layers:
            n = len(layer.trainable_variables)
            rows[layer.name].append(np.concatenate([np.asarray(g).reshape(-1) for g in grads[k:k + n]]))
            k += n
    blocks = {name: np.stack(r) @ np.stack(r).T for name, r in rows.items()}
    return sum(blocks.values()), blocks


def test_callback_statistics_reach_the_fit_logs_with_the_batch_values():
    x, y = data()
    inner = net()
    G, blocks = loop_grams(inner, x, y)                      # the first (only) step's batch
    P = int(sum(np.prod(v.shape) for v in inner.trainable_variables))
    model = GramModel(inner, every=1, keep_blocks=True)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
    cb = GramMeasureCallback(statistics="all")
    history = model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    logs = {k: v[-1] for k, v in history.history.items()}
    fields = [f for f, s in registered_fields().items() if s not in ALWAYS and f != "per_layer"]
    assert not [f for f in fields if f not in logs]
    assert logs["stable_rank"] == pytest.approx(float(stable_rank(G)), rel=1e-9)
    assert logs["effective_rank"] == pytest.approx(float(effective_rank(G)), rel=1e-9)
    assert logs["norm_test"] == pytest.approx(float(norm_test(G)), rel=1e-9)
    assert logs["B_simple"] == pytest.approx(float(noise_scale(G).B_simple), rel=1e-9)
    f = fisher_spectrum_stats(G, P)
    assert logs["m_lambda"] == pytest.approx(float(f.m_lambda), rel=1e-9)
    assert logs["lambda_max_F"] == pytest.approx(float(f.lambda_max), rel=1e-9)
    assert logs["outliers"] == int(f.outliers)
    for name, block in blocks.items():
        assert logs[f"per_layer/{name}/trace"] == pytest.approx(float(np.trace(block)), rel=1e-9)
        assert logs[f"per_layer/{name}/stable_rank"] == pytest.approx(float(stable_rank(block)), rel=1e-9)
    assert not any(k.startswith("fimcore_") for k in history.history)


def test_callback_statistics_by_name_and_instance_and_errors():
    cb = GramMeasureCallback(statistics="noise_scale,stable_rank")
    assert [s.name for s in cb.tracker.statistics] == ["condition", "energy", "noise_scale",
                                                       "spectrum_shape"]
    cb = GramMeasureCallback(statistics=[fimcore.stats.BatchTests()], rtol=0.0)
    assert [s.name for s in cb.tracker.statistics] == ["condition", "energy", "batch_tests"]
    with pytest.raises(ValueError, match="received unknown"):
        GramMeasureCallback(statistics="entropy")
    with pytest.raises(ValueError, match="both tracker= and statistics="):
        GramMeasureCallback(fimcore.MeasureTracker(), statistics="noise_scale")
    x, y = data()
    model = GramModel(net(), every=1)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
    with pytest.raises(ValueError, match="keep_blocks=True"):
        model.fit(x, y, batch_size=B, epochs=1, verbose=0,
                  callbacks=[GramMeasureCallback(statistics="per_layer")])


def test_gram_model_sampled_fisher_logs_the_sampled_gram_and_trains_on_data_labels():
    from fimcore_adapters._tensorflow.sampled import output_cotangents

    x, y = data()
    inner = net()
    with tf.GradientTape() as t:
        logits = inner(x)
    labels = output_cotangents(logits, "cross_entropy", 1, "mean", tf.random.Generator.from_seed(5))[1]
    Gs, _ = loop_grams(inner, x, labels.numpy()[0])          # the same drawn labels
    Ge, _ = loop_grams(inner, x, y)
    plain = net()
    plain.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
    plain.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    model = GramModel(inner, every=1, fisher="sampled", seed=5)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
    cb = GramMeasureCallback()
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    m = cb.tracker.history[0]
    assert m.trace == pytest.approx(float(np.trace(Gs)), rel=1e-9)
    assert m.trace != pytest.approx(float(np.trace(Ge)), rel=1e-3)
    for v, w in zip(inner.trainable_variables, plain.trainable_variables):
        np.testing.assert_allclose(np.asarray(v), np.asarray(w), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="received 'sparse_categorical_crossentropy'"):
        bad = GramModel(net(), every=1, fisher="sampled")
        bad.compile(optimizer=keras.optimizers.SGD(LR), loss="sparse_categorical_crossentropy")
        bad.fit(x, y, batch_size=B, epochs=1, verbose=0, callbacks=[GramMeasureCallback()])
