"""``FlaxGram`` norm paths against references that share no code with the adapter, in float64
and on JAX's default float32 path (``jax_enable_x64`` off).

References:
* BatchNorm (train mode) after a convolution: every parameter gets one copy per sample, used
  only where that sample's rows of its layer are formed (batch statistics stay shared), and
  row i of J is ``B·∂L/∂θ_i`` at θ_i = θ (sample i's contribution to the batch gradient);
* InstanceNorm, embeddings, dense layers at T positions: a float64 loop of ``jax.grad`` of one
  example's loss.

float32: the suite switches x64 on globally; these tests run inside ``jax.enable_x64(False)``, the
state of a default JAX process (float32 arrays, a float32 Gram), and compare with the float64
reference on the same float32-rounded weights and inputs within a bound derived from the shapes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fimcore_adapters.jax import FlaxGram
from tests.adapters.test_jax_flax import cross_entropy, flat, loop_reference, numpy_init
from tests.core.helpers import gamma

BN_EPS = 1e-5

def reasons(step):
    """``{module path: how its rows were formed}`` from ``step.report()``."""
    return {r.name: r.reason for r in step.report()}



class ConvBN(nn.Module):
    """Conv → BatchNorm (batch statistics over N, H, W in train mode) → relu → mean → Dense."""

    dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.dtype)
        h = nn.Conv(4, (3, 3), padding="SAME", **kw)(x)
        h = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=BN_EPS, **kw)(h)
        return nn.Dense(3, **kw)(nn.relu(h).mean(axis=(1, 2)))


def conv_bn_contribution_gram(params, x, y):
    """(G, mean gradient) of ``ConvBN`` from per-sample parameter copies (float64, by hand)."""
    n = x.shape[0]
    copies = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (n,) + v.shape), params)

    def conv(x_i, kernel):
        return lax.conv_general_dilated(x_i[None], kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]

    def batch_loss(c):
        h = jax.vmap(conv)(x, c["Conv_0"]["kernel"]) + c["Conv_0"]["bias"][:, None, None, :]
        mean = h.mean(axis=(0, 1, 2))
        var = ((h - mean) ** 2).mean(axis=(0, 1, 2))
        bn = c["BatchNorm_0"]
        h = (h - mean) / jnp.sqrt(var + BN_EPS) * bn["scale"][:, None, None, :] + bn["bias"][:, None, None, :]
        pooled = jax.nn.relu(h).mean(axis=(1, 2))
        out = jnp.einsum("bi,bio->bo", pooled, c["Dense_0"]["kernel"]) + c["Dense_0"]["bias"]
        return jnp.mean(cross_entropy(out, y))

    g = jax.jit(jax.grad(batch_loss))(copies)
    J = n * np.concatenate([np.asarray(v).reshape(n, -1) for v in jax.tree_util.tree_leaves(g)], axis=1)
    return J @ J.T, J.sum(0) / n


class ConvInstanceNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3), strides=2, padding="SAME", param_dtype=jnp.float64)(x)
        h = nn.InstanceNorm(param_dtype=jnp.float64)(h)
        return nn.Dense(3, param_dtype=jnp.float64)(nn.relu(h).mean(axis=(1, 2)))


class Tokens(nn.Module):
    """Embed → Dense at T positions → RMSNorm → mean over positions → Dense."""

    dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, ids):
        kw = dict(dtype=self.dtype, param_dtype=self.dtype)
        h = nn.Embed(11, 6, **kw)(ids)
        h = nn.RMSNorm(**kw)(jnp.tanh(nn.Dense(5, **kw)(h)))
        return nn.Dense(3, **kw)(h.mean(axis=1))


def assert_gram_close(gram, ref, rtol=1e-10):
    np.testing.assert_allclose(np.asarray(gram), ref, rtol=rtol, atol=1e-12 * np.abs(ref).max())


# --- float64 -----------------------------------------------------------------------------


def test_batchnorm_after_conv_rows_are_batch_contributions():
    model, n = ConvBN(), 6
    x = jnp.asarray(np.random.default_rng(11).normal(size=(n, 6, 6, 2)))
    y = jnp.arange(n) % 3
    variables = numpy_init(model, x)
    step = FlaxGram(model, cross_entropy, mutable=["batch_stats"])
    _, grad, gram, _ = jax.jit(step)(variables, x, y)
    ref_gram, ref_grad = conv_bn_contribution_gram(variables["params"], x, y)
    assert_gram_close(gram, ref_gram)
    np.testing.assert_allclose(flat(grad), ref_grad, rtol=1e-10, atol=1e-13)
    assert reasons(step)["BatchNorm_0"] == "norm: per-sample affine"
    assert reasons(step)["Conv_0"].startswith("conv: materialised")


def test_instance_norm_after_conv_matches_loop():
    model = ConvInstanceNorm()
    x = jnp.asarray(np.random.default_rng(12).normal(size=(5, 7, 6, 3)))
    y = jnp.arange(5) % 3
    variables = numpy_init(model, x)
    step = FlaxGram(model, cross_entropy)
    loss, grad, gram = jax.jit(step)(variables, x, y)
    ref_loss, ref_grad, ref_gram = loop_reference(model, variables, x, y)
    assert_gram_close(gram, ref_gram)
    np.testing.assert_allclose(flat(grad), ref_grad, rtol=1e-10, atol=1e-13)
    assert reasons(step)["InstanceNorm_0"] == "norm: per-sample affine"


# --- float32, x64 off --------------------------------------------------------------------


def float32_bounds(contraction_lengths, n_params, batch):
    """``(γ_G, γ_g)`` with ``|Ĝ_ij − G_ij| ≤ γ_G·sqrt(G_ii G_jj)``, ``‖ĝ − g‖ ≤ γ_g·mean_i ‖J_i‖``.

    Each float32 row ``Ĵ_i`` comes from a chain of sums whose lengths ``n_l`` are the
    contraction lengths of the forward and backward (fan-ins, positions, batch statistics); a
    sum of n terms carries a relative error of at most ``γ_n = n·u/(1 − n·u)`` (u = 2⁻²⁴),
    so (for well-conditioned activations) ``‖Ĵ_i − J_i‖ ≤ ρ‖J_i‖`` with ``ρ = Σ_l γ_{n_l}``. A Gram entry is a dot
    product of length ≤ P: ``|Ĝ_ij − G_ij| ≤ (2ρ + ρ² + γ_P)‖J_i‖‖J_j‖`` and
    ``‖J_i‖‖J_j‖ = sqrt(G_ii G_jj)``. The mean gradient ``g = (1/B)Σ_i J_i`` is a sum of B
    rows: ``‖ĝ − g‖ ≤ (ρ + γ_B)(1 + ρ)·mean_i ‖J_i‖``.
    """
    rho = sum(gamma(n) for n in contraction_lengths)
    return 2 * rho + rho * rho + gamma(n_params), (rho + gamma(batch)) * (1 + rho)


def assert_within_bounds(gram32, grad32, gram64, grad64, bounds):
    gram_bound, grad_bound = bounds
    assert gram_bound < 1e-4  # not vacuous
    d = np.sqrt(np.diag(gram64))
    assert float(np.max(np.abs(np.asarray(gram32, np.float64) - gram64) / np.outer(d, d))) <= gram_bound
    assert float(np.linalg.norm(flat(grad32) - grad64)) <= grad_bound * float(np.mean(d))


def run_float32(model32, inputs, y, **options):
    """Variables (float32) and the FlaxGram outputs of ``model32`` in a default (x64 off) JAX."""
    with jax.enable_x64(False):
        assert not jax.config.jax_enable_x64
        inputs = jnp.asarray(inputs)
        variables = numpy_init(model32, inputs)
        assert {v.dtype for v in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
        out = jax.jit(FlaxGram(model32, cross_entropy, **options))(variables, inputs, jnp.asarray(y))
        assert out[2].dtype == jnp.float32  # the default accumulation without x64
        return (jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), variables),
                [jax.tree_util.tree_map(np.asarray, o) for o in out])


def test_float32_conv_batchnorm_within_the_derived_bound():
    n = 6
    x = np.random.default_rng(13).normal(size=(n, 6, 6, 2)).astype(np.float32)
    y = np.arange(n) % 3
    variables, (_, grad, gram, _) = run_float32(ConvBN(jnp.float32), x, y, mutable=["batch_stats"])
    ref_gram, ref_grad = conv_bn_contribution_gram(variables["params"], jnp.asarray(x, jnp.float64), y)
    # conv fan-in 3·3·2, kernel gradient over 6·6 positions, batch statistics over 6·6·6 (forward
    # and backward), the pooling mean over 6·6, dense fan-in 4 and fan-out 3, softmax over 3 classes
    bounds = float32_bounds([18, 36, 216, 216, 36, 4, 3, 3], ref_grad.size, n)
    assert_within_bounds(gram, grad, ref_gram, ref_grad, bounds)


def test_float32_embedding_dense_rmsnorm_within_the_derived_bound():
    ids = np.random.default_rng(14).integers(0, 11, size=(5, 4))
    y = np.arange(5) % 3
    variables, (_, grad, gram) = run_float32(Tokens(jnp.float32), ids, y)
    ref_loss, ref_grad, ref_gram = loop_reference(Tokens(), variables, jnp.asarray(ids), jnp.asarray(y))
    # dense fan-in 6 / fan-out 5 at 4 positions, RMS over 5 features, mean over 4 positions,
    # dense fan-in 5 / fan-out 3, softmax over 3 classes, embedding gradient summed over 4 positions
    bounds = float32_bounds([6, 5, 4, 5, 4, 5, 3, 3, 4], ref_grad.size, len(y))
    assert_within_bounds(gram, grad, ref_gram, ref_grad, bounds)
