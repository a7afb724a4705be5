"""fimcore_adapters.torch.MBF against references written here (float64 loops, closed forms).

Every expected value is built by hand from autograd gradients (per-sample loops for the exact
empirical-Fisher blocks, explicit (o, i) loops for the convolution blocks, numpy solves for the
directions), never by the optimiser's own code.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest

from tests.conftest import import_backend

torch = import_backend("torch")
nn = torch.nn

from fimcore_adapters.torch import MBF, sampled_label_loss  # noqa: E402

F64 = torch.float64


def _step(model, opt, x, y, loss_fn=None):
    loss_fn = loss_fn or (lambda o, t: 0.5 * ((o - t) ** 2).sum() / o.shape[0])
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return grads


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------- block tensors


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_block_tensor_equals_per_pair_outer_products(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, (3, 2), stride=2, padding=1, groups=groups).to(F64)
    model = nn.Sequential(conv)
    opt = MBF(model, lr=0.1, curvature_every=1, inverse_every=1, curvature_decay=0.0)
    g = _step(model, opt, _randn(5, 4, 7, 6), _randn(5, 8, 4, 4, seed=1))["0.weight"]
    F = opt.state[conv.weight]["curvature"]
    assert F.shape == (8, 4 // groups, 6, 6)
    for o in range(8):
        for i in range(4 // groups):
            v = g[o, i].reshape(-1)              # row-major (k_h, k_w)
            ref = torch.stack([v * v[a] for a in range(6)])
            torch.testing.assert_close(F[o, i], ref, rtol=0, atol=1e-14)
    fb = opt.state[conv.bias]["curvature"]
    torch.testing.assert_close(fb, model[0].bias.grad ** 2, rtol=0, atol=1e-14)


def _zero_input_linear():
    lin = nn.Linear(1, 3).to(F64)
    lin.in_features = 0                        # d_in = 0: a weight of shape (3, 0), bias only
    lin.weight = nn.Parameter(torch.zeros(3, 0, dtype=F64))
    return lin


def test_size_one_dense_blocks_direction_is_momentum_over_ema_plus_damping():
    torch.manual_seed(0)
    lin = _zero_input_linear()           # d_in = 0 plus bias: blocks of size 1, κ = 1
    model = nn.Sequential(lin)
    lr, lam, b1, b2 = 0.05, 0.3, 0.9, 0.8
    opt = MBF(model, lr=lr, damping=lam, momentum=b1, curvature_decay=b2, curvature_every=1,
              inverse_every=1)
    assert [r.block_size for r in opt.report()] == [1]
    y = _randn(6, 3)
    b = lin.bias.detach().numpy().copy()
    mu, v = np.zeros(3), np.zeros(3)
    for t in range(5):
        gbar = (b[None, :] - y.numpy()).mean(0)      # ∂/∂b of ½ mean ‖b − y_n‖²
        mu = b1 * mu + gbar
        v = b2 * v + (1 - b2) * gbar ** 2
        b = b - lr * mu / (v + lam)
        _step(model, opt, torch.zeros(6, 0, dtype=F64), y)
        np.testing.assert_allclose(lin.bias.detach().numpy(), b, rtol=1e-13, atol=1e-15)


def test_conv_1x1_blocks_and_bias_are_size_one_without_square_root():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 1).to(F64)
    model = nn.Sequential(conv)
    opt = MBF(model, lr=0.1, damping=0.01, curvature_every=1, inverse_every=1)
    w0 = conv.weight.detach().clone()
    b0 = conv.bias.detach().clone()
    g = _step(model, opt, _randn(4, 2, 3, 3), _randn(4, 3, 3, 3, seed=2))
    for name, p0, param in (("0.weight", w0, conv.weight), ("0.bias", b0, conv.bias)):
        gg = g[name]
        expect = p0 - 0.1 * gg / (0.1 * gg ** 2 + 0.01)     # μ = ḡ, F̄ = (1−β2) ḡ²
        torch.testing.assert_close(param.detach(), expect, rtol=1e-12, atol=1e-14)


def test_averaged_dense_direction_solves_with_the_mean_block():
    torch.manual_seed(2)
    lin = nn.Linear(5, 4).to(F64)
    model = nn.Sequential(lin)
    opt = MBF(model, lr=0.2, damping=0.05, average_above=0, curvature_every=1, inverse_every=1)
    assert opt.report()[0].kind == "dense_averaged"
    W0 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().numpy().copy()
    g = _step(model, opt, _randn(7, 5), _randn(7, 4, seed=3))
    G = torch.cat([g["0.weight"], g["0.bias"][:, None]], 1).numpy()
    Favg = 0.1 * sum(np.outer(r, r) for r in G) / 4
    P = np.linalg.solve(Favg + 0.05 * np.eye(6), G.T).T
    got = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().numpy()
    np.testing.assert_allclose(got, W0 - 0.2 * P, rtol=1e-12, atol=1e-14)


def test_norm_and_other_parameters_take_the_adam_like_direction_and_are_reported():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(F64)
    opt = MBF(model, lr=0.1, curvature_every=1, inverse_every=1, eps=1e-8)
    rep = opt.report()
    assert rep.diagonal == ["1.weight", "1.bias"]
    assert "LayerNorm has no mini-block rule" in str(rep)
    gamma0 = model[1].weight.detach().clone()
    g = _step(model, opt, _randn(6, 3), _randn(6, 2, seed=4))["1.weight"]
    expect = gamma0 - 0.1 * g / (torch.sqrt(0.1 * g ** 2) + 1e-8)
    torch.testing.assert_close(model[1].weight.detach(), expect, rtol=1e-12, atol=1e-14)


# -------------------------------------------------------------- per-sample and sampled labels


class _Net(nn.Module):
    """Grouped conv, a Linear over a token axis (T > 1) and a plain Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.tok = nn.Linear(4, 3)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        h = torch.tanh(self.conv(x))                     # (m, 4, 2, 2)
        h = torch.tanh(self.tok(h.flatten(2).transpose(1, 2)))   # tokens: (m, 4, 3)
        return self.head(h.flatten(1))


def _per_sample_reference(model, x, y, average):
    """(1/m) Σ_n g_n g_nᵀ per block, g_n = ∇ℓ_n from one backward per sample."""
    m = x.shape[0]
    out = {}
    for n in range(m):
        model.zero_grad()
        (0.5 * ((model(x[n:n + 1]) - y[n:n + 1]) ** 2).sum()).backward()
        conv, tok, head = model.conv, model.tok, model.head
        rows = {
            "conv": conv.weight.grad.reshape(4, 1, 9).clone(),
            "conv.bias": conv.bias.grad.clone(),
            "tok": torch.cat([tok.weight.grad, tok.bias.grad[:, None]], 1).clone(),
            "head": torch.cat([head.weight.grad, head.bias.grad[:, None]], 1).clone(),
        }
        for k, r in rows.items():
            if k == "conv.bias":
                blk = r ** 2
            elif average:
                flat = r.reshape(-1, r.shape[-1])
                blk = sum(torch.outer(q, q) for q in flat) / flat.shape[0]
            else:
                blk = torch.stack([torch.outer(q, q) for q in r.reshape(-1, r.shape[-1])]
                                  ).reshape(*r.shape, r.shape[-1])
            out[k] = out.get(k, 0) + blk / m
    return out


@pytest.mark.parametrize("average", [False, True])
def test_per_sample_blocks_equal_a_float64_per_sample_loop(average):
    torch.manual_seed(4)
    model = _Net().to(F64)
    x, y = _randn(5, 2, 4, 4), _randn(5, 2, seed=5)
    ref = _per_sample_reference(copy.deepcopy(model), x, y, average)
    opt = MBF(model, lr=0.01, curvature="per_sample", curvature_decay=0.0, curvature_every=1,
              inverse_every=1, average_above=0 if average else 2 ** 24, conv_average=average)
    _step(model, opt, x, y)
    st = opt.state
    torch.testing.assert_close(st[model.conv.weight]["curvature"].reshape(ref["conv"].shape),
                               ref["conv"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st[model.conv.bias]["curvature"], ref["conv.bias"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st[model.tok.weight]["curvature"], ref["tok"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st[model.head.weight]["curvature"], ref["head"], rtol=1e-12, atol=1e-14)


def test_per_sample_only_captures_on_refreshing_steps():
    torch.manual_seed(5)
    model = _Net().to(F64)
    opt = MBF(model, lr=0.01, curvature="per_sample", curvature_every=3, inverse_every=3)
    x, y = _randn(4, 2, 4, 4), _randn(4, 2, seed=6)
    _step(model, opt, x, y)
    assert not opt.needs_curvature
    model(x)
    assert all(not u.captures for u in opt._units)


def test_sampled_labels_blocks_come_from_the_curvature_loss():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4)).to(F64)
    opt = MBF(model, lr=0.01, curvature="sampled_labels", curvature_decay=0.0, curvature_every=1,
              inverse_every=1)
    x = _randn(6, 3)
    out = model(x)
    labels = torch.multinomial(torch.softmax(out.detach(), 1), 1,
                               generator=torch.Generator().manual_seed(0))[:, 0]
    nn.functional.cross_entropy(out, torch.zeros(6, dtype=torch.long)).backward(retain_graph=True)
    sampled = nn.functional.cross_entropy(out, labels)
    gs = torch.autograd.grad(sampled, [model[0].weight, model[0].bias], retain_graph=True)
    rows = torch.cat([gs[0], gs[1][:, None]], 1)
    opt.step(curvature_loss=sampled)
    ref = torch.stack([torch.outer(r, r) for r in rows])
    torch.testing.assert_close(opt.state[model[0].weight]["curvature"], ref, rtol=1e-12, atol=1e-15)
    gen = torch.Generator().manual_seed(0)
    assert sampled_label_loss(model(x), generator=gen).dim() == 0


# ------------------------------------------------------------ Gram view of the idealised step


def _tiny_mlp():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64)


def _jacobian_blocks(model, x):
    """Per-example output Jacobians J (n, P), split into the MBF blocks (one per neuron)."""
    rows = []
    for n in range(x.shape[0]):
        model.zero_grad()
        model(x[n:n + 1]).sum().backward()
        l1, l2 = model[0], model[2]
        rows.append([torch.cat([l1.weight.grad[o], l1.bias.grad[o:o + 1]]).clone() for o in range(4)]
                    + [torch.cat([l2.weight.grad[0], l2.bias.grad]).clone()])
    return [torch.stack([r[j] for r in rows]) for j in range(5)]


@pytest.mark.parametrize("unit_residual", [True, False])
def test_idealised_full_batch_step_matches_the_gram_formula(unit_residual):
    model = _tiny_mlp()
    n, eta, lam = 6, 1e-5, 0.05
    x = _randn(n, 3, seed=8)
    with torch.no_grad():
        u0 = model(x)[:, 0]
    r = torch.ones(n, dtype=F64) if unit_residual else 1.0 + 0.5 * _randn(n, seed=9)
    y = (u0 - r)[:, None]
    Js = _jacobian_blocks(model, x)
    R = torch.diag(r)
    # Δu = −η Σ_j G_j R (R G_j R + nλI)⁻¹ 1, which for R = I is −η Σ_j G_j (G_j + nλI)⁻¹ (u − y)
    pred = sum(-eta * (J @ J.T) @ R @ torch.linalg.solve(R @ J @ J.T @ R + n * lam * torch.eye(n, dtype=F64),
                                                         torch.ones(n, dtype=F64)) for J in Js)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = MBF(model, lr=eta, damping=lam, curvature="per_sample", curvature_decay=0.0,
              curvature_every=1, inverse_every=1)
    _step(model, opt, x, y)
    dtheta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - theta0
    # parameters are ordered W1, b1, W2, b2: map the block Jacobians back to that order
    J = torch.cat([torch.stack([b[:, :3] for b in Js[:4]], 1).reshape(n, 12),
                   torch.stack([b[:, 3] for b in Js[:4]], 1), Js[4]], 1)
    torch.testing.assert_close(J @ dtheta, pred, rtol=1e-9, atol=1e-15)
    with torch.no_grad():
        du = model(x)[:, 0] - u0
    assert float((du - pred).norm() / pred.norm()) < 1e-3      # first order in η


# ------------------------------------------------------------------ warm start, checkpoints


def test_warm_start_is_the_arithmetic_mean_of_the_batch_estimates():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(2, 3)).to(F64)
    opt = MBF(model, lr=0.1)
    batches = [(_randn(4, 2, seed=s), _randn(4, 3, seed=10 + s)) for s in range(3)]
    loss_fn = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731
    ref = 0
    for xb, yb in batches:
        model.zero_grad()
        loss_fn(model(xb), yb).backward()
        rows = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
        ref = ref + torch.stack([torch.outer(q, q) for q in rows]) / 3
    w0 = model[0].weight.detach().clone()
    assert opt.warm_start(batches, loss_fn) == 3
    torch.testing.assert_close(opt.state[model[0].weight]["curvature"], ref, rtol=1e-13, atol=1e-16)
    assert torch.equal(model[0].weight.detach(), w0) and model[0].weight.grad is None


def _cnn():
    torch.manual_seed(9)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(12, 2)).to(F64)


@pytest.mark.parametrize("curvature", ["minibatch_outer", "per_sample"])
def test_state_dict_round_trip_mid_run_reproduces_the_uninterrupted_run(curvature):
    data = [(_randn(4, 1, 4, 4, seed=s), _randn(4, 2, seed=20 + s)) for s in range(7)]
    kw = dict(lr=0.05, curvature=curvature, curvature_every=2, inverse_every=4, weight_decay=0.01)
    a = _cnn()
    oa = MBF(a, **kw)
    oa.warm_start(data[:2], lambda o, t: ((o - t) ** 2).mean())
    b = copy.deepcopy(a)
    ob = MBF(b, **kw)
    ob.load_state_dict(oa.state_dict())
    for xb, yb in data:
        _step(a, oa, xb, yb)
    for xb, yb in data[:3]:
        _step(b, ob, xb, yb)
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    c = _cnn()
    c.load_state_dict(saved["model"])
    oc = MBF(c, **kw)
    oc.load_state_dict(saved["opt"])
    for xb, yb in data[3:]:
        _step(c, oc, xb, yb)
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_param_groups_override_the_learning_rate():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).to(F64)
    twin = copy.deepcopy(model)
    opt = MBF(model, lr=0.1, params=[{"params": model[0].parameters(), "lr": 0.0},
                                     {"params": model[1].parameters()}])
    w0 = model[0].weight.detach().clone()
    _step(model, opt, _randn(3, 2), _randn(3, 1, seed=1))
    assert torch.equal(model[0].weight.detach(), w0)
    assert not torch.equal(model[1].weight.detach(), twin[1].weight.detach())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)   # a real torch Optimizer
    _step(model, opt, _randn(3, 2), _randn(3, 1, seed=1))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.05]


# --------------------------------------------------------------------------- bad input


def test_a_model_without_supported_layers_is_refused():
    with pytest.raises(ValueError, match=r"at least one trainable nn.Linear or nn.Conv1d/2d/3d .*LayerNorm"):
        MBF(nn.Sequential(nn.LayerNorm(3)), lr=0.1)


@pytest.mark.parametrize("kw, match", [
    (dict(damping=0.0), r"damping must be a finite number > 0; received 0.0"),
    (dict(damping=-1e-3), r"damping must be a finite number > 0; received -0.001"),
    (dict(curvature_every=10, inverse_every=5), r"inverse_every must be >= curvature_every.*"
                                                r"inverse_every=5, curvature_every=10"),
    (dict(curvature="kfac"), r"curvature must be one of .*received 'kfac'"),
    (dict(momentum=1.0), r"momentum must be a finite number >= 0 and < 1; received 1.0"),
    (dict(loss_reduction="none"), r"loss_reduction must be 'mean' or 'sum'"),
])
def test_bad_options_are_refused_with_what_must_hold(kw, match):
    with pytest.raises(ValueError, match=match):
        MBF(nn.Linear(2, 2), lr=0.1, **kw)


def test_a_group_override_is_validated_and_a_layer_cannot_be_split_across_groups():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="damping must be a finite number > 0; received -1"):
        MBF(m, lr=0.1, params=[{"params": m.parameters(), "damping": -1}])
    with pytest.raises(ValueError, match=r"weight and bias of '<model>' must be in the same parameter group"):
        MBF(m, lr=0.1, params=[{"params": [m.weight]}, {"params": [m.bias]}])


def test_non_finite_curvature_raises_or_skips_and_never_writes_nan():
    model = nn.Sequential(nn.Linear(2, 2)).to(F64)
    x = torch.tensor([[1.0, float("inf")]], dtype=F64)
    opt = MBF(model, lr=0.1)
    with pytest.raises(FloatingPointError, match=r"non-finite values in gradient of 0.*on_nonfinite='skip'"):
        _step(model, opt, x, torch.zeros(1, 2, dtype=F64))
    before = [p.detach().clone() for p in model.parameters()]
    opt = MBF(model, lr=0.1, on_nonfinite="skip")
    _step(model, opt, x, torch.zeros(1, 2, dtype=F64))
    assert opt.skipped_steps == 1 and opt.state_dict()["mbf"]["step"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # finite gradients (~1e160) whose outer products overflow: non-finite curvature
    big = torch.tensor([[1e80, 1e80]], dtype=F64)
    with pytest.raises(FloatingPointError, match=r"at step 0 \(curvature\) non-finite values in 0"):
        _step(model, MBF(model, lr=0.1), big, torch.zeros(1, 2, dtype=F64))
    _step(model, opt, big, torch.zeros(1, 2, dtype=F64))
    assert opt.skipped_steps == 2
    # finite entries whose sum overflows are finite: the check is exact, not a sum test
    assert opt._check_finite({"x": torch.tensor([1e308, 1e308], dtype=F64)}, "probe")
    assert not opt._check_finite({"x": torch.tensor([1.0, float("nan")], dtype=F64)}, "probe")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_other_misuse_is_refused():
    model = nn.Sequential(nn.Linear(2, 2)).to(F64)
    opt = MBF(model, lr=0.1, curvature="sampled_labels")
    model(_randn(3, 2)).sum().backward()
    with pytest.raises(ValueError, match=r"needs step\(curvature_loss=...\) on refreshing steps"):
        opt.step()
    with pytest.raises(ValueError, match="needs at least one batch"):
        MBF(model, lr=0.1).warm_start([], lambda o, t: o.sum())
    with pytest.raises(ValueError, match="has no 'mbf' entry"):
        MBF(model, lr=0.1).load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    with pytest.raises(ValueError, match=r"per_sample' supports zero-padded.*padding_mode='reflect'"):
        MBF(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), lr=0.1, curvature="per_sample")
    tied = nn.Linear(2, 2).to(F64)
    net = nn.Sequential(tied, nn.Tanh(), tied)
    opt = MBF(net, lr=0.1, curvature="per_sample")
    net(_randn(3, 2)).sum().backward()
    with pytest.raises(RuntimeError, match=r"exactly one forward and backward of module '0'.*received 2"):
        opt.step()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        MBF([tied.weight], lr=0.1)
    assert math.isfinite(float(tied.weight.detach().sum()))
