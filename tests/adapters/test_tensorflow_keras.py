"""TensorFlow adapter, Keras integration: train_step with the Gram, measure and schedule callbacks."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import fimcore
from tests.adapters._keras_float64 import keras_float64
from fimcore_adapters.tensorflow import (
    GramMeasureCallback,
    GramModel,
    GramStepMixin,
    StagedBatchSize,
    fit_staged,
    per_sample_gram,
)

N, B, LR = 12, 4, 0.0625  # LR and the data are exact in float32 (Keras feeds floatx)


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """float64 end to end (Keras' own compute_loss cannot mix a float32 loss with float64
    regularisers, and its data adapters feed floatx)."""
    with keras_float64():
        yield


def xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")


def net(seed=0, bn=False, reg=None):
    keras.utils.set_random_seed(seed)
    L = keras.layers
    layers = [keras.Input((5,), dtype="float64"),
              L.Dense(6, activation="tanh", kernel_regularizer=reg, dtype="float64")]
    if bn:
        layers.append(L.BatchNormalization(dtype="float64"))
    layers.append(L.Dense(3, dtype="float64"))
    return keras.Sequential(layers)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 5)).astype("float32").astype("float64"), rng.integers(0, 3, N)


def test_fit_logs_carry_the_measures_of_the_step(data):
    x, y = data
    inner = net()
    expected = fimcore.MeasureTracker().update(
        per_sample_gram(inner, xent(), x[:B], y[:B]), lr=LR, weight=2)
    model = GramModel(inner, every=2)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
    cb = GramMeasureCallback()
    history = model.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
    first = cb.tracker.history[0]
    assert first.c_k == pytest.approx(expected.c_k, rel=1e-9)
    assert first.I_k == pytest.approx(expected.I_k, rel=1e-12)
    # 3 steps per epoch, measured n = 0, 2: each stands for (2, 1) iterations
    assert [m.weight for m in cb.tracker.history] == [2.0, 1.0, 2.0, 1.0]
    assert [m.lr for m in cb.tracker.history] == pytest.approx([LR] * 4)
    for key in ("c_k", "I_k", "C_bar", "L"):
        assert len(history.history[key]) == 2
    assert history.history["L"][-1] == pytest.approx(sum(m.weight * m.I_k for m in cb.tracker.history))
    assert history.history["C_bar"][-1] == pytest.approx(np.mean([m.c_k for m in cb.tracker.history]))
    assert history.history["c_k"][-1] == cb.tracker.history[-1].c_k
    assert not any(k.startswith("fimcore_") for k in history.history)


def test_unknown_epoch_length_defers_the_weights(data):
    x, y = data
    model = GramModel(net(), every=2)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
    ds = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(B)
    assert ds.cardinality() == tf.data.UNKNOWN_CARDINALITY
    cb = GramMeasureCallback()
    model.fit(ds, epochs=2, verbose=0, callbacks=[cb])
    assert [m.weight for m in cb.tracker.history] == [2.0, 1.0, 2.0, 1.0]


def test_gram_step_trains_exactly_like_the_plain_step(data):
    """Same weights after 3 steps as Keras' own train_step (regulariser, BatchNorm, momentum)."""
    x, y = data
    reg = keras.regularizers.L2(0.01)
    plain, inner = net(1, bn=True, reg=reg), net(1, bn=True, reg=reg)
    inner.set_weights(plain.get_weights())
    wrapped = GramModel(inner, every=1)
    for m in (plain, wrapped):
        m.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9), loss=xent())
        m.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0,
              callbacks=[GramMeasureCallback()] if m is wrapped else [])
    for a, b in zip(plain.get_weights(), inner.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)


def test_mixin_and_xla(data):
    x, y = data

    class Net(GramStepMixin, keras.Sequential):
        pass

    keras.utils.set_random_seed(0)
    model = Net([keras.Input((5,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])
    model.set_gram_options(every=2)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent(), jit_compile=True)
    history = model.fit(x, y, batch_size=B, epochs=1, verbose=0, callbacks=[GramMeasureCallback()])
    assert math.isfinite(history.history["L"][0]) and history.history["L"][0] > 0


def test_fit_staged_switches_batch_size_between_epochs(data):
    x, y = data
    schedule = fimcore.StagedBatchSchedule([2, 3, 6], total_epochs=5)
    sizes = [schedule.batch_size(e) for e in range(5)]
    for source in ("arrays", "dataset"):
        model = GramModel(net(), every=1)
        model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
        cb = GramMeasureCallback()
        if source == "arrays":
            history = fit_staged(model, x, y, schedule=schedule, callbacks=[cb], verbose=0, shuffle=False)
        else:
            ds = tf.data.Dataset.from_tensor_slices((x, y))
            history = fit_staged(model, ds, schedule=schedule, callbacks=[cb], verbose=0)
        assert history.history["batch_size"] == [float(s) for s in sizes]
        assert history.epoch == list(range(5))
        steps = sum(math.ceil(N / s) for s in sizes)
        assert int(model.optimizer.iterations) == steps
        assert [m.batch_size for m in cb.tracker.history] == [s for s in sizes for _ in range(N // s)]
        assert len(history.history["L"]) == 5


def test_staged_batch_size_callback_in_a_loop_of_fits(data):
    x, y = data
    model = net()
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
    schedule = fimcore.StagedBatchSchedule([2, 4], total_epochs=3)
    stages, epochs = StagedBatchSize(schedule), []
    while not stages.done:
        h = model.fit(x, y, batch_size=stages.batch_size, initial_epoch=stages.next_epoch,
                      epochs=schedule.total_epochs, verbose=0, callbacks=[stages])
        epochs.append((h.epoch, h.history["batch_size"]))
    assert [e for run, _ in epochs for e in run] == [0, 1, 2]
    assert len(epochs) == 2  # one fit per stage
    assert [b for _, sizes in epochs for b in sizes] == [schedule.batch_size(e) for e in range(3)]
    with pytest.raises(ValueError, match="fit_staged sets epochs"):
        fit_staged(model, x, y, schedule=schedule, epochs=3)


def test_callback_and_wrapper_errors(data):
    x, y = data
    plain = net()
    plain.compile(optimizer="sgd", loss=xent())
    with pytest.raises(TypeError, match="needs a model whose train_step returns the Gram"):
        plain.fit(x, y, epochs=1, verbose=0, callbacks=[GramMeasureCallback()])
    model = GramModel(net(), every=1)
    model.compile(optimizer="sgd", loss=xent(), steps_per_execution=2)
    with pytest.raises(ValueError, match="steps_per_execution must be 1"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[GramMeasureCallback()])
    with pytest.raises(ValueError, match="every must be a positive int"):
        GramModel(net(), every=0)
    with pytest.raises(ValueError, match="must be built before wrapping"):
        GramModel(keras.Sequential([keras.layers.Dense(2)]))


def test_fit_policy_lets_a_rule_set_the_batch_size_at_epoch_boundaries(data):
    from fimcore.policy import BatchSizePolicy, Constraints, NormTestRule
    from fimcore.stats import BatchTests
    from fimcore_adapters.tensorflow import fit_policy

    x, y = data
    x, y = np.concatenate([x] * 4), np.concatenate([y] * 4)        # 48 samples
    model = GramModel(net(), every=1)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=xent())
    measures = GramMeasureCallback(fimcore.MeasureTracker(statistics=(*fimcore.stats.DEFAULT, BatchTests())))
    policy = BatchSizePolicy(NormTestRule(theta=0.05), 4, Constraints(patience=2, max_size=16))
    history = fit_policy(model, x, y, policy=policy, measures=measures, epochs=4, verbose=0,
                         shuffle=False)
    sizes = [int(s) for s in history.history["batch_size"]]
    assert history.epoch == list(range(4)) and sizes[0] == 4 and max(sizes) > 4, sizes
    # every measured step ran with its epoch's size: changes only at epoch boundaries
    per_step = [m.batch_size for m in measures.tracker.history]
    assert per_step == [s for s in sizes for _ in range(len(x) // s)], (per_step, sizes)
    assert int(model.optimizer.iterations) == sum(math.ceil(len(x) / s) for s in sizes)
    assert policy.decisions and all(d.reason for d in policy.decisions)
    with pytest.raises(ValueError, match="fit_policy sets batch_size itself"):
        fit_policy(model, x, y, policy=policy, measures=measures, epochs=1, batch_size=8)
