"""TensorFlow ``params=`` with variables and variable paths, and ``memory_budget``.

References: a float64 loop of one ``tf.GradientTape`` per sample, restricted to the selected
variables (the columns of J are exactly those), shares no code with the adapter.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.adapters._keras_float64 import keras_float64
from tests.conftest import import_backend

tf = import_backend("tensorflow")
keras = import_backend("keras")

from fimcore_adapters.tensorflow import GramModel, GramTape, per_sample_gram  # noqa: E402

B = 6


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with keras_float64():
        yield


class Scale(keras.layers.Layer):
    """No rule: the generic path. y = x ⊙ w + c."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="random_normal", name="w")
        self.c = self.add_weight(shape=(shape[-1],), initializer="random_normal", name="c")

    def call(self, x):
        return x * self.w + self.c


def net(seed=0):
    keras.utils.set_random_seed(seed)
    L = keras.layers
    return keras.Sequential([keras.Input((5,)), L.Dense(6, activation="tanh", name="fc1"),
                             L.LayerNormalization(name="norm"), Scale(name="scale"),
                             L.Dense(3, name="fc2")])


def conv_net(seed=1):
    keras.utils.set_random_seed(seed)
    L = keras.layers
    return keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(4, 3, activation="tanh", name="c1"),
                             L.Conv2D(3, 2, strides=2, name="c2"), L.Flatten(),
                             L.Dense(3, name="out")])


def data(shape=(5,), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, *shape)), rng.integers(0, 3, B)


def xent(reduction="sum_over_batch_size"):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)


def loop_rows(model, x, y, variables):
    rows = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            loss = xent("sum")(y[i:i + 1], model(x[i:i + 1], training=True))
        rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, variables)]))
    return np.stack(rows)


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def test_params_takes_variables_and_paths_and_the_columns_are_exactly_those():
    """fc1's kernel (object), norm's beta (by path) and the whole rule-less Scale layer; a layer
    with some variables selected contributes only those; every variable still gets its gradient."""
    model = net()
    x, y = data()
    fc1, norm, scale = model.get_layer("fc1"), model.get_layer("norm"), model.get_layer("scale")
    params = [fc1.kernel, norm.beta.path, scale]
    chosen = [fc1.kernel, norm.beta, scale.w, scale.c]
    J = loop_rows(model, x, y, chosen)
    with GramTape(model, params=params) as tape:
        loss = xent()(y, model(x, training=True))
    grads, gram = tape.gradient_and_gram(loss)
    assert rel(gram, J @ J.T) <= 1e-12
    full = loop_rows(model, x, y, model.trainable_variables)
    start = 0
    for v, g in zip(model.trainable_variables, grads):
        n = int(np.prod(v.shape))
        np.testing.assert_allclose(g.numpy().ravel(), full[:, start:start + n].mean(0), rtol=1e-12,
                                   atol=1e-15)
        start += n
    assert tape.result().num_params == sum(int(np.prod(v.shape)) for v in chosen)
    by_name = {r.name: r.params for r in tape.report()}
    assert by_name == {"fc1": 5 * 6, "norm": 6, "scale": 12}


def test_params_with_a_partial_conv_layer_and_a_path_string():
    model = conv_net()
    x, y = data((6, 6, 2), seed=1)
    c1, out = model.get_layer("c1"), model.get_layer("out")
    J = loop_rows(model, x, y, [c1.bias, out.kernel])
    G = per_sample_gram(model, xent(), x, y, params=[c1.bias.path, out.kernel])
    assert rel(G, J @ J.T) <= 1e-12


@pytest.mark.parametrize("entry", ["no_such_layer", "fc1/nope"], ids=["name", "path"])
def test_params_refuses_an_unknown_name(entry):
    model = net()
    with pytest.raises(ValueError, match=r"params must name layers or trainable variables.*"
                                         + entry.replace("/", ".")):
        GramTape(model, params=[entry])


def test_params_refuses_a_variable_of_another_model():
    model, other = net(), net(seed=3)
    with pytest.raises(ValueError, match=r"neither"):
        GramTape(model, params=[other.get_layer("fc1").kernel])


# --------------------------------------------------------------------------- memory_budget


def cnn_tokens(seed=2):
    """Conv (factored or rows), LayerNorm (rows), Dense on tokens (T = 4), rule-less Scale."""
    keras.utils.set_random_seed(seed)
    L = keras.layers
    return keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3, activation="tanh", name="c1"),
                             L.LayerNormalization(name="norm"),
                             L.Conv2D(4, 2, strides=2, name="c2"), L.Reshape((4, 4)),
                             L.Dense(5, activation="tanh", name="tok"), L.Flatten(),
                             Scale(name="scale"), L.Dense(3, name="out")])


@pytest.mark.parametrize("strategy", ["auto", "factored", "materialize"])
@pytest.mark.parametrize("budget", [2000, 4000])
def test_gram_is_unchanged_under_a_small_memory_budget(budget, strategy):
    """2000 bytes: 1 to 3 samples per chunk (B = 6; c1 rows 912 bytes per sample, the token
    Dense one factored row 1536, the rule-less Scale its (6, 40) rows at once); the Gram equals the
    float64 loop, and so do the gradients."""
    model = cnn_tokens()
    x, y = data((6, 6, 2), seed=2)
    J = loop_rows(model, x, y, model.trainable_variables)
    with GramTape(model, memory_budget=budget, strategy=strategy) as tape:
        loss = xent()(y, model(x, training=True))
    grads, gram = tape.gradient_and_gram(loss)
    assert rel(gram, J @ J.T) <= 1e-12
    flat = np.concatenate([g.numpy().ravel() for g in grads])
    assert rel(flat, J.mean(0)) <= 1e-12
    reasons = {r.name: r.reason for r in tape.report()}
    assert f"rows in chunks of {budget // (2 * 57 * 8)} samples" in reasons["c1"]   # P = 3·3·2·3 + 3
    if strategy == "factored":          # T = 4 tokens: 2·B·T² float64 per factored row
        assert f"factored rows in chunks of {budget // (2 * B * 16 * 8)} samples" in reasons["tok"]
    else:                               # the cost model's choice: rows, P = 4·5 + 5
        assert f"rows in chunks of {budget // (2 * 25 * 8)} samples" in reasons["tok"]


def test_memory_budget_inside_a_traced_keras_step():
    """GramModel.fit: the chunk loops (tf.while_loop) run inside the traced train step."""
    model = net()
    x, y = data()
    J = loop_rows(model, x, y, model.trainable_variables)
    grams = []

    class Grab(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            grams.append(np.asarray(logs["fimcore_gram"]))

    wrapped = GramModel(model, memory_budget=600)
    wrapped.compile(optimizer=keras.optimizers.SGD(0.0), loss=xent())
    wrapped.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[Grab()])
    assert rel(grams[0], J @ J.T) <= 1e-12


def test_too_small_a_memory_budget_is_refused_naming_the_layer():
    model = cnn_tokens()
    x, y = data((6, 6, 2), seed=2)
    with pytest.raises(ValueError, match=r"memory_budget=40 bytes .*layer 'c1' \(Conv2D\)"):
        with GramTape(model, memory_budget=40) as tape:
            loss = xent()(y, model(x, training=True))
        tape.gradient_and_gram(loss)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1MB"])
def test_memory_budget_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"memory_budget must be None or a positive number of bytes"):
        GramTape(net(), memory_budget=bad)
