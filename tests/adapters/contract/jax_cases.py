"""The adapter contract's model cases for JAX / Flax linen (see the package docstring).

The measured step is the jitted ``FlaxGram`` step with ``keep_blocks=True``; the plain step is
``jax.grad`` of the batch-mean loss of ``model.apply``. The float64 reference is written here and
shares nothing with the adapter: row i of J is B·∂L/∂θ_i, the gradient of the batch loss with
respect to a copy θ_i of the parameters that only sample i's computation uses. Where no layer
couples samples that is ∇ℓ_i, one ``jax.grad`` of sample i's loss (read off the whole-batch
forward) per sample; for BatchNorm in train mode (batch statistics) the network is written out
by hand with one parameter copy per sample and differentiated once.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax import lax

from fimcore_adapters.jax import FlaxGram
from tests.adapters.contract import CASES, ContractRun, NotApplicable  # noqa: F401

B = 6
#: the cases compile many small programs; XLA's backend optimisation level 0 compiles them
#: 2-3× faster (same operations, so the same float64 values to rounding)
_FAST_COMPILE = {"xla_backend_optimization_level": 0}
F64 = {"param_dtype": jnp.float64, "dtype": jnp.float64}


def xent(logits, y):
    """Per-example cross-entropy, written here (not the adapter's)."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


class _Scale(nn.Module):
    """A module the adapter has no rule for: it takes the exact re-run (generic) path."""

    n: int

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", lambda key: jnp.linspace(0.5, 1.5, self.n, dtype=jnp.float64))
        return jnp.tanh(x) * scale


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, **F64)(jnp.tanh(nn.Dense(7, **F64)(x)))


class _Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(3, (3, 3), padding=1, **F64)(x))
        h = nn.Conv(2, (2, 2), strides=2, padding="VALID", **F64)(h)
        return nn.Dense(3, **F64)(h.reshape(h.shape[0], -1))


class _NormTrain(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(3, (3, 3), padding="VALID", **F64)(x)
        h = nn.relu(nn.BatchNorm(use_running_average=False, **F64)(h))
        return nn.Dense(3, **F64)(h.reshape(h.shape[0], -1))


class _Embedding(nn.Module):
    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(9, 4, param_dtype=jnp.float64, dtype=jnp.float64)(ids)
        return nn.Dense(3, **F64)(e.reshape(e.shape[0], -1))


class _Tied(nn.Module):
    """Token embedding whose table is also the output projection (``attend``), and a layer
    applied twice."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(7, 4, param_dtype=jnp.float64, dtype=jnp.float64)
        mix = nn.Dense(4, **F64)
        h = jnp.tanh(mix(emb(ids).mean(1)))
        return emb.attend(jnp.tanh(mix(h)))


class _Generic(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, **F64)(_Scale(4)(nn.Dense(4, **F64)(x)))


_MODELS = {"dense": _Dense, "conv": _Conv, "norm_train": _NormTrain, "embedding": _Embedding,
           "tied": _Tied, "generic": _Generic}


def _case(case: str, rng: np.random.Generator):
    if case not in _MODELS:
        raise ValueError(f"unknown case {case!r}; cases are {CASES}")
    if case in ("dense", "generic"):
        x = rng.normal(size=(B, 5))
    elif case in ("conv", "norm_train"):
        x = rng.normal(size=(B, 6, 6, 2))
    else:
        x = rng.integers(0, 9 if case == "embedding" else 7, (B, 5))
    y = rng.integers(0, 7 if case == "tied" else 3, B)
    model = _MODELS[case]()
    return model, _numpy_init(model, jnp.asarray(x), rng), jnp.asarray(x), jnp.asarray(y)


def _numpy_init(model, x, rng):
    """Variables drawn with NumPy (shapes from ``jax.eval_shape``: no compilation of ``init``);
    norm scales around 1, running statistics (0, 1)."""
    shapes = jax.eval_shape(lambda a: model.init(jax.random.key(0), a), x)

    def draw(path, leaf):
        name = str(path[-1])
        if "var" in name or "mean" in name:
            return jnp.full(leaf.shape, 1.0 if "var" in name else 0.0, leaf.dtype)
        scale = 1.0 / np.sqrt(max(1, np.prod(leaf.shape[:-1])))
        base = 1.0 if "scale" in name else 0.0
        return jnp.asarray(base + scale * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _jit_run(fn, *args):
    """``jax.jit(fn)(*args)``, compiled with :data:`_FAST_COMPILE`."""
    return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(tree)])


def _apply(model, variables, params, x):
    out = model.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return out[0] if isinstance(out, tuple) else out


def _reference(model, variables, x, y) -> np.ndarray:
    def loss_i(p, i):
        return xent(_apply(model, variables, p, x), y)[i]         # whole-batch forward each time

    # one gradient call per sample (a loop over i inside one compiled function)
    rows = _jit_run(lambda p: lax.map(lambda i: jax.flatten_util.ravel_pytree(
        jax.grad(loss_i)(p, i))[0], jnp.arange(B)), variables["params"])
    J = np.asarray(rows)                                        # row i = B · ∂(ℓ_i / B)/∂θ
    return J @ J.T


def _reference_norm_train(model, variables, x, y) -> np.ndarray:
    """Conv → BatchNorm (batch statistics, biased variance) → ReLU → Dense written out by hand
    with one copy of every parameter per sample; row i = B·∂L/∂(sample i's copies)."""
    p = variables["params"]
    copies = jax.tree_util.tree_map(lambda v: jnp.stack([v] * B), p)

    def batch_loss(c):
        def conv(x_i, kernel_i, bias_i):                        # sample i with its own copy
            return lax.conv_general_dilated(x_i[None], kernel_i, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))[0] + bias_i

        h = jax.vmap(conv)(x, c["Conv_0"]["kernel"], c["Conv_0"]["bias"])
        mean = h.mean(axis=(0, 1, 2))
        var = ((h - mean) ** 2).mean(axis=(0, 1, 2))             # batch statistics, biased
        xhat = (h - mean) / jnp.sqrt(var + 1e-5)                 # Flax BatchNorm's epsilon
        z = jax.nn.relu(xhat * c["BatchNorm_0"]["scale"][:, None, None, :]
                        + c["BatchNorm_0"]["bias"][:, None, None, :]).reshape(B, -1)
        out = jnp.einsum("bi,bio->bo", z, c["Dense_0"]["kernel"]) + c["Dense_0"]["bias"]
        return jnp.mean(xent(out, y))

    grads = _jit_run(jax.grad(batch_loss), copies)
    J = B * np.concatenate([np.asarray(v).reshape(B, -1) for v in jax.tree_util.tree_leaves(grads)], axis=1)
    return J @ J.T


@functools.lru_cache(maxsize=None)
def _prepared(case: str):
    """Model, batch, reference Gram and plain gradient of a case (shared by its strategies)."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError("the JAX contract cases need jax_enable_x64 (tests/conftest.py sets it)")
    model, variables, x, y = _case(case, np.random.default_rng(CASES.index(case) + 11))
    reference = (_reference_norm_train if case == "norm_train" else _reference)(model, variables, x, y)
    plain = _jit_run(jax.grad(lambda p: jnp.mean(xent(_apply(model, variables, p, x), y))), variables["params"])
    return model, variables, x, y, reference, _flat(plain)


def run(case: str, strategy: str) -> ContractRun:
    model, variables, x, y, reference, plain = _prepared(case)
    mutable = ["batch_stats"] if "batch_stats" in variables else False
    step = FlaxGram(model, xent, strategy=strategy, keep_blocks=True, mutable=mutable)
    out = _jit_run(step, variables, x, y)                       # the jitted measured step
    grad, gram, blocks = out[1], out[2], out[-1]
    result = step.result(gram, blocks)
    return ContractRun(
        gram=np.asarray(result.gram, dtype=np.float64), gram_dtype=str(result.gram.dtype),
        blocks={k: np.asarray(v) for k, v in result.blocks.items()}, grad=_flat(grad),
        plain_grad=plain, reference_gram=reference, batch_size=B,
        loss_reduction="mean", report_paths=result.report.paths())
