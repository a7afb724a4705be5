"""TensorFlow adapter: exactness of the per-layer Gram against independent references.

References (none shares code with the adapter's layer rules):
* a float64 loop of ``tf.GradientTape`` over single samples (one gradient per sample, J Jᵀ);
* the PyTorch adapter on the same NumPy weights (MLP, small CNN, CNN with BatchNorm);
* the invariant ``1ᵀ G 1 = B² ‖∇L_mean‖²`` (BatchNorm networks, where no per-sample loop exists).
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from fimcore_adapters.tensorflow import (
    GramTape,
    LayerRule,
    per_sample_gram,
    register_layer_rule,
    rule_for,
)
from tests.adapters._keras_float64 import keras_float64
from tests.conftest import import_backend
from tests.core.helpers import assert_within, float32_sum_bound

RTOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _float64():
    with keras_float64():
        yield


def xent(from_logits=True, reduction="sum_over_batch_size"):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits, reduction=reduction)


def loop_gram(model, x, y):
    """float64 reference: one GradientTape per sample on its own loss, then J Jᵀ."""
    loss_fn = xent()
    rows = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[i:i + 1], model(x[i:i + 1], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        rows.append(np.concatenate([tf.convert_to_tensor(g).numpy().ravel() for g in grads]))
    jac = np.stack(rows)
    return jac @ jac.T


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


class Scale(keras.layers.Layer):
    """A layer with no registered rule: y = x ⊙ w + c (per-feature weights)."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="random_normal")
        self.c = self.add_weight(shape=(), initializer="ones")

    def call(self, x):
        return tf.tanh(x * self.w + self.c)


def _seq(input_shape, *layers, dtype=None):
    return keras.Sequential([keras.Input(input_shape, dtype=dtype), *layers])


def _models():
    L = keras.layers
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5, 9, 9, 4))
    y5 = rng.integers(0, 3, 5)
    yield "mlp", _seq((6,), L.Dense(7, activation="tanh"), L.Dense(5, use_bias=False),
                      L.Dense(3)), rng.normal(size=(5, 6)), y5
    yield "conv2d", _seq((9, 9, 4), L.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
                         L.Conv2D(6, 2, dilation_rate=2, use_bias=False),
                         L.Conv2D(3, 1, data_format="channels_last", activation="tanh"),
                         L.Flatten(), L.Dense(3)), img, y5
    yield "grouped_conv2d", _seq((5, 5, 4), L.Conv2D(6, 2, strides=2, dilation_rate=1, groups=2,
                                                    padding="same"), L.Flatten(), L.Dense(3)), \
        img[:, :5, :5], y5
    yield "conv1d_conv3d", _seq((5, 4, 4, 2), L.Conv3D(3, (2, 3, 2), strides=(1, 2, 1), padding="same"),
                                L.Reshape((5, -1)), L.Conv1D(4, 3, padding="causal", dilation_rate=2),
                                L.Conv1D(3, 2, strides=2), L.Flatten(), L.Dense(3)), \
        rng.normal(size=(5, 5, 4, 4, 2)), y5
    yield "tokens", _seq((6,), L.Embedding(9, 4), L.LayerNormalization(),
                         L.EinsumDense("abc,cde->abde", output_shape=(6, 2, 3), bias_axes="e"),
                         L.Reshape((6, 6)), L.Dense(4, activation="relu"), L.Dense(2),
                         L.GroupNormalization(2, axis=-1), L.Flatten(), L.Dense(3), dtype="int32"), \
        rng.integers(0, 9, size=(5, 6)), y5
    yield "embedding_factored", _seq((2,), L.Embedding(50, 3), L.Flatten(), L.Dense(3),
                                     dtype="int32"), rng.integers(0, 4, size=(5, 2)), y5
    yield "dense_tokens_factored", _seq((2, 40), L.Dense(30), L.Flatten(), L.Dense(3)), \
        rng.normal(size=(5, 2, 40)), y5
    yield "generic_layers", _seq((6,), Scale(), L.Dense(4), L.PReLU(), L.Dense(3)), \
        rng.normal(size=(5, 6)), y5


@pytest.fixture(scope="module")
def models(_float64):
    return {name: (m, x, y) for name, m, x, y in _models()}


@pytest.mark.parametrize("name", ["mlp", "conv2d", "grouped_conv2d", "conv1d_conv3d", "tokens",
                                  "embedding_factored", "dense_tokens_factored", "generic_layers"])
def test_gram_matches_per_sample_loop(models, name):
    model, x, y = models[name]
    expected = loop_gram(model, x, y)
    gram = per_sample_gram(model, xent(), x, y)
    assert gram.dtype == np.float64
    assert_close(gram, expected)


def test_paths_reported_and_both_dense_and_embedding_forms_taken(models):
    seen = set()
    for name in ("mlp", "conv2d", "tokens", "embedding_factored", "dense_tokens_factored",
                 "generic_layers"):
        model, x, y = models[name]
        with GramTape(model) as tape:
            loss = xent()(y, model(x, training=True))
        tape.gradient_and_gram(loss)
        seen.update((r.module, r.path) for r in tape.report())
        assert len(tape.report()) == sum(1 for layer in model._flatten_layers()
                                       if layer.trainable_weights and not layer._layers)
    for pair in [("Dense", "factored"), ("Dense", "materialize"), ("Embedding", "factored"),
                 ("Embedding", "materialize"), ("Conv2D", "materialize"), ("Scale", "generic"),
                 ("PReLU", "generic"), ("EinsumDense", "materialize")]:
        assert pair in seen


@pytest.mark.parametrize("name", ["mlp", "conv2d", "tokens", "generic_layers"])
def test_gradients_equal_plain_tape(models, name):
    model, x, y = models[name]
    with GramTape(model) as tape:
        loss = xent()(y, model(x, training=True))
    grads, _ = tape.gradient_and_gram(loss, model.trainable_variables)
    with tf.GradientTape() as plain:
        loss = xent()(y, model(x, training=True))
    expected = plain.gradient(loss, model.trainable_variables)
    flat = lambda gs: np.concatenate([tf.convert_to_tensor(g).numpy().ravel() for g in gs])
    assert_close(flat(grads), flat(expected), 1e-12)


def test_generic_mode_agrees_with_registry(models):
    model, x, y = models["conv2d"]
    assert_close(per_sample_gram(model, xent(), x, y, strategy="generic"),
                 per_sample_gram(model, xent(), x, y))


def test_layer_shared_by_two_calls():
    dense = keras.layers.Dense(4)
    inp = keras.Input((3,))
    out = keras.layers.Dense(3)(keras.ops.tanh(dense(dense(keras.layers.Dense(4)(inp))[:, :4])))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4, 3)), rng.integers(0, 3, 4)
    assert_close(per_sample_gram(model, xent(), x, y), loop_gram(model, x, y))


def test_sum_and_none_reductions_scale_consistently(models):
    model, x, y = models["mlp"]
    mean = per_sample_gram(model, xent(), x, y)
    total = per_sample_gram(model, xent(reduction="sum"), x, y, loss_reduction="sum")
    none = per_sample_gram(model, xent(reduction="none"), x, y, loss_reduction="none")
    assert_close(total, mean)
    assert_close(none, mean)


@pytest.mark.parametrize(("name", "jit"), [("conv2d", False), ("mlp", True)])
def test_inside_tf_function_and_xla(models, name, jit):
    model, x, y = models[name]
    expected = per_sample_gram(model, xent(), x, y)

    @tf.function(jit_compile=jit)
    def step(x, y):
        with GramTape(model) as tape:
            loss = xent()(y, model(x, training=True))
        grads, gram = tape.gradient_and_gram(loss)
        return gram, grads

    gram, _ = step(tf.constant(x), y)
    assert_close(gram.numpy(), expected)


def test_float64_accumulation_of_a_float32_model():
    model = _seq((6,), keras.layers.Dense(5, dtype="float32"), keras.layers.Dense(3, dtype="float32"))
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(4, 6)).astype("float32"), rng.integers(0, 3, 4)
    g32 = per_sample_gram(model, xent(), x, y)
    g64 = per_sample_gram(model, xent(), x, y, dtype="float64")
    assert g32.dtype == np.float32 and g64.dtype == np.float64
    np.testing.assert_allclose(g64, g32, rtol=1e-4, atol=1e-5 * np.abs(g64).max())


GROUPED_CASES = [
    dict(rank=2, filters=6, kernel_size=3, strides=2, padding="same"),
    dict(rank=2, filters=6, kernel_size=(2, 3), strides=(1, 2), padding="valid", groups=2),
    dict(rank=1, filters=4, kernel_size=3, strides=2, padding="valid"),
    dict(rank=1, filters=4, kernel_size=3, padding="causal"),
]


@pytest.mark.parametrize("chunk_bytes", [None, 1, "no-grouped-kernel"],
                         ids=["one-call", "one-sample-chunks", "no-grouped-kernel"])
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_float32_convolutions_take_the_grouped_filter_gradient_and_match_the_loop(case, chunk_bytes,
                                                                                    monkeypatch):
    """float32 1-D/2-D convolutions use grouped filter gradients over the batch (no float64
    CPU kernel exists for them, so the float64 tests above run the unfold), in one call or in
    batch chunks, and the unfold where the build has no grouped filter-gradient kernel:
    checked against the float64 loop on the same weights, within float32 rounding."""
    from fimcore_adapters._tensorflow import convps as _conv

    grouped = chunk_bytes != "no-grouped-kernel"
    if not grouped:
        monkeypatch.setattr(_conv, "grouped_filter_gradient_available", lambda: False)
    elif os.environ["TF_ENABLE_ONEDNN_OPTS"] != "1":
        pytest.skip("the caller set TF_ENABLE_ONEDNN_OPTS=0: no grouped filter-gradient kernel")
    elif not _conv.grouped_filter_gradient_available():
        pytest.fail("this TensorFlow has no grouped filter-gradient kernel although "
                    "tests/conftest.py sets TF_ENABLE_ONEDNN_OPTS=1 before importing it")
    elif chunk_bytes is not None:
        monkeypatch.setattr(_conv, "CHUNK_BYTES", chunk_bytes)

    case = dict(case)
    rank = case.pop("rank")
    layer_cls = keras.layers.Conv2D if rank == 2 else keras.layers.Conv1D
    shape = (7, 6, 4) if rank == 2 else (9, 4)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5,) + shape), rng.integers(0, 3, 5)

    def build(dtype):
        return _seq(shape, layer_cls(**case, activation="tanh", dtype=dtype), keras.layers.Flatten(dtype=dtype),
                    keras.layers.Dense(3, dtype=dtype), dtype=dtype)

    m32, m64 = build("float32"), build("float64")
    m64.set_weights([w.astype(np.float64) for w in m32.get_weights()])
    calls = []
    real = _conv.grouped_filter_blocks
    monkeypatch.setattr(_conv, "grouped_filter_blocks",
                        lambda *a, **k: calls.append(len(real(*a, **k))) or real(*a, **k))
    gram = per_sample_gram(m32, xent(), x.astype(np.float32), y)
    if not grouped:
        assert not calls, "the grouped filter gradient ran although the build has no kernel for it"
    else:
        assert calls, "the float32 convolution did not take the grouped filter gradient"
        assert set(calls) == ({1} if chunk_bytes is None else {5}), calls
    expected = loop_gram(m64, x, y)
    assert_close(gram, expected, rtol=1e-5)


PROBE = "from fimcore_adapters._tensorflow import convps as _conv; print(_conv.grouped_filter_gradient_available())"


def test_grouped_filter_gradient_probe_follows_the_onednn_switch():
    """TensorFlow's own CPU kernel has no grouped filter gradient, oneDNN's has: the probe says so
    (this process runs with oneDNN on, see the root conftest.py; a fresh one with it off)."""
    from fimcore_adapters._tensorflow import convps as _conv

    if os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1":   # unless the caller switched it off
        assert _conv.grouped_filter_gradient_available()
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[-1] == "False"


def test_grouped_columns_in_uneven_chunks_equal_one_call_and_the_per_sample_loop():
    """Chunks of 2, 2 and 1 samples give the same (P, B) columns and kernel gradient as one
    call, and each column (and each per-sample block of ``grouped_kernel_grads``) is that
    sample's own kernel gradient (one tape per sample). All of it is float32 through different
    kernels: compared within the float32 rounding bound of a sum over the output positions
    (12 per sample, 60 for the batch gradient), from the same sums of |x|·|δ|."""
    from fimcore_adapters._tensorflow import convps as _conv

    if not _conv.grouped_filter_gradient_available():
        pytest.skip("this CPU's TensorFlow build has no grouped filter-gradient kernel (its oneDNN "
                    "operations are off here; TF_ENABLE_ONEDNN_OPTS=1 turns them on); the layer "
                    "rules take the unfold, tested above")

    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(size=(5, 6, 7, 4)), tf.float32)
    kernel = tf.constant(rng.normal(size=(3, 2, 2, 6)), tf.float32)  # groups = 2
    delta = tf.constant(rng.normal(size=(5, 3, 4, 6)), tf.float32)
    opts = dict(kernel_size=(3, 2), strides=(2, 2), padding="same", groups=2,
                kernel_shape=[3, 2, 2, 6])
    per_sample_bytes = 3 * 4 * 6 * 4
    assert _conv._chunk_sizes(delta, 2 * per_sample_bytes) == [2, 2, 1]
    one, grad_one = _conv.grouped_kernel_columns(x, delta, chunk_bytes=10**9, **opts)
    split, grad_split = _conv.grouped_kernel_columns(x, delta, chunk_bytes=2 * per_sample_bytes, **opts)

    def per_sample_columns(inputs, cotangents):
        rows = []
        for i in range(5):
            with tf.GradientTape() as tape:
                tape.watch(kernel)
                y = tf.nn.conv2d(inputs[i:i + 1], kernel, strides=2, padding="SAME")
            rows.append(tape.gradient(y, kernel, output_gradients=cotangents[i:i + 1]).numpy().ravel())
        return np.stack(rows, axis=1)

    expected = per_sample_columns(x, delta)
    abs_sum = per_sample_columns(tf.abs(x), tf.abs(delta))  # Σ_positions |x|·|δ| per entry
    positions = 3 * 4
    column_bound = float32_sum_bound(abs_sum, positions)
    batch_bound = float32_sum_bound(abs_sum.sum(axis=1), 5 * positions)
    assert one.shape == (3 * 2 * 2 * 6, 5)
    assert_within(one.numpy(), expected, column_bound)
    assert_within(split.numpy(), expected, column_bound)
    assert_within(grad_split.numpy().ravel(), expected.sum(axis=1), batch_bound)
    assert_within(grad_one.numpy().ravel(), grad_split.numpy().ravel(), batch_bound)
    blocks = _conv.grouped_kernel_grads(x, delta, chunk_bytes=2 * per_sample_bytes, **opts)
    assert blocks.shape == (5, 3, 2, 2, 6)
    assert_within(blocks.numpy().reshape(5, -1).T, expected, column_bound)


def test_layers_filter_restricts_the_gram(models):
    model, x, y = models["mlp"]
    first = model.layers[0]
    part = per_sample_gram(model, xent(), x, y, params=[first])
    with GramTape(model) as tape:
        loss = xent()(y, model(x, training=True))
    tape.gradient_and_gram(loss)
    b = len(y)
    assert_close(part, tape.layer_grams[first.name].numpy() * b * b)


# ----------------------------------------------------------------------------- BatchNorm


def _bn_cnn():
    L = keras.layers
    return _seq((8, 8, 3), L.Conv2D(4, 3, padding="same", use_bias=False), L.BatchNormalization(),
                L.ReLU(), L.Conv2D(4, 3, strides=2), L.BatchNormalization(axis=-1), L.ReLU(),
                L.GlobalAveragePooling2D(), L.Dense(3))


def test_batchnorm_rows_sum_to_batch_gradient_and_state_is_restored():
    model = _bn_cnn()
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 8, 8, 3)), rng.integers(0, 3, 6)
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    gram = per_sample_gram(model, xent(), x, y)
    for v, b in zip(model.non_trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    with tf.GradientTape() as tape:
        loss = xent()(y, model(x, training=True))
    grad = np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, model.trainable_variables)])
    b = len(y)
    np.testing.assert_allclose(gram.sum(), b * b * grad @ grad, rtol=1e-10)
    # generic jacobian path on the same BN layers (batch statistics kept) agrees
    assert_close(per_sample_gram(model, xent(), x, y, strategy="generic"), gram)


def test_batchnorm_eval_mode_matches_per_sample_loop():
    model = _bn_cnn()
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(4, 8, 8, 3)), rng.integers(0, 3, 4)
    for v in model.non_trainable_variables:
        v.assign(rng.uniform(0.5, 1.5, size=v.shape))
    loss_fn = xent()
    rows = []
    for i in range(len(y)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[i:i + 1], model(x[i:i + 1], training=False))
        rows.append(np.concatenate([g.numpy().ravel() for g in
                                    tape.gradient(loss, model.trainable_variables)]))
    jac = np.stack(rows)
    assert_close(per_sample_gram(model, loss_fn, x, y, training=False), jac @ jac.T)


# ----------------------------------------------------------------------------- against PyTorch


def _torch_pair(kind):
    torch = import_backend("torch")
    from torch import nn

    rng = np.random.default_rng(5)
    L = keras.layers
    if kind == "mlp":
        k = _seq((12,), L.Dense(16, activation="relu"), L.Dense(8, activation="relu"), L.Dense(4))
        t = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        x = rng.normal(size=(6, 12))
        tx = torch.tensor(x)
    else:
        bn = kind == "cnn_bn"
        k = _seq((10, 10, 3), L.Conv2D(4, 3, padding="same", use_bias=not bn),
                 *( [L.BatchNormalization(epsilon=1e-5)] if bn else []), L.ReLU(),
                 L.Conv2D(6, 3, strides=2, dilation_rate=1), L.ReLU(),
                 L.GlobalAveragePooling2D(), L.Dense(4))
        t = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=not bn),
                          *([nn.BatchNorm2d(4, eps=1e-5)] if bn else []), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
        x = rng.normal(size=(6, 10, 10, 3))
        tx = torch.tensor(x.transpose(0, 3, 1, 2).copy())
    t = t.double()
    k_layers = [layer for layer in k.layers if layer.trainable_weights]
    t_layers = [m for m in t if any(True for _ in m.parameters())]
    for kl, tl in zip(k_layers, t_layers, strict=True):
        for kv in kl.trainable_weights:
            value = rng.normal(scale=0.5, size=kv.shape)
            kv.assign(value)
            name = kv.path.split("/")[-1]
            if name == "kernel":
                tv = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
                tl.weight.data = torch.tensor(tv.copy())
            elif name == "gamma":
                tl.weight.data = torch.tensor(value)
            else:
                tl.bias.data = torch.tensor(value)
    y = rng.integers(0, 4, 6)
    return k, t, x, tx, y, torch


@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn_bn"])
def test_agrees_with_torch_adapter(kind):
    k, t, x, tx, y, torch = _torch_pair(kind)
    from fimcore_adapters.torch import per_sample_gram as torch_gram

    t.train()
    expected = torch_gram(t, torch.nn.CrossEntropyLoss(), tx, torch.tensor(y)).detach().numpy()
    assert_close(per_sample_gram(k, xent(), x, y), expected)


# ----------------------------------------------------------------------------- registry


def test_user_registered_rule_is_used_and_exact():
    class Affine(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="random_normal")

        def call(self, x):
            return x * self.w

    calls = []

    @register_layer_rule(Affine)
    class AffineRule(LayerRule):
        name = "affine"

        def variables(self, layer):
            return [layer.w]

        def forward(self, layer, call, args, kwargs):
            calls.append(layer.name)
            y = call(*args, **kwargs)
            return y, {"x": args[0], "watch": [y]}

        def per_sample(self, layer, capture, deltas):
            return [capture["x"] * deltas[0]]

    model = _seq((5,), keras.layers.Dense(4), Affine(), keras.layers.Dense(3))
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(4, 5)), rng.integers(0, 3, 4)
    assert_close(per_sample_gram(model, xent(), x, y), loop_gram(model, x, y))
    assert calls and isinstance(rule_for(model.layers[1]), AffineRule)


def test_subclass_overriding_call_takes_generic_path():
    class Doubled(keras.layers.Dense):
        def call(self, x):
            return 2.0 * super().call(x)

    assert rule_for(Doubled(3)) is None
    model = _seq((4,), Doubled(3))
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(3, 4)), rng.integers(0, 3, 3)
    assert_close(per_sample_gram(model, xent(), x, y), loop_gram(model, x, y))


def test_register_rejects_non_layers():
    with pytest.raises(TypeError, match="keras.layers.Layer subclass"):
        register_layer_rule(int, LayerRule())
    with pytest.raises(TypeError, match="LayerRule instance or subclass"):
        register_layer_rule(keras.layers.Dense, object())


def test_register_refuses_a_second_rule_without_override():
    class Scale(keras.layers.Layer):
        def call(self, x):
            return x

    class First(LayerRule):
        name = "first"

    class Second(LayerRule):
        name = "second"

    with pytest.raises(ValueError, match="Dense already has the rule 'dense'; pass override=True"):
        register_layer_rule(keras.layers.Dense, First())
    register_layer_rule(Scale, First())
    with pytest.raises(ValueError, match="Scale already has the rule 'first'; pass override=True"):
        register_layer_rule(Scale, Second())
    register_layer_rule(Scale, Second(), override=True)
    assert rule_for(Scale()).name == "second"


@pytest.mark.gpu
def test_gram_on_gpu_equals_cpu(models):
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("no GPU visible to TensorFlow")
    model, x, y = models["conv2d"]
    with tf.device("/CPU:0"):
        expected = per_sample_gram(model, xent(), x, y)
    with tf.device("/GPU:0"):
        with GramTape(model) as tape:
            loss = xent()(y, model(tf.constant(x), training=True))
        _, gram = tape.gradient_and_gram(loss)
    assert "GPU" in gram.device
    assert_close(gram.numpy(), expected, 1e-8)


class _Twice(keras.Model):
    """``a`` applied, then ``b``, then ``a`` again on ``b``'s output (same shapes), and a
    layer without a rule (``s``) applied twice in sequence."""

    def __init__(self):
        super().__init__()
        L = keras.layers
        self.a, self.b = L.Dense(4, activation="tanh"), L.Dense(4, activation="tanh")
        self.s, self.head = L.PReLU(alpha_initializer=keras.initializers.Constant(0.3)), L.Dense(3)

    def call(self, x, training=None):
        return self.head(self.s(self.s(self.a(self.b(self.a(x))) - 0.2)))


@pytest.mark.parametrize("strategy", ["auto", "generic"])
def test_layers_called_twice_match_the_loop(strategy):
    """Each call gets its own output gradient (calls of one layer apart from each other), and the
    generic path does not count the route through its own earlier call twice."""
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 4)), rng.integers(0, 3, 5)
    model = _Twice()
    model(x[:1])
    assert_close(per_sample_gram(model, xent(), x, y, strategy=strategy), loop_gram(model, x, y))
