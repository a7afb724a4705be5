"""fimcore.layers: reference kernels against per-sample loops, the sink, the shared options."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fimcore import layers
from fimcore.layers.sink import check_blocks_sum
from tests.core.helpers import to_numpy

seeds = st.integers(0, 2**32 - 1)


def _loop_dense_rows(a: np.ndarray, g: np.ndarray, bias: bool) -> np.ndarray:
    """Per-sample gradient rows of y_t = W a_t (+ b), one sample at a time, float64."""
    rows = []
    for i in range(a.shape[0]):
        w = sum(np.outer(g[i, t], a[i, t]) for t in range(a.shape[1]))
        parts = [w.ravel()] + ([g[i].sum(axis=0)] if bias else [])
        rows.append(np.concatenate(parts))
    return np.array(rows)


@given(batch=st.integers(1, 5), positions=st.integers(1, 4), d_a=st.integers(1, 4),
       d_g=st.integers(1, 3), bias=st.booleans(), seed=seeds)
def test_factored_gram_equals_the_per_sample_loop(xp, batch, positions, d_a, d_g, bias, seed):
    rng = np.random.default_rng(seed)
    a, g = rng.standard_normal((batch, positions, d_a)), rng.standard_normal((batch, positions, d_g))
    rows = _loop_dense_rows(a, g, bias)
    got = to_numpy(layers.factored_gram(xp.asarray(a), xp.asarray(g), bias=bias))
    np.testing.assert_allclose(got, rows @ rows.T, rtol=1e-12, atol=1e-12)
    w = to_numpy(layers.per_sample_weight_grads(xp.asarray(a), xp.asarray(g)))
    np.testing.assert_allclose(w.reshape(batch, -1), rows[:, :d_g * d_a], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(layers.rows_gram(xp.asarray(rows))), rows @ rows.T,
                               rtol=1e-12, atol=1e-12)


@given(batch=st.integers(1, 4), positions=st.integers(1, 3), vocab=st.integers(1, 5), seed=seeds)
def test_embedding_gram_equals_table_gradient_loop(batch, positions, vocab, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, positions))
    g = rng.standard_normal((batch, positions, 3))
    rows = np.zeros((batch, vocab, 3))
    for i in range(batch):
        for t in range(positions):
            rows[i, ids[i, t]] += g[i, t]
    rows = rows.reshape(batch, -1)
    np.testing.assert_allclose(layers.embedding_gram(ids, g), rows @ rows.T, rtol=1e-12, atol=1e-12)


def test_norm_affine_rows_and_tokens():
    rng = np.random.default_rng(0)
    xhat, delta = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    scale, shift = layers.norm_affine_rows(xhat, delta, reduce_axes=(1,))
    for i in range(3):
        np.testing.assert_allclose(scale[i], sum(xhat[i, t] * delta[i, t] for t in range(4)))
        np.testing.assert_allclose(shift[i], delta[i].sum(axis=0))
    assert layers.as_tokens(np.zeros((2, 3, 4, 5)), feature_axes=2).shape == (2, 3, 20)
    with pytest.raises(ValueError, match="feature axes"):
        layers.as_tokens(np.zeros((2,)))


@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), batch=st.integers(1, 5), seed=seeds)
def test_per_layer_sink_blocks_sum_to_the_gram(sizes, batch, seed):
    rng = np.random.default_rng(seed)
    sink = layers.PerLayerSink(keep_factors=True)
    full = []
    for n, p in enumerate(sizes):
        rows = rng.standard_normal((batch, p))
        full.append(rows)
        if n % 2:
            sink.add_rows(f"layer{n}", rows)
        else:  # the same rows handed over as factors with T = 1 and a 1-wide input
            sink.add_factors(f"layer{n}", np.ones((batch, 1, 1)), rows[:, None, :], bias=False)
    J = np.concatenate(full, axis=1)
    np.testing.assert_allclose(sink.gram(), J @ J.T, rtol=1e-12, atol=1e-12)
    assert check_blocks_sum(sink.gram(), sink.blocks(), rtol=1e-12) <= 1e-12
    assert len(sink.factors()) == len(sizes)
    summing = layers.SummingSink()
    for rows in full:
        summing.add_rows("x", rows)
    assert summing.blocks() is None
    np.testing.assert_allclose(summing.gram(), J @ J.T, rtol=1e-12, atol=1e-12)
    with pytest.raises(AssertionError, match="must sum to G"):
        check_blocks_sum(sink.gram() + 1.0, sink.blocks(), rtol=1e-12)


def test_shared_options():
    assert layers.check_strategy("generic") == ("generic", {})
    with pytest.raises(ValueError, match="strategy must be one of"):
        layers.check_strategy("materialise")
    with pytest.raises(ValueError, match="strategy values"):
        layers.check_strategy({"fc": "fast"})
    with pytest.raises(TypeError, match="strategy must be a string"):
        layers.check_strategy(3)
    assert layers.gram_scale("mean", 4) == 16.0 and layers.gram_scale("sum", 4) == 1.0
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        layers.check_reduction("none")
    assert layers.choose("factored", 4, 1, 2, 2, 4)[0] == "factored"
    assert layers.choose("materialize", 4, 1, 2, 2, 4)[0] == "materialize"
    # the cost model's own arithmetic
    assert layers.factored_cost(3, 2, 4, 5) == 9 * 4 * 10
    assert layers.materialize_cost(3, 2, 7) == 3 * 2 * 7 + 9 * 7
