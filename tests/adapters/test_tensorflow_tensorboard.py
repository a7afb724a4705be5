"""Keras' own TensorBoard callback, placed after GramMeasureCallback, writes the measures as scalars."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from tests.conftest import import_backend

tf = import_backend("tensorflow")
import_backend("tensorboard")
import keras  # noqa: E402

from fimcore_adapters.tensorflow import GramMeasureCallback, GramModel  # noqa: E402
from tests.adapters._keras_float64 import keras_float64  # noqa: E402


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``log_dir``, read back with TF's own reader."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return out


def test_batch_and_epoch_scalars_equal_the_trackers_records(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.integers(0, 3, 12)
    with keras_float64():
        keras.utils.set_random_seed(0)
        inner = keras.Sequential([keras.Input((5,), dtype="float64"),
                                  keras.layers.Dense(6, activation="tanh", dtype="float64"),
                                  keras.layers.Dense(3, dtype="float64")])
        model = GramModel(inner, every=1)
        model.compile(optimizer=keras.optimizers.SGD(0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"))
        cb = GramMeasureCallback()
        board = keras.callbacks.TensorBoard(str(tmp_path), update_freq="batch")
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[cb, board])
    scalars = _scalars(str(tmp_path))
    history = cb.tracker.history
    assert len(history) == 6                        # 3 steps per epoch, every step measured
    for tag, field in (("batch_c_k", "c_k"), ("batch_I_k", "I_k"), ("batch_L", "L")):
        written = [v for _, v in sorted(scalars[tag])]
        want = [getattr(m, field) for m in history] if field != "L" else \
            list(np.cumsum([m.weight * m.I_k for m in history]))
        assert written == pytest.approx(want, rel=1e-6), tag   # the summary stores float32
    epoch_c_bar = [v for _, v in sorted(scalars["epoch_C_bar"])]
    assert epoch_c_bar == pytest.approx([np.mean([m.c_k for m in history[:3]]),
                                         np.mean([m.c_k for m in history])], rel=1e-6)
    assert not any("fimcore_" in tag for tag in scalars)
