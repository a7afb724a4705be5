"""JAX adapter, Flax path: user-written layer rules (``register_layer_rule``).

A custom module ``y = s·(x W + b)`` with a learnable scalar s gets a rule written here; the Gram
and the mean gradient ``FlaxGram`` gives with it equal a float64 loop of ``jax.grad`` of one
example's loss (no code shared with the adapter), and the report names the rule. Bad
registrations fail with clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import import_backend

jax = import_backend("jax")
nn = import_backend("flax").linen
jnp = jax.numpy

from fimcore_adapters.jax import FlaxGram, LayerRule, register_layer_rule  # noqa: E402


def scaled_dense_type():
    """A fresh module type per test (the registry is global)."""

    class ScaledDense(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                           jnp.float64)
            b = self.param("bias", nn.initializers.normal(1.0), (self.features,), jnp.float64)
            s = self.param("scale", nn.initializers.constant(1.7), (), jnp.float64)
            return s * (x @ w + b)

    return ScaledDense


class ScaledDenseRule(LayerRule):
    """dℓ_i/dW = s·Σ_t x_itᵀ δ_it, dℓ_i/db = s·Σ_t δ_it, dℓ_i/ds = Σ_t δ_it·(x_it W + b)."""

    name = "scaled-dense"

    def forward(self, module, call, args, kwargs):
        return call(*args, **kwargs), {"x": args[0]}

    def per_sample(self, module, capture, deltas):
        p = module.variables["params"]
        (d,) = deltas
        B = d.shape[0]
        x = capture["x"].reshape(B, -1, capture["x"].shape[-1])
        d = d.reshape(B, -1, d.shape[-1])
        z = x @ p["kernel"] + p["bias"]
        s = p["scale"]
        return {"kernel": s * jnp.einsum("bti,bto->bio", x, d), "bias": s * d.sum(1),
                "scale": (d * z).sum((1, 2))}


def mse(out, y):
    return jnp.mean((out - y) ** 2, axis=tuple(range(1, out.ndim)))


def loop_reference(model, params, x, y):
    """float64 loop: jax.grad of one example's loss, rows stacked into J."""
    rows = []
    for i in range(x.shape[0]):
        g = jax.grad(lambda q: mse(model.apply({"params": q}, x[i:i + 1]), y[i:i + 1])[0])(params)
        rows.append(np.concatenate([np.asarray(g[k1][k2]).ravel()
                                    for k1 in sorted(g) for k2 in sorted(g[k1])]))
    J = np.stack(rows)
    return J @ J.T, J.mean(0)


class Net(nn.Module):
    layer: type

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, param_dtype=jnp.float64, name="head")(jnp.tanh(self.layer(4, name="body")(x)))


@pytest.mark.parametrize("shape", [(6, 3), (5, 4, 3)], ids=["BxD", "BxTxD"])
def test_registered_rule_gives_the_loop_gram_and_is_reported(shape):
    ScaledDense = scaled_dense_type()
    register_layer_rule(ScaledDense, ScaledDenseRule())
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape))
    y = jnp.asarray(rng.normal(size=shape[:-1] + (2,)))
    model = Net(ScaledDense)
    variables = model.init(jax.random.PRNGKey(0), x)
    step = FlaxGram(model, mse, keep_blocks=True)
    loss, grad, gram, blocks = step(variables, x, y)
    G_ref, g_ref = loop_reference(model, variables["params"], x, y)
    np.testing.assert_allclose(np.asarray(gram), G_ref, rtol=1e-10, atol=1e-12)
    flat = np.concatenate([np.asarray(grad[k1][k2]).ravel() for k1 in sorted(grad) for k2 in sorted(grad[k1])])
    np.testing.assert_allclose(flat, g_ref, rtol=1e-10, atol=1e-12)
    rows = {r.name: r for r in step.report()}
    assert rows["body"].module == "ScaledDense" and rows["body"].path == "materialize"
    assert rows["body"].reason.startswith("scaled-dense rule") and rows["body"].params == 4 * 3 + 4 + 1
    assert "scaled-dense" not in rows["head"].reason
    # the custom module's block is J_body J_bodyᵀ over its own parameter columns only
    n_body = 3 * 4 + 4 + 1
    J = []
    for i in range(x.shape[0]):
        g = jax.grad(lambda q: mse(model.apply({"params": q}, x[i:i + 1]), y[i:i + 1])[0])(variables["params"])
        J.append(np.concatenate([np.asarray(g["body"][k]).ravel() for k in sorted(g["body"])]))
    J = np.stack(J)
    assert J.shape[1] == n_body
    np.testing.assert_allclose(np.asarray(blocks["body"]), J @ J.T, rtol=1e-10, atol=1e-12)


def test_decorator_form_and_the_generic_strategy():
    ScaledDense = scaled_dense_type()

    @register_layer_rule(ScaledDense)
    class Rule(ScaledDenseRule):
        name = "decorated"

    rng = np.random.default_rng(1)
    x, y = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(4, 2)))
    model = Net(ScaledDense)
    variables = model.init(jax.random.PRNGKey(1), x)
    grams = {}
    for strategy in ("auto", {"body": "generic"}):
        step = FlaxGram(model, mse, strategy=strategy)
        grams[str(strategy)] = np.asarray(step(variables, x, y)[2])
        reason = {r.name: r.reason for r in step.report()}["body"]
        assert reason.startswith("decorated rule") == (strategy == "auto"), reason
    np.testing.assert_allclose(grams["auto"], grams[str({"body": "generic"})], rtol=1e-10, atol=1e-12)


def test_bad_registrations_are_refused():
    ScaledDense = scaled_dense_type()
    with pytest.raises(TypeError, match="flax.linen.Module subclass; received 3"):
        register_layer_rule(3, ScaledDenseRule())
    with pytest.raises(TypeError, match="LayerRule instance or subclass; received"):
        register_layer_rule(ScaledDense, object())
    register_layer_rule(ScaledDense, ScaledDenseRule())
    with pytest.raises(ValueError, match="ScaledDense already has the rule 'scaled-dense'; pass override=True"):
        register_layer_rule(ScaledDense, ScaledDenseRule())
    with pytest.raises(ValueError, match="Dense already has a built-in rule; pass override=True"):
        register_layer_rule(nn.Dense, ScaledDenseRule())

    class Other(ScaledDenseRule):
        name = "other"

    register_layer_rule(ScaledDense, Other(), override=True)
    x = jnp.ones((3, 2))
    step = FlaxGram(ScaledDense(2), lambda out: jnp.sum(out, axis=1))
    step(ScaledDense(2).init(jax.random.PRNGKey(0), x), x)
    assert step.report()[0].reason.startswith("other rule")


def test_rule_missing_a_parameter_is_named():
    ScaledDense = scaled_dense_type()

    class Short(ScaledDenseRule):
        name = "short"

        def per_sample(self, module, capture, deltas):
            out = super().per_sample(module, capture, deltas)
            del out["scale"]
            return out

    register_layer_rule(ScaledDense, Short())
    x = jnp.ones((3, 2))
    step = FlaxGram(ScaledDense(2), lambda out: jnp.sum(out, axis=1))
    with pytest.raises(ValueError, match=r"rule 'short' .* exactly the parameters the module owns, "
                                         r"\['bias', 'kernel', 'scale'\]; received \['bias', 'kernel'\]"):
        step(ScaledDense(2).init(jax.random.PRNGKey(0), x), x)
