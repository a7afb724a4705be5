"""fimcore_adapters.jax.diagonal_fisher: against the PyTorch adapter on shared NumPy weights, and
against jax.hessian / jax.grad of the log-likelihood per input (float64 references)."""

from __future__ import annotations

import numpy as np
import pytest

import flax.linen as nn
import jax
import torch
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from fimcore_adapters.jax import diagonal_fisher as jax_fisher  # noqa: E402
from fimcore_adapters.torch import diagonal_fisher as torch_fisher  # noqa: E402


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.sigmoid(nn.Dense(5)(x))
        x = nn.tanh(nn.Dense(4)(x))
        return nn.Dense(3)(x)


class CNN(nn.Module):                      # NHWC; flattened in torch's (C, H, W) order
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(2, (3, 3), padding="VALID")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


def torch_mlp():
    tn = torch.nn
    return tn.Sequential(tn.Linear(4, 5), tn.Sigmoid(), tn.Linear(5, 4), tn.Tanh(),
                         tn.Linear(4, 3)).double()


def torch_cnn():
    tn = torch.nn
    return tn.Sequential(tn.Conv2d(1, 2, 3), tn.Tanh(), tn.AvgPool2d(2), tn.Flatten(),
                         tn.Linear(8, 3)).double()


def shared_case(kind, seed=0):
    """A flax model, its variables and inputs, and the torch model with the same NumPy weights."""
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        x = rng.normal(size=(4, 4))
        model, tmodel, xt, xj = MLP(), torch_mlp(), x, x
        pairs = [("Dense_0", "0"), ("Dense_1", "2"), ("Dense_2", "4")]
    else:
        x = rng.normal(size=(4, 1, 6, 6))
        model, tmodel, xt, xj = CNN(), torch_cnn(), x, np.transpose(x, (0, 2, 3, 1))
        pairs = [("Conv_0", "0"), ("Dense_0", "4")]
    params = {}
    for flax_name, torch_name in pairs:
        layer = tmodel[int(torch_name)]
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.as_tensor(rng.normal(size=tuple(p.shape)) * 0.8))
        weight = layer.weight.detach().numpy()
        kernel = weight.T if weight.ndim == 2 else np.transpose(weight, (2, 3, 1, 0))
        params[flax_name] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(layer.bias.detach().numpy())}
    return model, {"params": params}, jnp.asarray(xj), tmodel, torch.as_tensor(xt), pairs


def to_torch_layout(jax_dict, pairs):
    out = {}
    for flax_name, torch_name in pairs:
        k = np.asarray(jax_dict[f"{flax_name}/kernel"])
        out[f"{torch_name}.weight"] = k.T if k.ndim == 2 else np.transpose(k, (3, 2, 0, 1))
        out[f"{torch_name}.bias"] = np.asarray(jax_dict[f"{flax_name}/bias"])
    return out


@pytest.mark.parametrize("kind, likelihood", [("mlp", "categorical"), ("cnn", "gaussian")])
def test_jax_matches_torch_on_shared_weights(kind, likelihood):
    model, variables, xj, tmodel, xt, pairs = shared_case(kind)
    out = np.asarray(model.apply(variables, xj))
    np.testing.assert_allclose(out, tmodel(xt).detach().numpy(), rtol=1e-12, atol=1e-12)
    rng = np.random.default_rng(1)
    labels = (rng.integers(0, 3, size=(4, 2)) if likelihood == "categorical"
              else out[:, None, :] + rng.normal(size=(4, 2, 3)))
    for est in ("exact", "i1", "i2", "empirical"):
        kw = {} if est == "exact" else {"targets" if est == "empirical" else "labels": labels}
        if est == "empirical":
            kw["targets"] = labels[:, 0]
        got = jax_fisher(model, variables, xj, likelihood=likelihood, estimator=est,
                         variance=True, **kw)
        ref = torch_fisher(tmodel, xt, likelihood=likelihood, estimator=est, variance=True,
                           **{k: torch.as_tensor(v) for k, v in kw.items()})
        fields = [(got.values, ref.values)]
        if est in ("i1", "i2"):
            fields += [(got.variance, ref.variance), (got.bounds.lower, ref.bounds.lower),
                       (got.bounds.upper, ref.bounds.upper)]
        else:
            assert got.variance is None and ref.variance is None
        for g, r in fields:
            g = to_torch_layout(g, pairs)
            for name in r:
                np.testing.assert_allclose(g[name], r[name].numpy(), rtol=1e-9, atol=1e-13,
                                           err_msg=f"{est} {name}")


def test_i2_against_jax_hessian_per_input():
    model, variables, x, *_ = shared_case("cnn", seed=3)
    y = jnp.array([0, 2, 1, 1])
    flat, unravel = ravel_pytree(variables["params"])

    def nll(theta, xi, yi):
        logits = model.apply({"params": unravel(theta)}, xi[None])[0]
        return -jax.nn.log_softmax(logits)[yi]

    per_input = jax.jit(jax.vmap(lambda xi, yi: (jnp.diagonal(jax.hessian(nll)(flat, xi, yi)),
                                                  jax.grad(nll)(flat, xi, yi))))
    hess_diag, grads = per_input(x, y)
    r2 = jax_fisher(model, variables, x, estimator="i2", labels=y)
    r1 = jax_fisher(model, variables, x, estimator="i1", labels=y)
    for got, ref in ((r2, jnp.mean(hess_diag, 0)), (r1, jnp.mean(grads ** 2, 0))):
        tree = jax.tree_util.tree_map(lambda a: a, variables["params"])
        flat_got = ravel_pytree({k: {kk: got.values[f"{k}/{kk}"] for kk in v}
                                 for k, v in tree.items()})[0]
        np.testing.assert_allclose(flat_got, ref, rtol=1e-9, atol=1e-13)


class WithNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm()(nn.Dense(3)(x))


def test_refusals_and_bad_input():
    x = jnp.ones((2, 4))
    variables = WithNorm().init(jax.random.key(0), x)
    with pytest.raises(NotImplementedError, match=r"'LayerNorm_0' \(LayerNorm\)"):
        jax_fisher(WithNorm(), variables, x, estimator="i2", generator=jax.random.key(1))
    model, variables, x, *_ = shared_case("mlp")
    with pytest.raises(ValueError, match="mc_samples must be >= 1"):
        jax_fisher(model, variables, x, mc_samples=0, generator=jax.random.key(1))
    with pytest.raises(ValueError, match="needs generator="):
        jax_fisher(model, variables, x)
    bad = jax.tree_util.tree_map(lambda a: a * jnp.nan, variables)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        jax_fisher(model, bad, x, estimator="exact")
