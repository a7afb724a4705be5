"""The JAX adapter under a data-parallel ``jax.sharding`` mesh (4 CPU host devices).

The test process has already imported JAX with one device, so the checks run in a subprocess
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``. There, in float64, with the
batch sharded over a ``"data"`` axis and the parameters replicated:

* ``value_grad_and_gram`` and ``FlaxGram`` under ``jax.jit`` with ``NamedSharding`` inputs
  return the Gram of the GLOBAL batch (rows in global order) and the unsharded gradient, equal to
  the single-device result of the same batch and to a float64 per-sample loop written in the
  script below (≤ 1e-12 relative to the largest entry), for an MLP and a small CNN, also with
  ``chunk_size``/``memory_budget`` and the sampled-label Fisher;
* ``FlaxGram`` with BatchNorm in train mode: the rows are the per-sample gradients of the loss of
  sample i through the full-batch forward (a loop over i of ``∇_θ ℓ_i(f(θ, X))``), and the
  updated batch statistics equal the unsharded (global) ones, not one shard's;
* ``value_grad_and_gram(..., axis_name="data")`` inside ``jax.shard_map``: the same global Gram
  on every device;
* the partitioner fault (``jit(vmap(grad))`` of a convolution with a sharded batch gives wrong
  per-sample gradients) is reproduced without fimcore, and the adapters' guard
  (``_jax/sharding.py``: the batch replicated, a warning) keeps ``value_grad_and_gram`` of a CNN
  loss and ``FlaxGram`` with a convolution on its fallback route exact; no warning for an MLP.

The script prints one JSON object ``{check: relative error}`` (and flags) on its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import import_backend

jax = import_backend("jax")

from fimcore_adapters.jax import value_grad_and_gram  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, os
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
jax.config.update("jax_enable_x64", True)
import flax.linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fimcore_adapters.jax import FlaxGram, output_loss, sample_labels, value_grad_and_gram

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
REP, DATA = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
out, flags = {}, {}
B, C = 8, 3
r = np.random.default_rng(0)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def flat(tree):
    return np.concatenate([np.asarray(t, np.float64).reshape(-1) for t in jax.tree_util.tree_leaves(tree)])


def loop(loss_one, params, *batch):
    """Float64 per-sample loop: rows J_i = grad of loss_one at example i alone."""
    g = jax.jit(jax.grad(loss_one))
    J = np.stack([flat(g(params, *[b[i] for b in batch])) for i in range(B)])
    return J @ J.T, J.mean(axis=0)


def shard(params, *batch):
    return (jax.device_put(params, REP),) + tuple(jax.device_put(b, DATA) for b in batch)


def check(name, step, params, batch, want_gram, want_grad, **kw):
    one = jax.jit(step)(params, *batch, **kw)
    many = jax.jit(step)(*shard(params, *batch), **kw)
    flags[name + ":gram_global_shape"] = tuple(many[2].shape) == (B, B)
    out[name + ":sharded_vs_single"] = rel(many[2], one[2])
    out[name + ":sharded_vs_loop"] = rel(many[2], want_gram)
    out[name + ":grad_sharded_vs_single"] = rel(flat(many[1]), flat(one[1]))
    out[name + ":grad_sharded_vs_loop"] = rel(flat(many[1]), want_grad)
    return many


# --- plain JAX: MLP and a small CNN --------------------------------------------------------
mlp = {"w1": jnp.asarray(r.normal(size=(5, 6)) / 2), "b1": jnp.asarray(r.normal(size=6) / 4),
       "w2": jnp.asarray(r.normal(size=(6, C)))}
x = jnp.asarray(r.normal(size=(B, 5))); y = jnp.asarray(r.integers(0, C, size=B))


def mlp_predict(p, xi):
    return jnp.tanh(xi @ p["w1"] + p["b1"]) @ p["w2"]


def mlp_one(p, xi, yi):
    return -jax.nn.log_softmax(mlp_predict(p, xi))[yi]


want, wgrad = loop(mlp_one, mlp, x, y)
many = check("mlp", value_grad_and_gram(mlp_one), mlp, (x, y), want, wgrad)
flags["mlp:gram_rows_sharded_over_data"] = many[2].sharding.spec[:1] == ("data",)
check("mlp_chunk3", value_grad_and_gram(mlp_one, chunk_size=3), mlp, (x, y), want, wgrad)
per = sum(np.size(v) for v in jax.tree_util.tree_leaves(mlp)) * 8
check("mlp_budget", value_grad_and_gram(mlp_one, memory_budget=5 * per), mlp, (x, y), want, wgrad)
blocks = jax.jit(value_grad_and_gram(mlp_one, keep_blocks=True))(*shard(mlp, x, y))[3]
out["mlp_blocks_sum_vs_loop"] = rel(sum(blocks.values()), want)
rep_step = jax.jit(value_grad_and_gram(mlp_one), out_shardings=(REP, REP, REP))
replicated = rep_step(*shard(mlp, x, y))[2]
flags["mlp:out_shardings_replicates_gram"] = bool(replicated.is_fully_replicated)
out["mlp_replicated_vs_loop"] = rel(replicated, want)

# sampled-label Fisher: the labels of the unsharded step with the same key
loss = output_loss(mlp_predict, "cross_entropy")
key = jax.random.key(3)
labels = np.asarray(sample_labels(loss, mlp, x, key, 2))
want_s = sum(loop(mlp_one, mlp, x, labels[k])[0] for k in range(2)) / 2
check("sampled", value_grad_and_gram(loss, fisher="sampled", mc_samples=2), mlp, (x, y), want_s,
      wgrad, key=key)
check("sampled_budget", value_grad_and_gram(loss, fisher="sampled", mc_samples=2,
                                            memory_budget=2 * 2 * 2 * per), mlp, (x, y), want_s,
      wgrad, key=key)

cnn = {"k": jnp.asarray(r.normal(size=(3, 3, 2, 4)) / 3), "w": jnp.asarray(r.normal(size=(36, C)) / 4)}
xc = jnp.asarray(r.normal(size=(B, 6, 6, 2)))


def cnn_one(p, xi, yi):
    h = lax.conv_general_dilated(xi[None], p["k"], (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h[0, ::2, ::2]).reshape(-1)                        # 3 × 3 × 4 = 36 features
    return -jax.nn.log_softmax(h @ p["w"])[yi]


want_c, wgrad_c = loop(cnn_one, cnn, xc, y)
# jit(vmap(grad)) of this convolution with the batch sharded gives wrong per-sample kernel
# gradients in XLA's partitioner (JAX 0.10.2, CPU): first that the fault is real here, without
# fimcore, then that value_grad_and_gram replicates the batch and stays exact, with a warning.
raw = jax.jit(jax.vmap(jax.grad(cnn_one), in_axes=(None, 0, 0)))(*shard(cnn, xc, y))
raw_rows = np.stack([flat(jax.tree_util.tree_map(lambda g: g[i], raw)) for i in range(B)])
flags["cnn:partitioner_fault_reproduced"] = rel(raw_rows @ raw_rows.T, want_c) > 1e-3
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    check("cnn_jit", value_grad_and_gram(cnn_one), cnn, (xc, y), want_c, wgrad_c)
    check("cnn_jit_chunked", value_grad_and_gram(cnn_one, chunk_size=3), cnn, (xc, y), want_c,
          wgrad_c)
flags["cnn_jit:replication_warned"] = any("replicated for this step" in str(w.message)
                                          for w in caught)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(value_grad_and_gram(mlp_one))(*shard(mlp, x, y))
flags["mlp:no_replication_warning"] = not any("replicated for this step" in str(w.message)
                                              for w in caught)

# shard_map with an explicit axis name: every device computes the global Gram
smap = jax.jit(jax.shard_map(value_grad_and_gram(mlp_one, axis_name="data"), mesh=mesh,
                             in_specs=(P(), P("data"), P("data")), out_specs=(P(), P(), P())))
lm, gm, Gm = smap(*shard(mlp, x, y))
out["shard_map:gram_vs_loop"] = rel(Gm, want)
out["shard_map:grad_vs_loop"] = rel(flat(gm), wgrad)
out["shard_map:loss_vs_loop"] = rel(lm, np.mean([mlp_one(mlp, x[i], y[i]) for i in range(B)]))
flags["shard_map:gram_global_shape"] = tuple(Gm.shape) == (B, B)
smap_c = jax.jit(jax.shard_map(value_grad_and_gram(cnn_one, axis_name="data"), mesh=mesh,
                               in_specs=(P(), P("data"), P("data")), out_specs=(P(), P(), P())))
_, gc, Gc = smap_c(*shard(cnn, xc, y))
out["shard_map_cnn:gram_vs_loop"] = rel(Gc, want_c)
out["shard_map_cnn:grad_vs_loop"] = rel(flat(gc), wgrad_c)
sstep = value_grad_and_gram(loss, fisher="sampled", mc_samples=2, axis_name="data")
smap_s = jax.jit(jax.shard_map(lambda p, a, b: sstep(p, a, b, key=key), mesh=mesh,
                               in_specs=(P(), P("data"), P("data")), out_specs=(P(), P(), P())))
out["shard_map_sampled:gram_vs_loop"] = rel(smap_s(*shard(mlp, x, y))[2], want_s)

# --- FlaxGram: MLP and a CNN with BatchNorm in train mode ----------------------------------
F64 = {"param_dtype": jnp.float64, "dtype": jnp.float64}


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, h):
        return nn.Dense(C, **F64)(jnp.tanh(nn.Dense(6, **F64)(h)))


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, h, train=True):
        h = nn.Conv(4, (3, 3), **F64)(h)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.5, **F64)(h)
        h = nn.relu(h)[:, ::2, ::2].reshape(h.shape[0], -1)
        return nn.Dense(C, **F64)(h)


def ce(logits, t):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, None], 1)[:, 0]


def bn_cnn_rows(params, xs, t):
    """FlaxCNN written out in plain JAX with one parameter copy θ_j per sample (sample j's slice
    of every layer uses θ_j; the batch statistics mix all samples). Row i = B · ∂L/∂θ_i at
    θ_j = θ: sample i's contribution to the batch gradient, the rows FlaxGram documents."""
    stacked = jax.tree_util.tree_map(lambda p: jnp.broadcast_to(p, (B,) + p.shape), params)

    def batch_loss(q):
        def conv(k, b, xi):
            h = lax.conv_general_dilated(xi[None], k, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
            return h + b
        h = jax.vmap(conv)(q["Conv_0"]["kernel"], q["Conv_0"]["bias"], xs)
        mu = jnp.mean(h, axis=(0, 1, 2))
        var = jnp.mean((h - mu) ** 2, axis=(0, 1, 2))
        xhat = (h - mu) / jnp.sqrt(var + 1e-5)
        bn = q["BatchNorm_0"]
        h = xhat * bn["scale"][:, None, None, :] + bn["bias"][:, None, None, :]
        h = jax.nn.relu(h)[:, ::2, ::2].reshape(B, -1)
        logits = jnp.einsum("bi,bio->bo", h, q["Dense_0"]["kernel"]) + q["Dense_0"]["bias"]
        return jnp.mean(ce(logits, t))

    g = jax.jit(jax.grad(batch_loss))(stacked)
    J = B * np.concatenate([np.asarray(leaf).reshape(B, -1) for leaf in jax.tree_util.tree_leaves(g)], 1)
    return J @ J.T, J.mean(axis=0)


v_mlp = FlaxMLP().init(jax.random.key(0), x)
g_mlp = jax.jit(jax.grad(lambda p, i: ce(FlaxMLP().apply({"params": p}, x[i:i + 1]), y[i:i + 1])[0]),
                static_argnums=1)
J = np.stack([flat(g_mlp(v_mlp["params"], i)) for i in range(B)])
check("flax_mlp", FlaxGram(FlaxMLP(), ce), v_mlp, (x, y), J @ J.T, J.mean(axis=0))
check("flax_mlp_budget", FlaxGram(FlaxMLP(), ce, memory_budget=400), v_mlp, (x, y), J @ J.T,
      J.mean(axis=0))

v_cnn = FlaxCNN().init(jax.random.key(1), xc)
want_bn, wgrad_bn = bn_cnn_rows(v_cnn["params"], xc, y)
step = FlaxGram(FlaxCNN(), ce, mutable=["batch_stats"])
many = check("flax_cnn_bn", step, v_cnn, (xc, y), want_bn, wgrad_bn)
one = jax.jit(step)(v_cnn, xc, y)
out["flax_cnn_bn:batch_stats_sharded_vs_single"] = max(
    rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(many[3]), jax.tree_util.tree_leaves(one[3])))
# one shard's statistics differ: the sharded step used the global batch statistics
_, shard0 = FlaxCNN().apply(v_cnn, xc[:2], mutable=["batch_stats"])
out["flax_cnn_bn:first_shard_stats_vs_global"] = rel(shard0["batch_stats"]["BatchNorm_0"]["mean"],
                                                     one[3]["batch_stats"]["BatchNorm_0"]["mean"])
check("flax_cnn_bn_budget", FlaxGram(FlaxCNN(), ce, mutable=["batch_stats"], memory_budget=2500),
      v_cnn, (xc, y), want_bn, wgrad_bn)


# --- FlaxGram with a convolution on its fallback (vmap) route: replicated, exact, warned ------
class OwnConv(nn.Module):                       # not a Flax Conv: the fallback route takes it
    @nn.compact
    def __call__(self, h):
        k = self.param("k", nn.initializers.normal(0.3), (3, 3, 2, 4), jnp.float64)
        return lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


class FallbackCNN(nn.Module):
    @nn.compact
    def __call__(self, h):
        h = jnp.tanh(OwnConv()(h))[:, ::2, ::2].reshape(h.shape[0], -1)
        return nn.Dense(C, **F64)(h)


v_fb = FallbackCNN().init(jax.random.key(2), xc)
want_fb, wgrad_fb = loop(lambda v, xi, yi: ce(FallbackCNN().apply(v, xi[None]), yi[None])[0],
                         v_fb, xc, y)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    check("flax_fallback_conv", FlaxGram(FallbackCNN(), ce), v_fb, (xc, y), want_fb, wgrad_fb)
flags["flax_fallback_conv:replication_warned"] = any("replicated for this step" in str(w.message)
                                                     for w in caught)
print(json.dumps({"errors": out, "flags": flags}))
'''


def test_global_gram_and_gradient_under_a_4_device_data_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters"),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors, flags = result["errors"], result["flags"]
    assert all(flags.values()), flags
    stats_differ = errors.pop("flax_cnn_bn:first_shard_stats_vs_global")
    assert stats_differ > 1e-3, stats_differ
    bad = {k: v for k, v in errors.items() if not v <= 1e-12}
    assert not bad, bad
    assert len(errors) >= 52, sorted(errors)


def test_axis_name_options_are_checked():
    loss = lambda p, x: (p * x).sum()          # noqa: E731
    with pytest.raises(TypeError, match="axis_name must be None or a mesh axis name"):
        value_grad_and_gram(loss, axis_name=0)
    with pytest.raises(ValueError, match="takes neither chunk_size nor memory_budget; received "
                                         "chunk_size=2"):
        value_grad_and_gram(loss, axis_name="data", chunk_size=2)
