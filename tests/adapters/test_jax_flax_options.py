"""Documented FlaxGram options: ``rngs=`` reaches stochastic layers (dropout).

Reference: the Jacobian (``jax.jacrev``) of the vector of per-example losses of the same batch
forward with the same dropout key; dropout does not couple samples, so row i is ∇_θ ℓ_i.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fimcore_adapters.jax import FlaxGram


def cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


class DropoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(16, param_dtype=jnp.float64)(x))
        h = nn.Dropout(rate=0.5, deterministic=False)(h)
        return nn.Dense(3, param_dtype=jnp.float64)(h)


def test_rngs_reach_dropout_and_the_gram_uses_that_mask():
    model = DropoutMLP()
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(6, 5))), jnp.asarray(rng.integers(0, 3, 6))
    key = jax.random.key(1)
    variables = model.init({"params": jax.random.key(0), "dropout": key}, x)

    def losses(params, k):
        return cross_entropy(model.apply({"params": params}, x, rngs={"dropout": k}), y)

    def reference(k):
        jac = jax.jacrev(losses)(variables["params"], k)
        J = np.concatenate([np.asarray(v).reshape(6, -1) for v in jax.tree_util.tree_leaves(jac)], axis=1)
        return J @ J.T, jax.grad(lambda p: jnp.mean(losses(p, k)))(variables["params"])

    G_ref, grad_ref = reference(key)
    loss, grad, gram = FlaxGram(model, cross_entropy)(variables, x, y, rngs={"dropout": key})
    np.testing.assert_allclose(np.asarray(gram), G_ref, rtol=0, atol=1e-12 * np.abs(G_ref).max())
    for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(grad_ref)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-12, atol=1e-14)
    assert float(loss) == pytest.approx(float(jnp.mean(losses(variables["params"], key))), rel=1e-14)
    other, _ = reference(jax.random.key(2))   # another mask gives another Gram: the key was used
    assert np.abs(other - G_ref).max() > 1e-3 * np.abs(G_ref).max()
