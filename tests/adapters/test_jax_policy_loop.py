"""A JAX training loop whose batch size a fimcore.policy rule sets: compilations stay bounded."""

from __future__ import annotations

import numpy as np

from tests.conftest import import_backend

jax = import_backend("jax")
jnp = jax.numpy

import fimcore  # noqa: E402
from fimcore.policy import BatchSizePolicy, Constraints, NoiseScaleRule, NormTestRule, PolicyBatches  # noqa: E402
from fimcore.stats import BatchTests, NoiseScale  # noqa: E402
from fimcore_adapters.jax import gradient_dtype, value_grad_and_gram  # noqa: E402


def _loss(params, x, y):                       # ONE example: logistic regression with a hidden layer
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"]
    return -jax.nn.log_softmax(logits)[y]


def _setup(n=120):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    params = {"w1": jnp.asarray(rng.normal(size=(6, 8)) * 0.5), "b1": jnp.zeros(8),
              "w2": jnp.asarray(rng.normal(size=(8, 2)) * 0.5)}
    return x, y, params


def _run(rule, constraints, stats, epochs=2, drop_last=True):
    x, y, params = _setup()
    policy = BatchSizePolicy(rule, constraints.min_size, constraints)
    batches = PolicyBatches(len(x), policy, seed=1, drop_last=drop_last)
    step = jax.jit(value_grad_and_gram(_loss))
    tracker = fimcore.MeasureTracker(statistics=(*fimcore.stats.DEFAULT, *stats))
    sizes = []
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        for idx in batches:
            _, grad, gram = step(params, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
            params = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grad)
            batches.step(tracker.update(gram, lr=0.5, grad_dtype=gradient_dtype(params)))
            sizes.append(len(idx))
    return sizes, step._cache_size(), policy


def test_the_policy_grows_the_batch_and_each_size_compiles_once():
    constraints = Constraints(min_size=8, max_size=64, multiple_of=8, patience=1)
    sizes, compiled, policy = _run(NormTestRule(theta=0.2), constraints, (BatchTests(),))
    assert sizes[0] == 8 and max(sizes) > 8, sizes
    assert policy.decisions
    assert compiled == len(set(sizes))                                   # one compile per size
    assert compiled <= (64 - 8) // 8 + 1                                 # bounded by the constraints
    assert all(s % 8 == 0 and 8 <= s <= 64 for s in sizes)


def test_noise_scale_rule_with_short_last_batches_counts_them_too():
    constraints = Constraints(min_size=16, max_size=48, multiple_of=16, patience=1)
    sizes, compiled, _ = _run(NoiseScaleRule(), constraints, (NoiseScale(),), epochs=2, drop_last=False)
    assert compiled == len(set(sizes))
    full = {s for s in sizes if s % 16 == 0}
    assert full <= {16, 32, 48} and len(set(sizes) - full) <= 2          # epoch remainders only
