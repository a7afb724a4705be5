"""JAX sampled-label Fisher Gram and output-Jacobian Gram, against float64 loops written here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.conftest import import_backend

jax = import_backend("jax")
jnp = jax.numpy

from fimcore_adapters.jax import (  # noqa: E402
    output_jacobian_gram,
    output_loss,
    per_sample_gram,
    sample_labels,
    value_grad_and_gram,
)

B, D, H, C = 6, 4, 5, 3


def init():
    r = np.random.default_rng(0)
    return {"w1": jnp.asarray(r.normal(size=(D, H)) / 2), "b1": jnp.asarray(r.normal(size=H) / 4),
            "w2": jnp.asarray(r.normal(size=(H, C))), "b2": jnp.asarray(r.normal(size=C) / 4)}


def predict(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def data():
    r = np.random.default_rng(1)
    return jnp.asarray(r.normal(size=(B, D))), jnp.asarray(r.integers(0, C, size=B))


def flat(tree):
    return np.concatenate([np.asarray(t).reshape(-1) for t in jax.tree_util.tree_leaves(tree)])


def loop_rows(loss_one, params, x, labels):
    grad = jax.jit(jax.grad(loss_one))
    return np.stack([flat(grad(params, x[i], labels[i])) for i in range(x.shape[0])])


def ce_one(p, xi, yi):
    return -jax.nn.log_softmax(predict(p, xi))[yi]


def jacobian_loop(params, x):
    """(B, C, P): one reverse pass per example and output."""
    grad = jax.jit(jax.grad(lambda p, xi, c: predict(p, xi)[c]))
    return np.stack([np.stack([flat(grad(params, x[i], c)) for c in range(C)])
                     for i in range(x.shape[0])])


def softmax_root(params, x):
    roots = []
    for i in range(x.shape[0]):
        p = np.asarray(jax.nn.softmax(predict(params, x[i])))
        w, V = np.linalg.eigh(np.diag(p) - np.outer(p, p))
        w[w < 1e-13 * w.max()] = 0.0          # the exact zero eigenvalue (Λ1 = 0)
        roots.append((V * np.sqrt(w)) @ V.T)
    return np.stack(roots)


@pytest.mark.parametrize("K", [2])
def test_sampled_cross_entropy_equals_loop_with_the_drawn_labels(K):
    params, (x, y) = init(), data()
    loss = output_loss(predict, "cross_entropy")
    key = jax.random.key(7)
    step = jax.jit(value_grad_and_gram(loss, fisher="sampled", mc_samples=K))
    mean_loss, grad, gram = step(params, x, y, key=key)
    labels = np.asarray(sample_labels(loss, params, x, key, K))
    assert labels.shape == (K, B)
    want = sum(J @ J.T for J in (loop_rows(ce_one, params, x, labels[k]) for k in range(K))) / K
    np.testing.assert_allclose(np.asarray(gram), want, rtol=1e-12, atol=1e-14)
    # loss and gradient are the data-label ones
    e_loss, e_grad, _ = value_grad_and_gram(ce_one)(params, x, y)
    np.testing.assert_allclose(float(mean_loss), float(e_loss), rtol=1e-13)
    np.testing.assert_allclose(flat(grad), flat(e_grad), rtol=1e-12, atol=1e-15)


def test_sampled_mse_equals_loop_and_per_sample_gram():
    params, (x, _) = init(), data()
    y = jnp.asarray(np.random.default_rng(3).normal(size=(B, C)))
    loss = output_loss(predict, "mse")
    key = jax.random.key(2)
    G = per_sample_gram(loss, params, x, y, fisher="sampled", key=key)
    yhat = np.asarray(sample_labels(loss, params, x, key))[0]
    J = loop_rows(lambda p, xi, t: jnp.sum((predict(p, xi) - t) ** 2) / C, params, x, yhat)
    np.testing.assert_allclose(np.asarray(G), J @ J.T, rtol=1e-12, atol=1e-14)


def test_sampled_expectation_matches_the_exact_fisher_gram():
    """E[Ĝ_ii] = tr(Λ_i Θ_ii), E[Ĝ_ij] = 0, E[Ĝ_ij²] = ‖Λ_i^½ Θ_ij Λ_j^½‖_F² (i ≠ j): 300 keys,
    each mean within 5 standard errors (estimated from the draws) + 1e-12."""
    params, (x, y) = init(), data()
    Jo = jacobian_loop(params, x)
    R = softmax_root(params, x)
    W = np.einsum("iab,ibp,jcp,jcd->iajd", R, Jo, Jo, R)
    step = jax.jit(value_grad_and_gram(output_loss(predict, "cross_entropy"), fisher="sampled"))
    S = 300
    Gs = np.stack([np.asarray(step(params, x, y, key=k)[2]) for k in jax.random.split(jax.random.key(0), S)])
    off = ~np.eye(B, dtype=bool)
    for stat, want, mask in ((Gs, np.diag(np.einsum("iaia->i", W)), np.ones((B, B), bool)),
                             (Gs ** 2, (W ** 2).sum(axis=(1, 3)), off)):
        mean, se = stat.mean(0), stat.std(0, ddof=1) / math.sqrt(S)
        assert np.all((np.abs(mean - want) <= 5 * se + 1e-12)[mask])


def test_sampled_refusals():
    with pytest.raises(TypeError, match="received loss_fn 'ce_one'"):
        value_grad_and_gram(ce_one, fisher="sampled")
    with pytest.raises(ValueError, match="received 'poisson'"):
        output_loss(predict, "poisson")
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        value_grad_and_gram(output_loss(predict, "mse"), fisher="sampled", mc_samples=0)


@pytest.mark.parametrize("weighted_by", [None, "softmax", "mse"])
def test_output_jacobian_gram_equals_the_loop(weighted_by):
    params, (x, _) = init(), data()
    Jo = jacobian_loop(params, x)
    if weighted_by == "softmax":
        Jo = np.einsum("iab,ibp->iap", softmax_root(params, x), Jo)
    rows = Jo.reshape(B * C, -1)
    want = rows @ rows.T * (2 / C if weighted_by == "mse" else 1)
    got = np.asarray(output_jacobian_gram(predict, params, x, weighted_by=weighted_by))
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)


def test_output_jacobian_gram_errors():
    params, (x, _) = init(), data()
    with pytest.raises(ValueError, match="weighted_by must be one of"):
        output_jacobian_gram(predict, params, x, weighted_by="hinge")
    with pytest.raises(ValueError, match="at most 2 outputs"):
        output_jacobian_gram(predict, params, x, max_outputs=2)


def test_sampled_fisher_refuses_the_empirical_only_options():
    loss = output_loss(predict, "cross_entropy")
    with pytest.raises(ValueError, match="fisher='sampled' does not take keep_blocks"):
        value_grad_and_gram(loss, fisher="sampled", keep_blocks=True)
