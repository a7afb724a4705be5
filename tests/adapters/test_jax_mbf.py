"""fimcore_adapters.jax.mbf: against the PyTorch MBF on shared NumPy weights, and hand references.

The cross-framework test runs ten float64 steps of the same network (a grouped convolution, a
LayerNorm and dense layers) in PyTorch and in Flax linen from the same NumPy weights and
batches, and compares every parameter to 1e-10. The hand references build blocks from
``jax.vmap(jax.grad(...))`` per-example gradients with explicit loops.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import import_backend

torch = import_backend("torch")
jax = import_backend("jax")
flax = import_backend("flax")
optax = import_backend("optax")
jnp = jax.numpy
nn = flax.linen

from fimcore_adapters.jax import mbf  # noqa: E402
from fimcore_adapters.torch import MBF  # noqa: E402


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):                                   # x: (m, H, W, 2)
        h = jnp.tanh(nn.Conv(4, (3, 2), padding=((1, 1), (0, 0)), feature_group_count=2,
                             name="conv")(x))
        h = h.mean((1, 2))                                   # (m, 4)
        h = nn.LayerNorm(epsilon=1e-5, name="norm")(h)
        h = jnp.tanh(nn.Dense(5, name="fc1")(h))
        return nn.Dense(3, name="fc2")(h)


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, (3, 2), padding=(1, 0), groups=2)
        self.norm = torch.nn.LayerNorm(4)
        self.fc1 = torch.nn.Linear(4, 5)
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):                                    # x: (m, 2, H, W)
        h = torch.tanh(self.conv(x)).mean((2, 3))
        return self.fc2(torch.tanh(self.fc1(self.norm(h))))


def _shared_weights(seed=0):
    r = np.random.default_rng(seed)
    return {"conv_w": r.normal(size=(4, 1, 3, 2)) * 0.5, "conv_b": r.normal(size=4) * 0.1,
            "ln_g": 1 + 0.1 * r.normal(size=4), "ln_b": 0.1 * r.normal(size=4),
            "fc1_w": r.normal(size=(5, 4)) * 0.5, "fc1_b": r.normal(size=5) * 0.1,
            "fc2_w": r.normal(size=(3, 5)) * 0.5, "fc2_b": r.normal(size=3) * 0.1}


def _torch_model(w):
    m = TorchNet().double()
    with torch.no_grad():
        m.conv.weight.copy_(torch.from_numpy(w["conv_w"])); m.conv.bias.copy_(torch.from_numpy(w["conv_b"]))
        m.norm.weight.copy_(torch.from_numpy(w["ln_g"])); m.norm.bias.copy_(torch.from_numpy(w["ln_b"]))
        for k in ("fc1", "fc2"):
            getattr(m, k).weight.copy_(torch.from_numpy(w[f"{k}_w"]))
            getattr(m, k).bias.copy_(torch.from_numpy(w[f"{k}_b"]))
    return m


def _flax_params(w):
    return {"conv": {"kernel": jnp.asarray(w["conv_w"].transpose(2, 3, 1, 0)), "bias": jnp.asarray(w["conv_b"])},
            "norm": {"scale": jnp.asarray(w["ln_g"]), "bias": jnp.asarray(w["ln_b"])},
            "fc1": {"kernel": jnp.asarray(w["fc1_w"].T), "bias": jnp.asarray(w["fc1_b"])},
            "fc2": {"kernel": jnp.asarray(w["fc2_w"].T), "bias": jnp.asarray(w["fc2_b"])}}


def _torch_as_flax(m):
    t = lambda p: p.detach().numpy()  # noqa: E731
    return {"conv": {"kernel": t(m.conv.weight).transpose(2, 3, 1, 0), "bias": t(m.conv.bias)},
            "norm": {"scale": t(m.norm.weight), "bias": t(m.norm.bias)},
            "fc1": {"kernel": t(m.fc1.weight).T, "bias": t(m.fc1.bias)},
            "fc2": {"kernel": t(m.fc2.weight).T, "bias": t(m.fc2.bias)}}


@pytest.mark.parametrize("curvature", ["minibatch_outer", "per_sample"])
def test_optax_and_torch_follow_the_same_trajectory_in_float64(curvature):
    w = _shared_weights()
    r = np.random.default_rng(1)
    batches = [(r.normal(size=(6, 2, 5, 4)), r.normal(size=(6, 3)), r.normal(size=(6, 3))) for _ in range(10)]
    kw = dict(damping=0.1, momentum=0.9, curvature_decay=0.8, weight_decay=0.01, curvature_every=2,
              inverse_every=4, curvature=curvature, average_above=110, eps=1e-8)
    lr = 0.01
    # PyTorch
    tm = _torch_model(w)
    opt = MBF(tm, lr, **kw)
    assert [r.kind for r in opt.report()][:4] == ["conv", "conv_bias", "dense_averaged", "dense"]
    for x, y, y2 in batches:
        xt, yt, y2t = (torch.from_numpy(a) for a in (x, y, y2))
        opt.zero_grad()
        out = tm(xt)
        (0.5 * ((out - yt) ** 2).sum() / 6).backward(retain_graph=True)
        opt.step(curvature_loss=0.5 * ((out - y2t) ** 2).sum() / 6 if curvature == "sampled_labels" else None)
    # optax + Flax
    model = FlaxNet()
    params = {"params": _flax_params(w)}
    tx = mbf(lr, **kw)
    assert [u["kind"] for u in tx.report(params)][:4] == ["conv", "conv_bias", "dense_averaged", "dense"]
    state = tx.init(params)

    def example_loss(p, x, y):
        return 0.5 * jnp.sum((model.apply(p, x[None])[0] - y) ** 2)

    def batch_loss(p, x, y):
        return jnp.mean(jax.vmap(example_loss, in_axes=(None, 0, 0))(p, x, y))

    @jax.jit
    def step(p, s, x, y, y2):
        g = jax.grad(batch_loss)(p, x, y)
        if curvature == "per_sample":
            c = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(p, x, y)
        elif curvature == "sampled_labels":
            c = jax.grad(batch_loss)(p, x, y2)
        else:
            c = None
        u, s = tx.update(g, s, p, curvature=c)
        return optax.apply_updates(p, u), s

    for x, y, y2 in batches:
        params, state = step(params, state, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(y), jnp.asarray(y2))
    assert int(state.count) == 10 and int(state.skipped) == 0
    ref = _torch_as_flax(tm)
    for layer, leaves in ref.items():  # noqa: B007
        for name, value in leaves.items():
            np.testing.assert_allclose(np.asarray(params["params"][layer][name]), value, rtol=1e-10,
                                       atol=1e-12, err_msg=f"{layer}/{name}")
    # and the trajectory moved (the comparison is not between two untouched copies)
    assert np.abs(ref["fc1"]["kernel"] - w["fc1_w"].T).max() > 1e-3


def test_dense_per_sample_blocks_equal_a_per_example_loop():
    r = np.random.default_rng(2)
    params = {"d": {"kernel": jnp.asarray(r.normal(size=(3, 2))), "bias": jnp.asarray(r.normal(size=2))}}
    x, y = jnp.asarray(r.normal(size=(5, 3))), jnp.asarray(r.normal(size=(5, 2)))

    def ex_loss(p, x, y):
        return jnp.sum(jnp.sin(x @ p["d"]["kernel"] + p["d"]["bias"]) * y)

    tx = mbf(0.1, curvature="per_sample", curvature_decay=0.0, curvature_every=1, inverse_every=1)
    state = tx.init(params)
    g = jax.grad(lambda p: jnp.mean(jax.vmap(ex_loss, in_axes=(None, 0, 0))(p, x, y)))(params)
    ps = jax.vmap(jax.grad(ex_loss), in_axes=(None, 0, 0))(params, x, y)
    _, state = tx.update(g, state, params, curvature=ps)
    ref = np.zeros((2, 4, 4))
    grad_one = jax.jit(jax.grad(ex_loss))
    for n in range(5):
        gn = grad_one(params, x[n], y[n])
        for o in range(2):
            v = np.concatenate([np.asarray(gn["d"]["kernel"][:, o]), np.asarray(gn["d"]["bias"][o:o + 1])])
            ref[o] += np.outer(v, v) / 5
    np.testing.assert_allclose(np.asarray(state.curvature[0]), ref, rtol=1e-12, atol=1e-14)
    # sampled_labels: the blocks are outer products of the gradient passed as `curvature`
    tx = mbf(0.1, curvature="sampled_labels", curvature_decay=0.0, curvature_every=1, inverse_every=1)
    other = jax.tree_util.tree_map(lambda a: a[0], ps)
    _, state = tx.update(g, tx.init(params), params, curvature=other)
    rows = np.concatenate([np.asarray(other["d"]["kernel"]).T, np.asarray(other["d"]["bias"])[:, None]], 1)
    np.testing.assert_allclose(np.asarray(state.curvature[0]), [np.outer(q, q) for q in rows],
                               rtol=1e-13, atol=1e-15)


def test_warm_start_then_steps_match_torch_warm_start():
    w = _shared_weights(3)
    r = np.random.default_rng(4)
    data = [(r.normal(size=(4, 2, 5, 4)), r.normal(size=(4, 3))) for _ in range(3)]
    tm = _torch_model(w)
    opt = MBF(tm, 0.1, curvature_every=1, inverse_every=2)
    loss_t = lambda o, t: 0.5 * ((o - t) ** 2).sum() / o.shape[0]  # noqa: E731
    opt.warm_start([(torch.from_numpy(a), torch.from_numpy(b)) for a, b in data], loss_t)
    model = FlaxNet()
    params = {"params": _flax_params(w)}
    tx = mbf(0.1, curvature_every=1, inverse_every=2)
    loss_j = lambda p, x, y: 0.5 * jnp.sum((model.apply(p, x) - y) ** 2) / x.shape[0]  # noqa: E731
    grad_j = jax.jit(jax.grad(loss_j))
    grads = [grad_j(params, jnp.asarray(a.transpose(0, 2, 3, 1)), jnp.asarray(b)) for a, b in data]
    state = tx.warm_start(tx.init(params), grads)
    fc1_t = opt.state[tm.fc1.weight]["curvature"].numpy()
    idx = [u["name"] for u in tx.report(params)].index("params/fc1")
    np.testing.assert_allclose(np.asarray(state.curvature[idx]), fc1_t, rtol=1e-10, atol=1e-14)


def test_bad_input_is_refused_and_non_finite_steps_are_skipped():
    with pytest.raises(ValueError, match=r"needs at least one dense or convolution layer.*'norm/scale'"):
        mbf(0.1).init({"norm": {"scale": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"damping must be a finite number > 0; received 0"):
        mbf(0.1, damping=0)
    with pytest.raises(ValueError, match=r"inverse_every must be >= curvature_every.*inverse_every=1, curvature_every=2"):
        mbf(0.1, curvature_every=2, inverse_every=1)
    params = {"d": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    with pytest.raises(ValueError, match=r"curvature='per_sample' needs update\(..., curvature=...\)"):
        tx = mbf(0.1, curvature="per_sample")
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="weight_decay=0.1 needs params"):
        tx = mbf(0.1, weight_decay=0.1)
        tx.update(params, tx.init(params))
    tx = mbf(0.1, curvature_every=1, inverse_every=1)
    state = tx.init(params)
    bad = {"d": {"kernel": jnp.array([[1.0, jnp.nan], [0.0, 1.0]]), "bias": jnp.zeros(2)}}
    up, new = jax.jit(tx.update)(bad, state, params)
    assert int(new.skipped) == 1 and int(new.count) == 0
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(up))
    huge = {"d": {"kernel": jnp.full((2, 2), 1e160), "bias": jnp.zeros(2)}}   # outer products overflow
    up, new = jax.jit(tx.update)(huge, state, params)
    assert int(new.skipped) == 1
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree_util.tree_leaves(up))
