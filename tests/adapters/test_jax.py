"""JAX adapter, generic path: ``value_grad_and_gram`` and ``per_sample_gram``.

References share no code with the adapter: a Python loop of ``jax.grad`` per sample (float64),
flattened and stacked into J, and a closed form for a linear least-squares model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp  # noqa: E402

from fimcore_adapters.jax import gradient_dtype, per_sample_gram, value_grad_and_gram  # noqa: E402

B = 7


def mlp_loss(params, x, y):
    """Per-example loss of a tiny tanh MLP with a nested parameter pytree."""
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
    out = h @ params["l2"][0] + params["l2"][1]
    return 0.5 * jnp.sum((out - y) ** 2) + 0.1 * jnp.sum(jnp.sin(out))


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    params = {
        "l1": {"w": jnp.asarray(rng.normal(size=(4, 5))), "b": jnp.asarray(rng.normal(size=5))},
        "l2": (jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=3))),
    }
    x = jnp.asarray(rng.normal(size=(B, 4)))
    y = jnp.asarray(rng.normal(size=(B, 3)))
    return params, x, y


@pytest.fixture(scope="module")
def reference(problem):
    return loop_reference(mlp_loss, *problem)


def loop_reference(loss, params, *batch):
    """float64 loop: one jax.grad per sample, rows flattened and concatenated into J."""
    rows, losses = [], []
    grad, loss = jax.jit(jax.grad(loss)), jax.jit(loss)
    for i in range(batch[0].shape[0]):
        sample = [np.asarray(b)[i] for b in batch]
        g = grad(params, *sample)
        rows.append(np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree_util.tree_leaves(g)]))
        losses.append(float(loss(params, *sample)))
    J = np.stack(rows)
    return np.mean(losses), J.mean(axis=0), J @ J.T


def flat(tree):
    return np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7])
def test_matches_per_sample_loop(problem, reference, chunk_size):
    params, x, y = problem
    loss, grad, gram = jax.jit(value_grad_and_gram(mlp_loss, chunk_size=chunk_size))(params, x, y)
    ref_loss, ref_grad, ref_gram = reference
    assert gram.shape == (B, B) and gram.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(gram), ref_gram, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(flat(grad), ref_grad, rtol=1e-12, atol=1e-13)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-13)
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(params)


def test_mean_grad_is_grad_of_mean_loss_and_ones_invariant(problem):
    params, x, y = problem
    _, grad, gram = jax.jit(value_grad_and_gram(mlp_loss))(params, x, y)
    batch_grad = jax.jit(jax.grad(lambda p: jnp.mean(jax.vmap(mlp_loss, (None, 0, 0))(p, x, y))))(params)
    np.testing.assert_allclose(flat(grad), flat(batch_grad), rtol=1e-12, atol=1e-14)
    ones = float(jnp.sum(gram))
    assert ones == pytest.approx(B ** 2 * float(np.sum(flat(batch_grad) ** 2)), rel=1e-12)


def test_per_sample_gram_matches_loop(problem, reference):
    params, x, y = problem
    gram = jax.jit(lambda p, x_, y_: per_sample_gram(mlp_loss, p, x_, y_))(params, x, y)
    np.testing.assert_allclose(np.asarray(gram),
                               reference[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_has_aux_returns_stacked_aux(problem, reference, chunk_size):
    params, x, y = problem

    def loss_aux(p, xi, yi):
        return mlp_loss(p, xi, yi), {"twice": 2.0 * mlp_loss(p, xi, yi), "x": xi}

    (loss, aux), grad, gram = jax.jit(value_grad_and_gram(loss_aux, has_aux=True, chunk_size=chunk_size))(params, x, y)
    losses = jax.vmap(mlp_loss, (None, 0, 0))(params, x, y)
    np.testing.assert_allclose(np.asarray(aux["twice"]), 2 * np.asarray(losses), rtol=1e-13)
    np.testing.assert_array_equal(np.asarray(aux["x"]), np.asarray(x))
    np.testing.assert_allclose(np.asarray(gram), reference[2], rtol=1e-12, atol=1e-12)


_lsq_gram = jax.jit(lambda w, X, y: per_sample_gram(lambda w_, xi, yi: 0.5 * (xi @ w_ - yi) ** 2, w, X, y))


@settings(max_examples=15)
@given(st.integers(0, 2**32 - 1), st.floats(1e-3, 1e3))
def test_linear_least_squares_closed_form(seed, scale):
    """ℓ_i = ½(w·x_i − y_i)²: ∇ℓ_i = r_i x_i, so G = (r rᵀ) ⊙ (X Xᵀ)."""
    rng = np.random.default_rng(seed)
    X, y, w = rng.normal(size=(6, 3)) * scale, rng.normal(size=6), rng.normal(size=3)
    gram = _lsq_gram(jnp.asarray(w), jnp.asarray(X), jnp.asarray(y))
    r = X @ w - y
    expected = np.outer(r, r) * (X @ X.T)
    np.testing.assert_allclose(np.asarray(gram), expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_vmap_over_parameter_ensemble(problem):
    params, x, y = problem
    ensemble = jax.tree_util.tree_map(lambda p: jnp.stack([p, 2 * p, -p]), params)
    step = value_grad_and_gram(mlp_loss)
    losses, grads, grams = jax.jit(jax.vmap(step, in_axes=(0, None, None)))(ensemble, x, y)
    assert grams.shape == (3, B, B)
    for k in range(3):
        member = jax.tree_util.tree_map(lambda p: p[k], ensemble)
        np.testing.assert_allclose(np.asarray(grams[k]), loop_reference(mlp_loss, member, x, y)[2], rtol=1e-11, atol=1e-11)


def test_vmap_over_batches_with_chunks(problem):
    params, x, y = problem
    xs, ys = jnp.stack([x, -x]), jnp.stack([y, 2 * y])
    grams = jax.jit(jax.vmap(value_grad_and_gram(mlp_loss, chunk_size=3), in_axes=(None, 0, 0)))(params, xs, ys)[2]
    for k in range(2):
        np.testing.assert_allclose(np.asarray(grams[k]), loop_reference(mlp_loss, params, xs[k], ys[k])[2],
                                   rtol=1e-11, atol=1e-11)


def test_float64_accumulation_by_default_with_x64_on(problem):
    params, x, y = problem
    p32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
    _, grad, gram = jax.jit(value_grad_and_gram(mlp_loss))(p32, x.astype(jnp.float32), y.astype(jnp.float32))
    assert gram.dtype == jnp.float64
    assert gradient_dtype(p32) == jnp.float32
    assert jax.tree_util.tree_leaves(grad)[0].dtype == jnp.float32
    _, _, g32 = jax.jit(value_grad_and_gram(mlp_loss, dtype=jnp.float32))(p32, x.astype(jnp.float32), y.astype(jnp.float32))
    assert g32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g32), np.asarray(gram), rtol=1e-4, atol=1e-4)


# --- bad input ---------------------------------------------------------------------------


def test_non_scalar_loss_raises_at_trace_time(problem):
    params, x, y = problem
    with pytest.raises(ValueError, match=r"real scalar for ONE example.*shape \(3,\)"):
        jax.jit(value_grad_and_gram(lambda p, xi, yi: (xi @ p["l1"]["w"])[:3]))(params, x, y)


def test_mismatched_leading_sizes_raise(problem):
    params, x, y = problem
    with pytest.raises(ValueError, match="same leading \\(batch\\) size"):
        value_grad_and_gram(mlp_loss)(params, x, y[:5])


def test_scalar_batch_leaf_raises(problem):
    params, x, _ = problem
    with pytest.raises(ValueError, match="needs a leading batch axis"):
        value_grad_and_gram(lambda p, xi, c: mlp_loss(p, xi, jnp.zeros(3)) * c)(params, x, jnp.float64(2.0))


def test_integer_params_raise(problem):
    _, x, y = problem
    with pytest.raises(TypeError, match="floating-point array.*int"):
        value_grad_and_gram(lambda p, xi, yi: jnp.sum(xi) * p)(jnp.int32(3), x, y)


def test_non_finite_params_raise_outside_jit(problem):
    params, x, y = problem
    bad = {**params, "l1": {**params["l1"], "b": params["l1"]["b"].at[2].set(jnp.nan)}}
    with pytest.raises(ValueError, match=r"must be finite.*\['l1'\]\['b'\]"):
        value_grad_and_gram(mlp_loss)(bad, x, y)
    # under jit the values are abstract: the NaN reaches the Gram instead of raising
    assert not bool(jnp.all(jnp.isfinite(jax.jit(value_grad_and_gram(mlp_loss))(bad, x, y)[2])))


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_bad_chunk_size_raises(bad):
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        value_grad_and_gram(mlp_loss, chunk_size=bad)


def test_has_aux_without_pair_raises(problem):
    params, x, y = problem
    with pytest.raises(TypeError, match="must return a pair"):
        value_grad_and_gram(mlp_loss, has_aux=True)(params, x, y)


def test_non_float_dtype_raises(problem):
    params, x, y = problem
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        value_grad_and_gram(mlp_loss, dtype=jnp.int32)(params, x, y)


X64_OFF_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    assert not jax.config.jax_enable_x64
    from fimcore_adapters.jax import value_grad_and_gram
    rng = np.random.default_rng(0)
    X, w = rng.normal(size=(5, 3)), rng.normal(size=3)
    loss = lambda w_, xi: jnp.sin(xi @ w_)
    _, _, gram = jax.jit(value_grad_and_gram(loss))(jnp.asarray(w), jnp.asarray(X))
    c = np.cos(X @ w)
    ref = np.outer(c, c) * (X @ X.T)
    print(gram.dtype, float(np.max(np.abs(np.asarray(gram, np.float64) - ref)) / np.max(np.abs(ref))))
    try:
        value_grad_and_gram(loss, dtype=np.float64)(jnp.asarray(w), jnp.asarray(X))
    except ValueError as e:
        print("ValueError", "needs jax_enable_x64" in str(e))
    import flax.linen as nn
    from fimcore_adapters.jax import FlaxGram
    dense = nn.Dense(1, use_bias=False)
    v = {"params": {"kernel": jnp.asarray(w[:, None], jnp.float32)}}
    g2 = FlaxGram(dense, lambda out, t: jnp.sin(out[:, 0]))(v, jnp.asarray(X, jnp.float32), jnp.zeros(5))[2]
    print(g2.dtype, float(np.max(np.abs(np.asarray(g2, np.float64) - ref)) / np.max(np.abs(ref))))
    """
)


def test_x64_off_gives_float32_gram_and_rejects_float64_request():
    """Documented behaviour with x64 off, in a fresh interpreter (the test session turns x64 on)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["JAX_ENABLE_X64"] = "0"
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", X64_OFF_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.split()
    assert out[0] == "float32"
    assert float(out[1]) < 1e-5
    assert out[2:4] == ["ValueError", "True"]
    assert out[4] == "float32"  # the Flax path follows the same rule
    assert float(out[5]) < 1e-5


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_keep_blocks_per_container_sum_to_the_loop_gram(problem, reference, chunk_size):
    """Blocks per parameter container ("l1" holds w and b; "l2" a tuple), each the Gram of
    that container's columns of the loop's J, summing to G exactly; result() feeds the tracker."""
    import fimcore

    params, x, y = problem
    step = value_grad_and_gram(mlp_loss, chunk_size=chunk_size, keep_blocks=True)
    _, _, gram, blocks = jax.jit(step)(params, x, y)
    assert sorted(blocks) == ["l1", "l2"]
    rows = []
    for i in range(B):
        g = jax.grad(mlp_loss)(params, x[i], y[i])
        rows.append([np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(g[k])])
                     for k in ("l1", "l2")])
    for k, name in enumerate(("l1", "l2")):
        Jk = np.stack([r[k] for r in rows])
        np.testing.assert_allclose(np.asarray(blocks[name]), Jk @ Jk.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(blocks["l1"] + blocks["l2"]), np.asarray(gram))
    np.testing.assert_allclose(np.asarray(gram), reference[2], rtol=1e-12, atol=1e-12)
    result = step.result(gram, blocks)
    assert (result.batch_size, result.num_params) == (B, 4 * 5 + 5 + 5 * 3 + 3)
    assert result.report.paths() == {"l1": "generic", "l2": "generic"}
    assert fimcore.MeasureTracker().update(result, lr=0.1).c_k == pytest.approx(
        fimcore.MeasureTracker().update(reference[2], lr=0.1).c_k, rel=1e-9)


def test_keep_blocks_must_be_a_bool():
    with pytest.raises(ValueError, match="keep_blocks must be True or False"):
        value_grad_and_gram(mlp_loss, keep_blocks="yes")


def test_memory_budget_sets_the_chunk_size(problem, reference):
    """A budget of two samples' gradients is chunk_size=1: the loop's Gram, chunk by chunk."""
    params, x, y = problem
    per_sample = sum(np.size(v) * 8 for v in jax.tree_util.tree_leaves(params))
    step = value_grad_and_gram(mlp_loss, memory_budget=2 * per_sample + 7)
    gram = jax.jit(step)(params, x, y)[2]
    np.testing.assert_allclose(np.asarray(gram), reference[2], rtol=1e-12, atol=1e-12)
    chunked = jax.jit(value_grad_and_gram(mlp_loss, chunk_size=1))(params, x, y)[2]
    np.testing.assert_array_equal(np.asarray(gram), np.asarray(chunked))
    with pytest.raises(ValueError, match="not both"):
        value_grad_and_gram(mlp_loss, memory_budget=100, chunk_size=2)
    with pytest.raises(ValueError, match="memory_budget must be None or a positive"):
        value_grad_and_gram(mlp_loss, memory_budget=0)
