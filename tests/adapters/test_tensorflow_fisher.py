"""TensorFlow sampled-label Fisher Gram and output-Jacobian Gram, against float64 loops written here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.adapters._keras_float64 import keras_float64
from tests.conftest import import_backend

tf = import_backend("tensorflow")
keras = import_backend("keras")

from fimcore_adapters.tensorflow import GramTape, output_jacobian_gram, per_sample_gram  # noqa: E402

B, D, C = 6, 4, 3


@pytest.fixture(scope="module", autouse=True)
def _float64():
    with keras_float64():
        yield


def mlp(C=C):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(C)])
    return model


def data(C=C):
    r = np.random.default_rng(1)
    return r.normal(size=(B, D)), r.integers(0, C, size=B)


def loop_rows(model, x, per_sample_loss, labels):
    rows = []
    for i in range(x.shape[0]):
        with tf.GradientTape() as t:
            loss = per_sample_loss(model(x[i:i + 1]), labels[i:i + 1])
        g = t.gradient(loss, model.trainable_variables)
        rows.append(np.concatenate([np.asarray(v).reshape(-1) for v in g]))
    return np.stack(rows)


def ce_sum(out, t):
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=t, logits=out))


def jacobian_loop(model, x):
    out = []
    for i in range(x.shape[0]):
        rows = []
        for c in range(C):
            with tf.GradientTape() as t:
                h = model(x[i:i + 1])[0, c]
            g = t.gradient(h, model.trainable_variables)
            rows.append(np.concatenate([np.asarray(v).reshape(-1) for v in g]))
        out.append(np.stack(rows))
    return np.stack(out)


def softmax_root(model, x):
    roots = []
    for p in tf.nn.softmax(model(x)).numpy():
        w, V = np.linalg.eigh(np.diag(p) - np.outer(p, p))
        w[w < 1e-13 * w.max()] = 0.0
        roots.append((V * np.sqrt(w)) @ V.T)
    return np.stack(roots)


def sampled_step(model, x, y, **options):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with GramTape(model) as tape:
        out = model(x)
        loss = loss_fn(y, out)
    grads, gram = tape.gradient_and_gram(loss, fisher="sampled", outputs=out, loss_fn=loss_fn,
                                         **options)
    return tape, grads, gram.numpy()


@pytest.mark.parametrize("K", [1, 3])
def test_sampled_cross_entropy_equals_loop_with_the_drawn_labels(K):
    model, (x, y) = mlp(), data()
    tape, grads, gram = sampled_step(model, x, y, mc_samples=K, seed=3)
    labels = tape.sampled_labels.numpy()
    assert labels.shape == (K, B)
    want = sum(J @ J.T for J in (loop_rows(model, x, ce_sum, labels[k]) for k in range(K))) / K
    np.testing.assert_allclose(gram, want, rtol=1e-12, atol=1e-14)
    Je = loop_rows(model, x, ce_sum, y)
    np.testing.assert_allclose(tape.empirical_gram.numpy(), Je @ Je.T, rtol=1e-12, atol=1e-14)
    # the gradient is the data-label gradient
    with tf.GradientTape() as t:
        plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x))
    for g, w in zip(grads, t.gradient(plain, model.trainable_variables)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-12, atol=1e-15)


def test_sampled_mse_equals_loop_with_the_drawn_targets():
    model, (x, _) = mlp(C=2), data(C=2)
    y = np.random.default_rng(2).normal(size=(B, 2))
    loss_fn = keras.losses.MeanSquaredError()
    with GramTape(model) as tape:
        out = model(x)
        loss = loss_fn(y, out)
    _, gram = tape.gradient_and_gram(loss, fisher="sampled", outputs=out, loss_fn=loss_fn, seed=5)
    yhat = tape.sampled_labels.numpy()[0]
    J = loop_rows(model, x, lambda o, t: tf.reduce_sum((o - t) ** 2) / 2, yhat)  # c = 1/D, D = 2
    np.testing.assert_allclose(gram.numpy(), J @ J.T, rtol=1e-12, atol=1e-14)
    G = per_sample_gram(model, loss_fn, x, y, fisher="sampled", seed=5)
    np.testing.assert_allclose(G, gram.numpy(), rtol=1e-12, atol=1e-14)


def test_sampled_expectation_matches_the_exact_fisher_gram():
    """E[Ĝ_ii] = tr(Λ_i Θ_ii), E[Ĝ_ij] = 0, E[Ĝ_ij²] = ‖Λ_i^½ Θ_ij Λ_j^½‖_F² (i ≠ j): 120 draws
    from one generator, each mean within 5 standard errors (estimated from the draws) + 1e-12."""
    model, (x, y) = mlp(), data()
    Jo = jacobian_loop(model, x)
    R = softmax_root(model, x)
    W = np.einsum("iab,ibp,jcp,jcd->iajd", R, Jo, Jo, R)
    gen = tf.random.Generator.from_seed(0)
    S = 120
    Gs = np.stack([sampled_step(model, x, y, seed=gen)[2] for _ in range(S)])
    off = ~np.eye(B, dtype=bool)
    for stat, want, mask in ((Gs, np.diag(np.einsum("iaia->i", W)), np.ones((B, B), bool)),
                             (Gs ** 2, (W ** 2).sum(axis=(1, 3)), off)):
        mean, se = stat.mean(0), stat.std(0, ddof=1) / math.sqrt(S)
        assert np.all((np.abs(mean - want) <= 5 * se + 1e-12)[mask])


@pytest.mark.parametrize("loss_fn, match", [
    (lambda: keras.losses.SparseCategoricalCrossentropy(), "from_logits=False"),
    (lambda: keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
     "label_smoothing=0.1"),
    (lambda: keras.losses.Huber(), "received 'Huber'"),
    (lambda: None, "loss_fn=None"),
])
def test_sampled_refuses_losses_it_cannot_sample(loss_fn, match):
    model, (x, y) = mlp(), data()
    with GramTape(model) as tape:
        out = model(x)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, out)
    with pytest.raises(ValueError, match=match):
        tape.gradient_and_gram(loss, fisher="sampled", outputs=out, loss_fn=loss_fn())
    with pytest.raises(ValueError, match="outputs=None"):
        tape.gradient_and_gram(loss, fisher="sampled", loss_fn="cross_entropy")


@pytest.mark.parametrize("weighted_by", [None, "softmax", "mse"])
def test_output_jacobian_gram_equals_the_loop(weighted_by):
    model, (x, _) = mlp(), data()
    Jo = jacobian_loop(model, x)
    if weighted_by == "softmax":
        Jo = np.einsum("iab,ibp->iap", softmax_root(model, x), Jo)
    rows = Jo.reshape(B * C, -1)
    want = rows @ rows.T * (2 / C if weighted_by == "mse" else 1)
    got = output_jacobian_gram(model, x, weighted_by=weighted_by)
    assert isinstance(got, np.ndarray) and got.shape == (B * C, B * C)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)


def test_output_jacobian_gram_errors():
    model, (x, _) = mlp(), data()
    with pytest.raises(ValueError, match="weighted_by must be one of"):
        output_jacobian_gram(model, x, weighted_by="hinge")
    with pytest.raises(ValueError, match="at most 2 outputs"):
        output_jacobian_gram(model, x, max_outputs=2)


def test_sampled_through_the_generic_jacobian_path():
    model, (x, y) = mlp(), data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with GramTape(model, strategy="generic") as tape:
        out = model(x)
        loss = loss_fn(y, out)
    _, gram = tape.gradient_and_gram(loss, fisher="sampled", outputs=out, loss_fn=loss_fn, seed=8)
    labels = tape.sampled_labels.numpy()[0]
    J = loop_rows(model, x, ce_sum, labels)
    np.testing.assert_allclose(gram.numpy(), J @ J.T, rtol=1e-12, atol=1e-14)
