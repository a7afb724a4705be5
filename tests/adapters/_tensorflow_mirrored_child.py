"""Child process of ``test_tensorflow_mirrored.py``: R logical CPU devices, MirroredStrategy.

Logical devices must be configured before TensorFlow initialises its devices, hence a fresh
process. Run as ``python -m tests.adapters._tensorflow_mirrored_child R``; prints one JSON line
(prefixed ``RESULT``) of measured relative errors and values, which the test asserts on. The
references here (a float64 per-sample loop with one ``tf.GradientTape`` per sample on the
concatenated global batch, and plain SGD) share no code with the adapter.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

R = int(sys.argv[1])
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * R)

import keras  # noqa: E402

keras.config.set_floatx("float64")
keras.config.set_dtype_policy("float64")

from fimcore_adapters.tensorflow import GramModel, GramTape  # noqa: E402

STRATEGY = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(R)])
B = 8                      # global batch; each replica holds B / R samples
LOCAL = B // R
PER_SAMPLE = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
OUT = {}


class Scale(keras.layers.Layer):
    """A layer without a rule (the generic path): y = x ⊙ w."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="random_normal")

    def call(self, x):
        return x * self.w


def mlp():
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                             Scale(), keras.layers.Dense(3)])


def cnn():
    return keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, activation="tanh"),
        keras.layers.LayerNormalization(), keras.layers.Conv2D(2, 2, strides=2, padding="same"),
        keras.layers.Flatten(), keras.layers.Dense(3)])


def embed():
    return keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(7, 3),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])


def data(kind, rng, n=B):
    y = rng.integers(0, 3, n).astype("int32")
    if kind == "mlp":
        return rng.normal(size=(n, 5)), y
    if kind == "cnn":
        return rng.normal(size=(n, 6, 6, 2)), y
    return rng.integers(0, 7, (n, 4)).astype("int32"), y


def loop(model, x, y):
    """Float64 per-sample loop: rows ∇θ ℓ_i, one tape per sample."""
    rows = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            loss = PER_SAMPLE(y[i:i + 1], model(x[i:i + 1], training=True))[0]
        grads = tape.gradient(loss, model.trainable_variables)
        rows.append(np.concatenate([tf.convert_to_tensor(g).numpy().ravel() for g in grads]))
    return np.array(rows)


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def split(arr):
    return STRATEGY.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(arr[ctx.replica_id_in_sync_group * LOCAL:
                                    (ctx.replica_id_in_sync_group + 1) * LOCAL]))


def tape_case(kind):
    rng = np.random.default_rng({"mlp": 0, "cnn": 1, "embed": 2}[kind])
    with STRATEGY.scope():
        model = {"mlp": mlp, "cnn": cnn, "embed": embed}[kind]()
    x, y = data(kind, rng)
    tapes = []

    @tf.function
    def step(xs, ys):
        def replica(xl, yl):
            with GramTape(model) as tape:
                loss = tf.nn.compute_average_loss(PER_SAMPLE(yl, model(xl, training=True)),
                                                  global_batch_size=B)
            grads, gram = tape.gradient_and_gram(loss)
            tapes.append(tape)
            with tf.GradientTape() as plain:   # the step the strategy would run without the tape
                loss = tf.nn.compute_average_loss(PER_SAMPLE(yl, model(xl, training=True)),
                                                  global_batch_size=B)
            plain = plain.gradient(loss, model.trainable_variables)
            return gram, grads, [tf.convert_to_tensor(g) for g in plain]
        gram, grads, plain = STRATEGY.run(replica, args=(xs, ys))
        # what apply_gradients aggregates: the sum over replicas
        summed = [STRATEGY.reduce("SUM", g, axis=None) for g in grads]
        applied = [STRATEGY.reduce("SUM", g, axis=None) for g in plain]
        return STRATEGY.experimental_local_results(gram), summed, applied

    grams, summed, applied = step(split(x), split(y))
    grams = [g.numpy() for g in grams]
    J = loop(model, x, y)
    ref = J @ J.T
    flat = np.concatenate([g.numpy().ravel() for g in summed])
    plain = np.concatenate([g.numpy().ravel() for g in applied])
    with GramTape(model) as single:     # one replica, the concatenated batch
        loss = tf.reduce_mean(PER_SAMPLE(y, model(x, training=True)))
    _, gram_single = single.gradient_and_gram(loss)
    report = tapes[0].report()
    OUT[kind] = {
        "shape": list(grams[0].shape),
        "vs_loop": max(rel(g, ref) for g in grams),
        "vs_single": rel(grams[0], gram_single.numpy()),
        "replicas_agree": max(float(np.max(np.abs(g - grams[0]))) for g in grams),
        "grad_vs_applied": rel(flat, plain),
        "grad_vs_loop": rel(flat, J.mean(axis=0)),
        "identity": rel(np.sum(grams[0]), B ** 2 * np.sum(plain ** 2)),
        "bytes_per_sample": report.gathered_bytes_per_sample,
        "paths": report.paths(),
        "reasons": [r.reason for r in report],
    }


def uneven_case():
    """Replicas holding different numbers of samples (R = 2: 5 and 2 of B = 7)."""
    rng = np.random.default_rng(4)
    n = 7
    cuts = [0, 5, 7]
    with STRATEGY.scope():
        model = mlp()
    x, y = data("mlp", rng, n)

    def part(arr):
        return STRATEGY.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(arr[cuts[ctx.replica_id_in_sync_group]:
                                        cuts[ctx.replica_id_in_sync_group + 1]]))

    @tf.function
    def step(xs, ys):
        def replica(xl, yl):
            with GramTape(model) as tape:
                loss = tf.nn.compute_average_loss(PER_SAMPLE(yl, model(xl, training=True)),
                                                  global_batch_size=n)
            return tape.gradient_and_gram(loss)[1]
        return STRATEGY.experimental_local_results(STRATEGY.run(replica, args=(xs, ys)))

    grams = [g.numpy() for g in step(part(x), part(y))]
    J = loop(model, x, y)
    OUT["uneven"] = {"shape": list(grams[0].shape), "vs_loop": max(rel(g, J @ J.T) for g in grams)}


def fit_case():
    rng = np.random.default_rng(3)
    x, y = data("mlp", rng, 2 * B)
    grams = []

    class Grab(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            grams.append(np.asarray(logs["fimcore_gram"]))

    lr = 0.1
    with STRATEGY.scope():
        net = mlp()
        model = GramModel(net, every=1)
        model.compile(optimizer=keras.optimizers.SGD(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ref = mlp()                                   # plain SGD on the global batch, per-sample loop
    ref.set_weights(net.get_weights())
    refs, losses = [], []
    for k in range(2):
        xk, yk = x[k * B:(k + 1) * B], y[k * B:(k + 1) * B]
        losses.append(float(np.mean(PER_SAMPLE(yk, ref(xk, training=True)).numpy())))
        J = loop(ref, xk, yk)
        refs.append(J @ J.T)
        flat, start = J.mean(axis=0), 0
        for v in ref.trainable_variables:
            n = int(np.prod(v.shape))
            v.assign(v - lr * flat[start:start + n].reshape(v.shape))
            start += n
    history = model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0,
                        callbacks=[Grab()])
    OUT["fit"] = {
        "steps": len(grams),
        "shape": list(grams[0].shape),
        "vs_loop": max(rel(g, r) for g, r in zip(grams, refs)),
        "weights": max(rel(a, b) for a, b in zip(net.get_weights(), ref.get_weights())),
        "loss": rel(history.history["loss"][0], np.mean(losses)),
    }
    with STRATEGY.scope():
        every2 = GramModel(mlp(), every=2)
        every2.compile(optimizer="sgd",
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    try:
        every2.fit(x, y, batch_size=B, epochs=1, verbose=0)
        OUT["every2"] = None
    except ValueError as err:
        OUT["every2"] = str(err)


for case in sys.argv[2].split(","):
    if case == "fit":
        fit_case()
    elif case == "uneven":
        uneven_case()
    else:
        tape_case(case)
print("RESULT " + json.dumps(OUT))
