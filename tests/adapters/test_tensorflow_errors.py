"""TensorFlow adapter: every documented error, with the message it promises."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from fimcore_adapters.tensorflow import GramTape, per_sample_gram


def xent(reduction="sum_over_batch_size"):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)


@pytest.fixture(scope="module")
def mlp():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
                             keras.layers.Dense(3)])


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 4)).astype("float32"), rng.integers(0, 3, 6)


def test_unbuilt_model(batch):
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="must be built before"):
        per_sample_gram(model, xent(), *batch)
    with pytest.raises(ValueError, match="must be built before"):
        GramTape(model)


def test_not_a_keras_model(batch):
    with pytest.raises(TypeError, match="keras.Model or keras.layers.Layer"):
        per_sample_gram(lambda x: x, xent(), *batch)


def test_unknown_mode(mlp):
    with pytest.raises(ValueError, match="mode must be 'registry' or 'generic'"):
        GramTape(mlp, mode="fast")


def test_ragged_batches(mlp, batch):
    x, y = batch
    with pytest.raises(ValueError, match="dense, rectangular"):
        per_sample_gram(mlp, xent(), tf.ragged.constant([[1.0, 2.0], [3.0]]), y[:2])
    with pytest.raises(ValueError, match="dense, rectangular"):
        per_sample_gram(mlp, xent(), [[1.0, 2.0, 3.0, 4.0], [3.0]], y[:2])
    with pytest.raises(ValueError, match="dense, rectangular"):
        per_sample_gram(mlp, xent(), np.array([np.ones(4), np.ones(3)], dtype=object), y[:2])


def test_mismatched_and_empty_batches(mlp, batch):
    x, y = batch
    with pytest.raises(ValueError, match="same batch size"):
        per_sample_gram(mlp, xent(), x, y[:4])
    with pytest.raises(ValueError, match="same batch size"):
        per_sample_gram(mlp, xent(), [x, x[:3]], y)
    with pytest.raises(ValueError, match="at least one sample"):
        per_sample_gram(mlp, xent(), x[:0], y[:0])


def test_keras_loss_reduction_must_match(mlp, batch):
    with pytest.raises(ValueError, match="reduces the batch with reduction='none'"):
        per_sample_gram(mlp, xent("none"), *batch)
    with pytest.raises(ValueError, match="reduces the batch with reduction='sum'"):
        per_sample_gram(mlp, xent("sum"), *batch, loss_reduction="mean")


def test_loss_shape_must_match_reduction(mlp, batch):
    x, y = batch

    def per_sample(y_true, y_pred):  # a plain function returning per-sample values
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    with pytest.raises(ValueError, match="needs a scalar loss; received a loss of shape \\(6,\\)"):
        per_sample_gram(mlp, per_sample, x, y)
    def batch_mean(y_true, y_pred):
        return keras.ops.mean(per_sample(y_true, y_pred))

    with pytest.raises(ValueError, match="needs per-sample losses of shape \\(B,\\)"):
        per_sample_gram(mlp, batch_mean, x, y, loss_reduction="none")
    with pytest.raises(ValueError, match="reduces the batch with reduction='sum_over_batch_size'"):
        per_sample_gram(mlp, xent(), x, y, loss_reduction="none")
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        per_sample_gram(mlp, xent(), x, y, loss_reduction="batchmean")


def test_non_floating_loss(mlp, batch):
    with GramTape(mlp) as tape:
        mlp(batch[0])
    with pytest.raises(TypeError, match="must be a floating tensor"):
        tape.gradient_and_gram(tf.constant(1))


def test_non_finite_gradients_name_the_layer(mlp, batch):
    x, y = batch
    x = x.copy()
    x[2, 1] = np.inf
    with pytest.raises(ValueError, match="must be finite.*first in layer 'dense"):
        per_sample_gram(mlp, xent(), x, y)


def test_gradient_and_gram_inside_block_and_without_forward(mlp, batch):
    x, y = batch
    with GramTape(mlp) as tape:
        loss = xent()(y, mlp(x))
        with pytest.raises(ValueError, match="after the `with GramTape"):
            tape.gradient_and_gram(loss)
    with GramTape(mlp) as tape:
        loss = tf.constant(1.0)
    with pytest.raises(ValueError, match="no trainable layer of model"):
        tape.gradient_and_gram(loss)


def test_variable_used_outside_its_layer_is_refused(batch):
    class Tied(keras.layers.Layer):
        """Reads another layer's kernel (weight tying): the Gram would miss that use."""

        def __init__(self, source, **kwargs):
            super().__init__(**kwargs)
            self.source = source

        def call(self, x):
            return keras.ops.matmul(x, keras.ops.transpose(self.source.kernel))

    inp = keras.Input((4,))
    dense = keras.layers.Dense(3)
    h = dense(inp)
    out = Tied(dense)(h)
    model = keras.Model(inp, out)
    x, _ = batch
    with pytest.raises(ValueError, match="read outside the call of the layer"):
        per_sample_gram(model, keras.losses.MeanSquaredError(), x, x)

    class Loose(keras.layers.Layer):
        """Uses a variable of a layer that is never called (so no rule claims it)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.other = keras.layers.Dense(4)
            self.other.build((None, 4))

        def call(self, x):
            return x * keras.ops.sum(self.other.kernel)

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), Loose()])
    with pytest.raises(ValueError, match="used inside the call of the layer that owns it"):
        per_sample_gram(model, keras.losses.MeanSquaredError(), x, x)
