"""``memory_budget`` in the JAX adapter: the Gram is unchanged under a small budget (against
float64 per-sample loops written here) and a budget that cannot hold one sample is refused."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import import_backend

jax = import_backend("jax")
flax = import_backend("flax")
jnp = jax.numpy
nn = flax.linen

from fimcore_adapters.jax import (  # noqa: E402
    FlaxGram,
    output_loss,
    sample_labels,
    value_grad_and_gram,
)

B, D, H, C = 7, 4, 5, 3
F64 = {"param_dtype": jnp.float64, "dtype": jnp.float64}


def flat(tree):
    return np.concatenate([np.asarray(t, np.float64).reshape(-1)
                           for t in jax.tree_util.tree_leaves(tree)])


def mlp_params():
    r = np.random.default_rng(0)
    return {"w1": jnp.asarray(r.normal(size=(D, H)) / 2), "b1": jnp.asarray(r.normal(size=H) / 4),
            "w2": jnp.asarray(r.normal(size=(H, C))), "b2": jnp.asarray(r.normal(size=C) / 4)}


def predict(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def ce_one(p, xi, yi):
    return -jax.nn.log_softmax(predict(p, xi))[yi]


def mlp_data():
    r = np.random.default_rng(1)
    return jnp.asarray(r.normal(size=(B, D))), jnp.asarray(r.integers(0, C, size=B))


def loop_gram(loss_one, params, x, y):
    grad = jax.jit(jax.grad(loss_one))
    J = np.stack([flat(grad(params, x[i], y[i])) for i in range(x.shape[0])])
    return J @ J.T


P_BYTES = (D * H + H + H * C + C) * 8          # one sample's gradient, float64


def test_generic_budget_keeps_the_gram_and_refuses_below_two_samples():
    params, (x, y) = mlp_params(), mlp_data()
    want = loop_gram(ce_one, params, x, y)
    step = jax.jit(value_grad_and_gram(ce_one, memory_budget=3 * P_BYTES))   # 1 sample per chunk
    loss, grad, gram = step(params, x, y)
    np.testing.assert_allclose(np.asarray(gram), want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=rf"memory_budget must hold two samples' worth of its "
                                         rf"per-sample gradients.*{2 * P_BYTES} bytes; received "
                                         rf"memory_budget={2 * P_BYTES - 1}"):
        value_grad_and_gram(ce_one, memory_budget=2 * P_BYTES - 1)(params, x, y)


def test_sampled_budget_draws_the_same_labels_and_keeps_the_gram():
    params, (x, y) = mlp_params(), mlp_data()
    K, key = 2, jax.random.key(5)
    loss = output_loss(predict, "cross_entropy")
    # two chunks of 2 samples, each holding K gradients: 3 chunks for B = 7 (the last padded)
    step = jax.jit(value_grad_and_gram(loss, fisher="sampled", mc_samples=K,
                                       memory_budget=2 * 2 * K * P_BYTES))
    mean_loss, grad, gram = step(params, x, y, key=key)
    labels = np.asarray(sample_labels(loss, params, x, key, K))
    want = sum(loop_gram(ce_one, params, x, labels[k]) for k in range(K)) / K
    np.testing.assert_allclose(np.asarray(gram), want, rtol=1e-12, atol=1e-14)
    gi = jax.jit(jax.grad(ce_one))
    mean_grad = np.mean([flat(gi(params, x[i], y[i])) for i in range(B)], axis=0)
    np.testing.assert_allclose(flat(grad), mean_grad, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"two samples' worth of its K = 2 sampled-label gradients"):
        value_grad_and_gram(loss, fisher="sampled", mc_samples=K,
                            memory_budget=2 * K * P_BYTES - 1)(params, x, y, key=key)


class Net(nn.Module):
    """Conv, LayerNorm, Embed and two Dense layers; no layer couples samples."""

    @nn.compact
    def __call__(self, inputs):
        x, ids = inputs
        h = nn.relu(nn.Conv(3, (3, 3), **F64)(x)).reshape(x.shape[0], -1)
        e = nn.Embed(6, 4, **F64)(ids).reshape(ids.shape[0], -1)
        h = jnp.concatenate([nn.Dense(6, **F64)(h), e], axis=1)
        return nn.Dense(C, **F64)(jnp.tanh(nn.LayerNorm(**F64)(h)))


def ce_batch(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def net_problem():
    r = np.random.default_rng(2)
    x = jnp.asarray(r.normal(size=(B, 5, 5, 2)))
    ids = jnp.asarray(r.integers(0, 6, size=(B, 3)))
    y = jnp.asarray(r.integers(0, C, size=B))
    variables = Net().init(jax.random.key(0), (x, ids))
    return variables, (x, ids), y


def net_loop(variables, inputs, y):
    x, ids = inputs

    def one(p, i):                              # sample i alone (i traced: one compilation)
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1)    # noqa: E731
        return ce_batch(Net().apply({"params": p}, (take(x), take(ids))), take(y))[0]

    grad = jax.jit(jax.grad(one))
    J = np.stack([flat(grad(variables["params"], i)) for i in range(B)])
    return J @ J.T, J.mean(axis=0)


@pytest.mark.parametrize("strategy, budget, chunked", [
    # auto: Conv_0 (2 × 57 params × 8 bytes per sample, × 7 > 1000) and the factored Dense_0
    # ((2·B·T² + B) × 8 = 168 bytes per sample, × 7 > 1000) go in chunks
    ("auto", 1000, ("Conv_0", "Dense_0")),
    # materialize: Dense_0's per-sample kernels (2 × 456 × 8 = 7296 bytes) fit one sample at a time
    ("materialize", 9000, ("Dense_0",)),
])
def test_flaxgram_budget_keeps_the_gram_and_chunks_the_layers(strategy, budget, chunked):
    variables, inputs, y = net_problem()
    want, mean_grad = net_loop(variables, inputs, y)
    step = FlaxGram(Net(), ce_batch, strategy=strategy, memory_budget=budget)
    loss, grad, gram = jax.jit(step)(variables, inputs, y)
    np.testing.assert_allclose(np.asarray(gram), want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(flat(grad), mean_grad, rtol=1e-12, atol=1e-15)
    reasons = {r.name: r.reason for r in step.report()}
    assert all("in chunks of" in reasons[name] for name in chunked), reasons


def test_flaxgram_budget_below_one_sample_is_refused_naming_the_layer():
    variables, inputs, y = net_problem()
    with pytest.raises(ValueError, match=r"memory_budget must hold the temporaries of at least one "
                                         r"sample of layer 'Conv_0' \(Conv\).*912 bytes; received "
                                         r"memory_budget=900"):
        FlaxGram(Net(), ce_batch, memory_budget=900)(variables, inputs, y)
    with pytest.raises(ValueError, match="memory_budget must be None or a positive number of bytes"):
        FlaxGram(Net(), ce_batch, memory_budget=0)


class Scaled(nn.Module):
    """A parameterised module without a rule: FlaxGram's fallback forms all B rows at once."""

    @nn.compact
    def __call__(self, x):
        return x * self.param("w", nn.initializers.ones, (x.shape[-1],), jnp.float64)


def test_flaxgram_budget_must_hold_the_whole_batch_rows_of_a_fallback_module():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(B, 3)))
    variables = Scaled().init(jax.random.key(0), x)
    loss = lambda out: jnp.sum(out ** 2, axis=1)               # noqa: E731
    want = 2 * x * x                                             # ∂ℓ_i/∂w at w = 1
    gram = FlaxGram(Scaled(), loss, memory_budget=B * 3 * 8)(variables, x)[2]
    np.testing.assert_allclose(np.asarray(gram), np.asarray(want @ want.T), rtol=1e-12)
    with pytest.raises(ValueError, match=rf"per-sample gradients of all B = {B} samples of layer "
                                         rf"'<root>' \(Scaled\) at once \(the fallback.*{B * 3 * 8} "
                                         "bytes"):
        FlaxGram(Scaled(), loss, memory_budget=B * 3 * 8 - 1)(variables, x)
