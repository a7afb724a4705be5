"""``FlaxGram`` on parameterised modules it has no rule for, including modules that couple samples.

Reference (float64, no code shared with the adapter): every parameter gets one copy per sample,
the copy θ_j is used only where output row j of its layer is formed (the coupling module still
sees the whole batch), and row j of J is ``B·∂L/∂θ_j`` at θ_j = θ: sample j's contribution to the
batch gradient, exactly the rows of BatchNorm in train mode. The mean gradient is also checked
against ``jax.grad`` of the batch loss, and ``1ᵀG1 = B²‖∇L‖²``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fimcore_adapters.jax import FlaxGram

B, D_IN, D_HID, CLASSES = 6, 4, 5, 3
EPS = 1e-5

def reasons(step):
    """``{module path: how its rows were formed}`` from ``step.report()``."""
    return {r.name: r.reason for r in step.report()}



def cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


# the coupling modules' formulas, written once as plain functions of (their parameters, batch)
def centred(p, h):
    u = h * p["s"]
    return u - u.mean(0)


def batch_softmax(p, h):
    return jax.nn.softmax(h * p["w"], axis=0) * h.shape[0]


def hand_batchnorm(p, h):
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    return (h - mean) / jnp.sqrt(var + EPS) * p["scale"] + p["bias"]


def gated_mean(p, h):  # with a = 0 the output equals the per-sample output; the gradient does not
    return h * p["s"] + p["a"] * h.mean(0)


def row_bias(p, h):  # one parameter row per sample: the module cannot be re-run on one sample
    return h + p["b"]


def affine(p, h):  # separable
    return h * p["s"] + p["t"]


FORMULAS = {"centred": (centred, ("s",)), "batch_softmax": (batch_softmax, ("w",)),
            "hand_batchnorm": (hand_batchnorm, ("scale", "bias")), "gated_mean": (gated_mean, ("s", "a")),
            "row_bias": (row_bias, ("b",)), "affine": (affine, ("s", "t"))}


class Custom(nn.Module):
    """An unrecognised module with its own parameters, computing ``FORMULAS[kind]``."""

    kind: str

    @nn.compact
    def __call__(self, h):
        fn, names = FORMULAS[self.kind]
        p = {}
        for k, name in enumerate(names):
            init = nn.initializers.zeros if (self.kind, name) == ("gated_mean", "a") else (
                lambda key, shape, dtype, k=k: 1.0 + 0.3 * jax.random.normal(key, shape, dtype))
            shape = h.shape if self.kind == "row_bias" else (h.shape[-1],)
            p[name] = self.param(name, init, shape, jnp.float64)
        return fn(p, h)


COUPLED = ("centred", "batch_softmax", "hand_batchnorm", "gated_mean")


class Net(nn.Module):
    """Dense, then the custom modules ``kinds`` in turn (named custom_0, custom_1, ...), tanh, Dense."""

    kinds: tuple

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D_HID, param_dtype=jnp.float64)(x)
        for k, kind in enumerate(self.kinds):
            h = Custom(kind, name=f"custom_{k}")(h)
        return nn.Dense(CLASSES, param_dtype=jnp.float64)(jnp.tanh(h))


def contribution_reference(kinds, params, x, y):
    """(G, mean gradient) from per-sample parameter copies (see the module docstring)."""
    n = x.shape[0]
    copies = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), params)

    def batch_loss(c):
        h = jnp.einsum("bi,bio->bo", x, c["Dense_0"]["kernel"]) + c["Dense_0"]["bias"]
        for k, kind in enumerate(kinds):
            fn = FORMULAS[kind][0]
            h = jax.vmap(lambda p_j, j, fn=fn, h=h: fn(p_j, h)[j])(c[f"custom_{k}"], jnp.arange(n))
        out = jnp.einsum("bi,bio->bo", jnp.tanh(h), c["Dense_1"]["kernel"]) + c["Dense_1"]["bias"]
        return jnp.mean(cross_entropy(out, y))

    g = jax.jit(jax.grad(batch_loss))(copies)
    J = n * np.concatenate([np.asarray(v).reshape(n, -1) for v in jax.tree_util.tree_leaves(g)], axis=1)
    return J @ J.T, J.sum(0) / n


def flat(tree):
    return np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(tree)])


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(7)
    return jnp.asarray(rng.normal(size=(B, D_IN))), jnp.asarray(rng.integers(0, CLASSES, size=B))


def check_against_references(model, variables, x, y, loss, grad, gram):
    ref_gram, ref_grad = contribution_reference(model.kinds, variables["params"], x, y)
    scale = np.abs(ref_gram).max()
    np.testing.assert_allclose(np.asarray(gram), ref_gram, rtol=1e-10, atol=1e-12 * scale)
    np.testing.assert_allclose(flat(grad), ref_grad, rtol=1e-10, atol=1e-13)
    batch_loss = lambda p: jnp.mean(cross_entropy(model.apply({"params": p}, x), y))  # noqa: E731
    ref_loss, batch_grad = jax.jit(jax.value_and_grad(batch_loss))(variables["params"])
    np.testing.assert_allclose(flat(grad), flat(batch_grad), rtol=1e-10, atol=1e-14)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-13)
    assert float(jnp.sum(gram)) == pytest.approx(B * B * float(np.sum(flat(batch_grad) ** 2)), rel=1e-10)


def test_coupling_module_rows_are_batch_contributions(batch):
    x, y = batch
    model = Net(COUPLED + ("row_bias",))
    variables = model.init(jax.random.key(1), x)
    step = FlaxGram(model, cross_entropy)
    loss, grad, gram = jax.jit(step)(variables, x, y)
    check_against_references(model, variables, x, y, loss, grad, gram)
    for k, kind in enumerate(COUPLED):
        assert "checked at run time" in reasons(step)[f"custom_{k}"], kind
        # a per-sample re-run would give centred and batch_softmax a zero gradient
        assert np.abs(flat(grad[f"custom_{k}"])).max() > 1e-3, kind
    assert reasons(step)[f"custom_{len(COUPLED)}"].startswith(
        "fallback: masked batch VJP per sample (per-sample re-run failed")


def test_eager_call_reports_the_path_taken(batch):
    x, y = batch
    model = Net(("centred", "affine"))
    variables = model.init(jax.random.key(2), x)
    step = FlaxGram(model, cross_entropy)  # not jitted: the separability check is concrete
    check_against_references(model, variables, x, y, *step(variables, x, y))
    assert reasons(step)["custom_0"] == ("fallback: masked batch VJP per sample (the module couples samples; "
                                       "B × its backward)")
    assert reasons(step)["custom_1"] == "fallback: vmap per-sample VJP of the module (checked separable)"


def test_coupling_module_under_vmap_over_an_ensemble(batch):
    x, y = batch
    model = Net(("centred",))
    stacked = [model.init(jax.random.key(k), x) for k in (4, 5)]
    ensemble = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *stacked)
    grams = jax.jit(jax.vmap(lambda v: FlaxGram(model, cross_entropy)(v, x, y)[2]))(ensemble)
    for k, variables in enumerate(stacked):
        ref_gram, _ = contribution_reference(model.kinds, variables["params"], x, y)
        np.testing.assert_allclose(np.asarray(grams[k]), ref_gram, rtol=1e-10,
                                   atol=1e-12 * np.abs(ref_gram).max())


class WithTotal(nn.Module):
    @nn.compact
    def __call__(self, h):
        s = self.param("s", nn.initializers.ones, (h.shape[-1],), jnp.float64)
        return h * s, jnp.sum(h * s)


class TotalNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h, total = WithTotal(name="totals")(nn.Dense(D_HID, param_dtype=jnp.float64)(x))
        return nn.Dense(CLASSES, param_dtype=jnp.float64)(h) + total


def test_output_without_batch_axis_raises(batch):
    x, y = batch
    model = TotalNet()
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"module totals \(WithTotal\) returned an output of shape \(\)"):
        jax.jit(FlaxGram(model, cross_entropy))(variables, x, y)


class Noisy(nn.Module):
    @nn.compact
    def __call__(self, h):
        s = self.param("s", nn.initializers.ones, (h.shape[-1],), jnp.float64)
        return nn.Dropout(0.5, deterministic=False)(h * s)


class NoisyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(CLASSES, param_dtype=jnp.float64)(Noisy(name="noisy")(x))


def test_random_fallback_module_raises(batch):
    x, y = batch
    model = NoisyNet()
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    with pytest.raises(NotImplementedError, match=r"module noisy \(Noisy\) draws random numbers"):
        jax.jit(lambda v: FlaxGram(model, cross_entropy)(v, x, y, rngs={"dropout": jax.random.key(2)}))(variables)


class Counted(nn.Module):
    """Reads and updates its own state in one call: the re-run must start from the state before."""

    @nn.compact
    def __call__(self, h):
        s = self.param("s", nn.initializers.ones, (h.shape[-1],), jnp.float64)
        calls = self.variable("batch_stats", "calls", lambda: jnp.zeros((), jnp.float64))
        out = h * s * (1.0 + calls.value)
        if not self.is_initializing():
            calls.value = calls.value + 1.0
        return out


class CountedNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = Counted(name="counted")(nn.Dense(D_HID, param_dtype=jnp.float64)(x))
        return nn.Dense(CLASSES, param_dtype=jnp.float64)(h)


def test_stateful_fallback_module_is_re_run_from_its_state_before_the_call(batch):
    x, y = batch
    model = CountedNet()
    variables = model.init(jax.random.key(0), x)
    variables = {**variables, "batch_stats": {"counted": {"calls": jnp.asarray(2.0)}}}
    _, grad, gram, state = jax.jit(FlaxGram(model, cross_entropy, mutable=["batch_stats"]))(variables, x, y)
    assert float(state["batch_stats"]["counted"]["calls"]) == 3.0

    def one(p, x_i, y_i):  # per-sample loss from the same starting state
        out = model.apply({**variables, "params": p}, x_i[None], mutable=["batch_stats"])[0]
        return cross_entropy(out, y_i[None])[0]

    rows = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))(variables["params"], x, y)
    J = np.concatenate([np.asarray(v).reshape(B, -1) for v in jax.tree_util.tree_leaves(rows)], axis=1)
    np.testing.assert_allclose(np.asarray(gram), J @ J.T, rtol=1e-10, atol=1e-12 * np.abs(J @ J.T).max())
    np.testing.assert_allclose(flat(grad), J.mean(0), rtol=1e-10, atol=1e-14)
