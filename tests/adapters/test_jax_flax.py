"""JAX adapter, Flax layer-factored path (``FlaxGram``).

References: a float64 Python loop of ``jax.grad`` of one example's loss (no code shared with the
adapter), the generic ``value_grad_and_gram`` path, and for BatchNorm in train mode a hand-written
network whose parameters are copied per sample (∂L/∂θ_i at θ_i = θ is sample i's contribution).
"""

from __future__ import annotations

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp  # noqa: E402

from fimcore_adapters.jax import (  # noqa: E402
    FlaxGram,
    flax_per_sample_gram,
    flax_value_grad_and_gram,
    value_grad_and_gram,
)

F64 = dict(param_dtype=jnp.float64)

def reasons(step):
    """``{module path: how its rows were formed}`` from ``step.report()``."""
    return {r.name: r.reason for r in step.report()}



def cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


_ONE_SAMPLE = {}


def loop_reference(model, variables, x, y, **apply_kwargs):
    """float64 loop: jax.grad of one example's loss, rows stacked into J."""
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    key = (model, tuple(sorted(apply_kwargs.items())))
    if key not in _ONE_SAMPLE:
        @jax.jit
        def one(p, r, xi, yi):
            return jax.value_and_grad(
                lambda q: cross_entropy(model.apply({"params": q, **r}, xi[None], **apply_kwargs), yi[None])[0])(p)

        _ONE_SAMPLE[key] = one
    one = _ONE_SAMPLE[key]
    rows, losses = [], []
    for i in range(x.shape[0]):
        loss, g = one(params, rest, x[i], y[i])
        rows.append(np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(g)]))
        losses.append(float(loss))
    J = np.stack(rows)
    return np.mean(losses), J.mean(0), J @ J.T


def numpy_init(model, *inputs, seed=0):
    """Variables of ``model`` drawn with NumPy (shapes from ``jax.eval_shape``: no compilation)."""
    shapes = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *inputs)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1])
        if "var" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "mean" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        scale = 1.0 / np.sqrt(max(1, np.prod(leaf.shape[:-1])))
        base = 1.0 if "scale" in name else 0.0
        return jnp.asarray(base + scale * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def flat(tree):
    return np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(tree)])


class ConvNet(nn.Module):
    """Conv with stride, explicit asymmetric padding, dilation and feature groups, norms, dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=2, padding="SAME", **F64)(x)
        x = nn.relu(nn.GroupNorm(num_groups=2, **F64)(x))
        x = nn.Conv(4, (3, 2), kernel_dilation=(2, 1), feature_group_count=2, padding=((2, 1), (2, 1)),
                    use_bias=False, **F64)(x)
        x = nn.LayerNorm(**F64)(x)
        x = nn.DenseGeneral((2, 3), axis=(-2, -1), **F64)(x)  # contracts (W, C), keeps H: T = H = 3
        x = jnp.tanh(x.reshape(x.shape[0], -1))
        return nn.Dense(3, **F64)(x)


class Scale(nn.Module):
    """A custom module with its own parameter (fallback path) around a Dense submodule."""

    @nn.compact
    def __call__(self, x):
        s = self.param("s", nn.initializers.normal(1.0), (x.shape[-1],), jnp.float64)
        return x * s + nn.Dense(x.shape[-1], name="inner", **F64)(x)


class TokenNet(nn.Module):
    """Embedding, a Dense applied twice (shared weights, T positions), fallback module, RMSNorm."""

    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(7, 4, **F64)(ids)
        shared = nn.Dense(4, **F64)
        h = shared(jnp.tanh(shared(e)))
        h = nn.RMSNorm(**F64)(Scale()(h))
        return nn.Dense(3, **F64)(h.mean(axis=1))


@pytest.fixture(scope="module")
def conv_problem():
    model = ConvNet()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8, 7, 3)))
    y = jnp.arange(5) % 3
    variables = numpy_init(model, x)
    return model, variables, x, y


@pytest.fixture(scope="module")
def token_problem():
    model = TokenNet()
    ids = np.random.default_rng(1).integers(0, 7, size=(5, 3))
    ids[0, 0] = -1  # a negative id wraps around, as in nn.Embed
    y = jnp.arange(5) % 3
    return model, numpy_init(model, jnp.asarray(ids)), jnp.asarray(ids), y


def test_conv_net_matches_loop_and_reports_paths(conv_problem):
    model, variables, x, y = conv_problem
    step = FlaxGram(model, cross_entropy)
    loss, grad, gram = jax.jit(step)(variables, x, y)
    ref_loss, ref_grad, ref_gram = loop_reference(model, variables, x, y)
    np.testing.assert_allclose(np.asarray(gram), ref_gram, rtol=1e-10, atol=1e-12 * np.abs(ref_gram).max())
    np.testing.assert_allclose(flat(grad), ref_grad, rtol=1e-10, atol=1e-13)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-12)
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(variables["params"])
    assert reasons(step) == {
        "Conv_0": "conv: materialised per-sample kernel gradients by patches (lax.map)",
        "GroupNorm_0": "norm: per-sample affine",
        "Conv_1": "conv: materialised per-sample kernel gradients by patches (lax.map)",
        "LayerNorm_0": "norm: per-sample affine",
        "DenseGeneral_0": "dense_general: materialised (T=3)",
        "Dense_0": "dense: factored (T=1)",
    }


@pytest.mark.parametrize("strategy", ["auto", "factored", "materialize"])
def test_tokens_shared_weights_fallback_match_loop(token_problem, strategy):
    model, variables, ids, y = token_problem
    step = FlaxGram(model, cross_entropy, strategy=strategy)
    dense_form = {"materialize": "materialised"}.get(strategy, strategy)
    loss, grad, gram = jax.jit(step)(variables, ids, y)
    ref_loss, ref_grad, ref_gram = loop_reference(model, variables, ids, y)
    np.testing.assert_allclose(np.asarray(gram), ref_gram, rtol=1e-10, atol=1e-12 * np.abs(ref_gram).max())
    np.testing.assert_allclose(flat(grad), ref_grad, rtol=1e-10, atol=1e-13)
    assert reasons(step)["Scale_0"].startswith("fallback")
    if strategy != "auto":
        assert reasons(step)["Dense_0"] == f"dense: {dense_form} (T=6)"
        assert reasons(step)["Embed_0"] == f"embed: {dense_form} (T=3)"


CONV_OPTIONS = [
    dict(features=4, kernel_size=(3, 3), strides=(2, 1), padding="VALID"),
    dict(features=6, kernel_size=(2, 3), padding="CIRCULAR", kernel_dilation=(1, 2)),
    dict(features=4, kernel_size=(3, 3), padding="REFLECT", strides=2),
    dict(features=6, kernel_size=(3, 1), padding=((0, 2), (1, 0)), feature_group_count=3),
    dict(features=4, kernel_size=(3,), padding="CAUSAL", kernel_dilation=2, one_d=True),
    dict(features=4, kernel_size=(2, 2, 2), padding="SAME", strides=(1, 2, 1), three_d=True),
    dict(features=4, kernel_size=(3, 3), padding=((1, 1), (1, 1)), input_dilation=2),  # vmap path
    dict(features=4, kernel_size=(3, 3), padding=((-1, 1), (1, 1))),               # vmap path
]


@pytest.mark.parametrize("options", CONV_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_conv_option_matches_the_loop(options):
    options = dict(options)
    shape = (5, 9, 3) if options.pop("one_d", False) else (
        (5, 5, 6, 4, 3) if options.pop("three_d", False) else (5, 7, 8, 3))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Conv(**options, **F64)(x))
            return nn.Dense(3, **F64)(h.reshape(h.shape[0], -1))

    model = Net()
    x = jnp.asarray(np.random.default_rng(2).normal(size=shape))
    y = jnp.arange(5) % 3
    variables = numpy_init(model, x)
    step = FlaxGram(model, cross_entropy)
    _, grad, gram = jax.jit(step)(variables, x, y)
    _, ref_grad, ref_gram = loop_reference(model, variables, x, y)
    np.testing.assert_allclose(np.asarray(gram), ref_gram, rtol=1e-10, atol=1e-12 * np.abs(ref_gram).max())
    np.testing.assert_allclose(flat(grad), ref_grad, rtol=1e-10, atol=1e-13)
    fallback = "input_dilation" in options or options["padding"] == ((-1, 1), (1, 1))
    assert reasons(step)["Conv_0"].endswith("vmap of the convolution VJP" if fallback else "patches (lax.map)")


@pytest.mark.parametrize("over_samples", ["map", "vmap"])
def test_per_sample_conv_kernels_both_loop_forms_match_the_vjp(over_samples):
    """The patches form, looped (CPU) or batched (accelerators), against jax.vjp per sample."""
    from fimcore_adapters._jax.convps import conv_kernel_per_sample

    conv = nn.Conv(6, (3, 2), strides=(2, 1), padding="SAME", feature_group_count=2, **F64)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 7, 6, 4)))
    variables = numpy_init(conv, x)
    out = conv.apply(variables, x)
    g = jnp.asarray(rng.normal(size=out.shape))
    got = conv_kernel_per_sample(conv, x, g, over_samples=over_samples)
    for i in range(3):
        ref = jax.vjp(lambda k: conv.apply({"params": {**variables["params"], "kernel": k}}, x[i:i + 1]),
                      variables["params"]["kernel"])[1](g[i:i + 1])[0]
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(ref), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="over_samples must be"):
        conv_kernel_per_sample(conv, x, g, over_samples="scan")


def test_factored_matches_generic_path(conv_problem):
    model, variables, x, y = conv_problem
    g_fact = jax.jit(lambda v, x_, y_: flax_per_sample_gram(model, cross_entropy, v, x_, y_))(variables, x, y)
    per_example = lambda p, xi, yi: cross_entropy(model.apply({"params": p}, xi[None]), yi[None])[0]  # noqa: E731
    _, _, g_gen = jax.jit(value_grad_and_gram(per_example))(variables["params"], x, y)
    np.testing.assert_allclose(np.asarray(g_fact), np.asarray(g_gen), rtol=1e-11, atol=1e-13)


def test_vmap_over_parameter_ensemble(conv_problem):
    model, variables, x, y = conv_problem
    ensemble = jax.tree_util.tree_map(lambda v: jnp.stack([v, 0.5 * v]), variables)
    step = flax_value_grad_and_gram(model, cross_entropy)
    grams = jax.jit(jax.vmap(step, in_axes=(0, None, None)))(ensemble, x, y)[2]
    for k in range(2):
        member = jax.tree_util.tree_map(lambda v: v[k], ensemble)
        np.testing.assert_allclose(np.asarray(grams[k]), loop_reference(model, member, x, y)[2], rtol=1e-10,
                                   atol=1e-12)


# --- BatchNorm --------------------------------------------------------------------------


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Dense(6, **F64)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, **F64)(x)
        return nn.Dense(3, **F64)(nn.relu(x))


def bn_contribution_gram(params, x, y):
    """Independent reference: each sample gets its own copy θ_i of every parameter, the batch
    statistics stay shared, and row i of J is B·∂L/∂θ_i at θ_i = θ."""
    n = x.shape[0]
    p = params
    copies = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), p)

    def batch_loss(c):
        h = jnp.einsum("bi,bio->bo", x, c["Dense_0"]["kernel"]) + c["Dense_0"]["bias"]
        mean, var = h.mean(0), h.var(0)
        h = (h - mean) / jnp.sqrt(var + 1e-5) * c["BatchNorm_0"]["scale"] + c["BatchNorm_0"]["bias"]
        out = jnp.einsum("bi,bio->bo", jax.nn.relu(h), c["Dense_1"]["kernel"]) + c["Dense_1"]["bias"]
        return jnp.mean(cross_entropy(out, y))

    g = jax.grad(batch_loss)(copies)
    J = n * np.concatenate([np.asarray(v).reshape(n, -1) for v in jax.tree_util.tree_leaves(g)], axis=1)
    return J @ J.T, J.sum(0) / n


def test_batchnorm_train_mode_rows_are_batch_contributions():
    model, n = BNNet(), 6
    x = jnp.asarray(np.random.default_rng(2).normal(size=(n, 4)))
    y = jnp.arange(n) % 3
    variables = numpy_init(model, x)
    step = FlaxGram(model, cross_entropy, mutable=["batch_stats"])
    loss, grad, gram, state = jax.jit(step)(variables, x, y)
    ref_gram, ref_grad = bn_contribution_gram(variables["params"], x, y)
    np.testing.assert_allclose(np.asarray(gram), ref_gram, rtol=1e-10, atol=1e-12 * np.abs(ref_gram).max())
    np.testing.assert_allclose(flat(grad), ref_grad, rtol=1e-10, atol=1e-13)
    batch_grad = jax.grad(lambda p: jnp.mean(cross_entropy(
        model.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0], y)))(variables["params"])
    np.testing.assert_allclose(flat(grad), flat(batch_grad), rtol=1e-11, atol=1e-14)
    assert float(jnp.sum(gram)) == pytest.approx(n * n * float(np.sum(flat(batch_grad) ** 2)), rel=1e-11)
    _, expected_state = model.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(flat(state), flat(expected_state), rtol=1e-13)


def test_batchnorm_eval_mode_matches_loop():
    model = BNNet()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 4)))
    y = jnp.arange(4) % 3
    variables = numpy_init(model, x)
    variables = {**variables, "batch_stats": jax.tree_util.tree_map(lambda v: v + 0.3, variables["batch_stats"])}
    gram = FlaxGram(model, cross_entropy, apply_kwargs={"train": False})(variables, x, y)[2]
    ref = loop_reference(model, variables, x, y, train=False)[2]
    np.testing.assert_allclose(np.asarray(gram), ref, rtol=1e-10, atol=1e-12 * np.abs(ref).max())


# --- bad input --------------------------------------------------------------------------


def test_reduced_loss_raises(conv_problem):
    model, variables, x, y = conv_problem
    with pytest.raises(ValueError, match=r"per-example losses, shape \(5,\)"):
        FlaxGram(model, lambda o, t: jnp.mean(cross_entropy(o, t)))(variables, x, y)


def test_mismatched_batch_sizes_raise(conv_problem):
    model, variables, x, y = conv_problem
    with pytest.raises(ValueError, match="same leading \\(batch\\) size"):
        FlaxGram(model, cross_entropy)(variables, x, y[:3])


def test_integer_params_raise():
    with pytest.raises(TypeError, match="floating-point array"):
        FlaxGram(nn.Dense(2), cross_entropy)({"params": {"kernel": jnp.ones((3, 2), jnp.int32)}},
                                             jnp.ones((2, 3)), jnp.zeros(2, jnp.int32))


def test_non_finite_params_raise(conv_problem):
    model, variables, x, y = conv_problem
    bad = jax.tree_util.tree_map(lambda v: v, variables)
    bad["params"]["Dense_0"]["bias"] = bad["params"]["Dense_0"]["bias"].at[0].set(jnp.inf)
    with pytest.raises(ValueError, match="must be finite.*Dense_0"):
        FlaxGram(model, cross_entropy)(bad, x, y)


def test_fallback_error_mode_raises(token_problem):
    model, variables, ids, y = token_problem
    with pytest.raises(NotImplementedError, match="Scale_0.*not a recognised Flax layer"):
        FlaxGram(model, cross_entropy, fallback="error")(variables, ids, y)


class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(5, 3, **F64)
        return emb.attend(emb(ids).mean(1))


def test_tied_embedding_refused_with_fallback_error():
    ids = jnp.array([[0, 1], [2, 3]])
    variables = numpy_init(Tied(), ids)
    with pytest.raises(NotImplementedError, match="called through 'attend'.*fallback='error'"):
        FlaxGram(Tied(), cross_entropy, fallback="error")(variables, ids, jnp.array([0, 1]))


def test_tied_embedding_matches_per_sample_loop():
    """The embedding used by __call__ and attend: per-sample gradients summed over both calls."""
    ids = jnp.array([[0, 1], [2, 3], [4, 4], [1, 0]])
    y = jnp.array([0, 1, 4, 2])
    variables = numpy_init(Tied(), ids)
    rows = []
    for i in range(4):
        g = jax.grad(lambda p: cross_entropy(Tied().apply({"params": p}, ids[i:i + 1]), y[i:i + 1])[0])(
            variables["params"])
        rows.append(np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(g)]))
    J = np.stack(rows)
    step = FlaxGram(Tied(), cross_entropy, keep_blocks=True)
    _, _, gram, blocks = step(variables, ids, y)
    np.testing.assert_allclose(np.asarray(gram), J @ J.T, rtol=1e-12, atol=1e-14)
    assert step.report().paths() == {"Embed_0": "materialize"}
    assert step.report()[0].calls == 2 and "attend" in step.report()[0].reason
    np.testing.assert_allclose(np.asarray(blocks["Embed_0"]), np.asarray(gram), rtol=0, atol=0)


class Flattened(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, **F64)(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], -1)


def test_layer_without_leading_batch_axis_raises():
    x = jnp.ones((2, 3, 4))
    variables = numpy_init(Flattened(), x)
    with pytest.raises(ValueError, match="must receive the batch on its leading axis"):
        FlaxGram(Flattened(), cross_entropy)(variables, x, jnp.array([0, 1]))


@pytest.mark.parametrize("kwargs, match", [
    ({"dense_form": "fast"}, "dense_form must be"),
    ({"strategy": "fast"}, "strategy must be one of"),
    ({"strategy": {"Dense_0": "fast"}}, "strategy values must be in"),
    ({"strategy": "factored", "dense_form": "factored"}, "not both"),
    ({"keep_blocks": 1}, "keep_blocks must be True or False"),
    ({"fallback": "skip"}, "fallback must be"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlaxGram(nn.Dense(2), cross_entropy, **kwargs)


def test_non_flax_model_raises():
    with pytest.raises(TypeError, match="must be a flax.linen.Module"):
        FlaxGram(lambda x: x, cross_entropy)


def test_old_spellings_warn_and_keep_working(token_problem):
    """``dense_form=`` is ``strategy=``; ``report`` read as a dict is ``report()``."""
    model, variables, ids, y = token_problem
    with pytest.warns(DeprecationWarning, match=r"dense_form=.*strategy="):
        old = FlaxGram(model, cross_entropy, dense_form="materialised")
    new = FlaxGram(model, cross_entropy, strategy="materialize")
    np.testing.assert_array_equal(np.asarray(old(variables, ids, y)[2]), np.asarray(new(variables, ids, y)[2]))
    with pytest.warns(DeprecationWarning, match=r"call FlaxGram.report\(\)"):
        assert old.report["Dense_0"] == "dense: materialised (T=6)"
    assert new.report().paths()["Dense_0"] == "materialize"


def test_keep_blocks_jitted_result_feeds_the_tracker(token_problem):
    """Blocks per module, summing to G exactly, as a jitted output; result() on the host."""
    import fimcore

    model, variables, ids, y = token_problem
    step = FlaxGram(model, cross_entropy, keep_blocks=True)
    loss, grad, gram, blocks = jax.jit(step)(variables, ids, y)
    assert sorted(blocks) == sorted(r.name for r in step.report())
    total = sum(np.asarray(b) for b in blocks.values())
    np.testing.assert_allclose(total, np.asarray(gram), rtol=1e-14, atol=1e-14 * np.abs(total).max())
    ref_gram = loop_reference(model, variables, ids, y)[2]
    np.testing.assert_allclose(np.asarray(gram), ref_gram, rtol=1e-10, atol=1e-12 * np.abs(ref_gram).max())
    result = step.result(gram, blocks)
    assert result.batch_size == ids.shape[0] and result.grad_dtype == jnp.float64
    assert result.num_params == sum(np.size(v) for v in jax.tree_util.tree_leaves(variables["params"]))
    assert sum(r.trace for r in result.report) == pytest.approx(float(jnp.trace(gram)), rel=1e-12)
    m = fimcore.MeasureTracker().update(result, lr=0.1)
    assert m.c_k == pytest.approx(fimcore.MeasureTracker().update(np.asarray(gram), lr=0.1).c_k, rel=1e-9)


def test_params_selects_the_columns_of_J(token_problem):
    """Only the named modules' columns enter G (the loop's J restricted to them); every
    parameter still gets its batch gradient."""
    model, variables, ids, y = token_problem
    _, ref_grad, _ = loop_reference(model, variables, ids, y)
    rows = []
    for i in range(ids.shape[0]):
        g = jax.grad(lambda p: cross_entropy(model.apply({"params": p}, ids[i:i + 1]), y[i:i + 1])[0])(
            variables["params"])
        rows.append(np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(
            {k: g[k] for k in ("Dense_0", "Embed_0")})]))
    J = np.stack(rows)
    step = FlaxGram(model, cross_entropy, params=["Dense_0", "Embed_0"], keep_blocks=True)
    _, grad, gram, blocks = step(variables, ids, y)
    np.testing.assert_allclose(np.asarray(gram), J @ J.T, rtol=1e-10, atol=1e-12 * np.abs(J @ J.T).max())
    np.testing.assert_allclose(flat(grad), ref_grad, rtol=1e-10, atol=1e-13)
    assert sorted(blocks) == ["Dense_0", "Embed_0"] == sorted(step.report().paths())
    assert step.result(gram, blocks).num_params == J.shape[1]
    with pytest.raises(ValueError, match=r"params names no parameterised module.*\['nope'\]"):
        FlaxGram(model, cross_entropy, params=["nope"])(variables, ids, y)
    with pytest.raises(TypeError, match="params must be None or module paths"):
        FlaxGram(model, cross_entropy, params=[3])
