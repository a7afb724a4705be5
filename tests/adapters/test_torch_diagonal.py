"""fimcore_adapters.torch.diagonal_fisher against independent float64 references.

References: BackPACK ``DiagGGNExact`` / ``DiagHessian`` (with their reduction factors undone),
``torch.autograd.functional`` Jacobians and Hessians of the flat parameter vector per input,
a per-sample ``backward()`` loop, and Monte-Carlo label draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import torch
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from fimcore_adapters.torch import diagonal_fisher  # noqa: E402
from tests.conftest import import_backend  # noqa: E402

F64 = torch.float64


def mlp(c=3, act=nn.Sigmoid, bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), act(), nn.Linear(5, 4, bias=bias), act(),
                         nn.Linear(4, c, bias=bias)).to(F64)


def cnn(c=3, pool=nn.AvgPool2d):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), pool(2), nn.Flatten(),
                         nn.Linear(8, c)).to(F64)


def cnn1d(c=2):
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Sigmoid(), nn.Flatten(),
                         nn.Linear(15, c)).to(F64)


def cnn3d(c=2):
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv3d(1, 2, 2), nn.Softplus(), nn.Flatten(), nn.GELU(),
                         nn.Linear(16, c)).to(F64)


def per_token(c=2):                 # a Linear over a sequence axis: the generic contraction
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, c)).to(F64)


MODELS = {"mlp": (mlp, (4,)), "per_token": (per_token, (2, 3)), "mlp_gelu": (lambda: mlp(act=nn.GELU), (4,)),
          "cnn": (cnn, (1, 6, 6)), "cnn1d": (cnn1d, (2, 5)), "cnn3d": (cnn3d, (1, 3, 3, 3))}


def batch(shape, n=4, seed=3):
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=F64)


def nll(out, y, likelihood):
    """Sum over the batch of −log p(y | x) (Gaussian: unit variance, constants dropped)."""
    if likelihood == "categorical":
        return nn.functional.cross_entropy(out, y, reduction="sum")
    return 0.5 * ((out - y) ** 2).sum()


class Flat:
    """The model as a function of one flat float64 parameter vector (reference side)."""

    def __init__(self, model):
        self.model = model
        self.named = [(k, p.shape) for k, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(self, theta):
        out, i = {}, 0
        for k, shape in self.named:
            size = math.prod(shape)
            out[k] = theta[i:i + size].reshape(shape)
            i += size
        return out

    def __call__(self, theta, x):
        return functional_call(self.model, self.unflat(theta), (x,))

    def split(self, vec):
        return {k: v.reshape(s) for (k, s), v in zip(self.named, self.unflat(vec).values())}


def reference_exact(model, x, likelihood):
    """(1/N) Σ_n diag(J_nᵀ 𝓘(h_n) J_n) from explicit per-input Jacobians."""
    f = Flat(model)
    total = torch.zeros_like(f.theta)
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda t: f(t, xi[None])[0], f.theta)  # (C, P)
        h = f(f.theta, xi[None])[0]
        if likelihood == "categorical":
            p = torch.softmax(h, 0)
            fisher = torch.diag(p) - torch.outer(p, p)
        else:
            fisher = torch.eye(h.numel(), dtype=F64)
        total += torch.einsum("cp,cd,dp->p", jac, fisher, jac)
    return f.split(total / len(x))


def reference_at_labels(model, x, y, likelihood):
    """Î1 from a per-sample backward() loop and Î2 from per-sample autograd Hessians."""
    f = Flat(model)
    i1 = torch.zeros_like(f.theta)
    i2 = torch.zeros_like(f.theta)
    for xi, yi in zip(x, y):
        theta = f.theta.clone().requires_grad_(True)
        nll(f(theta, xi[None]), yi[None], likelihood).backward()
        i1 += theta.grad ** 2
        hess = torch.autograd.functional.hessian(
            lambda t: nll(f(t, xi[None]), yi[None], likelihood), f.theta)
        i2 += torch.diagonal(hess)
    return f.split(i1 / len(x)), f.split(i2 / len(x))


def draw_labels(model, x, likelihood, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = model(x).detach()
    if likelihood == "categorical":
        return torch.multinomial(torch.softmax(out, 1), 1, generator=g)[:, 0]
    return out + torch.randn(out.shape, generator=g, dtype=F64)


def assert_close(got, ref, rtol=1e-9, atol=1e-12):
    assert set(got) == set(ref)
    for k in ref:
        np.testing.assert_allclose(got[k].numpy(), ref[k].detach().numpy(), rtol=rtol, atol=atol,
                                   err_msg=k)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("case", list(MODELS))
def test_exact_and_labels_against_autograd(case, likelihood):
    build, shape = MODELS[case]
    model, x = build(), batch(shape, n=3)
    assert_close(diagonal_fisher(model, x, likelihood=likelihood, estimator="exact").values,
                 reference_exact(model, x, likelihood))
    y = draw_labels(model, x, likelihood)
    ref1, ref2 = reference_at_labels(model, x, y, likelihood)
    got1 = diagonal_fisher(model, x, likelihood=likelihood, estimator="i1", labels=y)
    got2 = diagonal_fisher(model, x, likelihood=likelihood, estimator="i2", labels=y)
    emp = diagonal_fisher(model, x, likelihood=likelihood, estimator="empirical", targets=y)
    assert_close(got1.values, ref1)
    assert_close(emp.values, ref1)                  # the same formula at data labels
    assert_close(got2.values, ref2)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_against_backpack(case, likelihood):
    backpack = import_backend("backpack")
    from backpack.extensions import DiagGGNExact, DiagHessian

    # BackPACK's AvgPool2d second-order rule builds a float32 kernel: MaxPool2d here
    build = {"mlp": mlp, "cnn": lambda: cnn(pool=nn.MaxPool2d)}[case]
    model, x = build(), batch(MODELS[case][1])
    y = draw_labels(model, x, likelihood)
    ext = backpack.extend(build())
    if likelihood == "categorical":
        loss_fn, factor = backpack.extend(nn.CrossEntropyLoss()), 1.0        # mean over N
    else:
        loss_fn, factor = backpack.extend(nn.MSELoss(reduction="sum")), 2.0 * len(x)  # Σ‖h−y‖²
    ref = {}
    for name, ext_cls in (("exact", DiagGGNExact), ("i2", DiagHessian)):
        ext.zero_grad()
        with backpack.backpack(ext_cls()):
            loss_fn(ext(x), y).backward()
        attr = "diag_ggn_exact" if name == "exact" else "diag_h"
        ref[name] = {k: getattr(p, attr) / factor for k, p in ext.named_parameters()}
    assert_close(diagonal_fisher(model, x, likelihood=likelihood, estimator="exact").values,
                 ref["exact"])
    assert_close(diagonal_fisher(model, x, likelihood=likelihood, estimator="i2",
                                 labels=y).values, ref["i2"])


def _per_draw_summands(model, xi, likelihood, draws, seed):
    """Î1 and Î2 summands of one input at `draws` model-sampled labels (autograd, flat θ)."""
    f = Flat(model)
    g = torch.Generator().manual_seed(seed)
    h = f(f.theta, xi[None])[0].detach()
    if likelihood == "categorical":
        ys = torch.multinomial(torch.softmax(h, 0), draws, replacement=True, generator=g)
    else:
        ys = h + torch.randn((draws, h.numel()), generator=g, dtype=F64)

    def loss(theta, y):
        return nll(f(theta, xi[None]), y[None], likelihood)

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(f.theta, ys)
    hess = torch.func.vmap(torch.func.hessian(loss), in_dims=(None, 0))(f.theta, ys)
    return grads ** 2, torch.diagonal(hess, dim1=1, dim2=2), f


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_variances_against_monte_carlo(likelihood):
    model, x = mlp(), batch((4,), n=2)
    draws = 2000
    got = {e: diagonal_fisher(model, x, likelihood=likelihood, estimator=e, variance=True,
                              labels=draw_labels(model, x, likelihood))
           for e in ("i1", "i2")}
    sample_var = {"i1": 0.0, "i2": 0.0}
    se2 = {"i1": 0.0, "i2": 0.0}
    for n, xi in enumerate(x):
        s1, s2, f = _per_draw_summands(model, xi, likelihood, draws, seed=10 + n)
        for e, summ in (("i1", s1), ("i2", s2)):
            v = summ.var(0)
            c = summ - summ.mean(0)
            sample_var[e] = sample_var[e] + v / len(x)
            se2[e] = se2[e] + torch.clamp((c ** 4).mean(0) - v ** 2, min=0) / draws / len(x) ** 2
    for e in ("i1", "i2"):
        closed = torch.cat([got[e].variance[k].reshape(-1) for k, _ in f.named])
        bound = 5 * torch.sqrt(se2[e]) + 1e-12
        assert torch.all((sample_var[e] - closed).abs() <= bound), e
        assert closed.abs().max() > 1e-6            # not a vacuous comparison of zeros


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_sampled_estimators_are_unbiased_and_bounds_hold(likelihood):
    model, x = cnn(), batch((1, 6, 6), n=3)
    m = 3000
    exact = diagonal_fisher(model, x, likelihood=likelihood, estimator="exact").values
    for est in ("i1", "i2"):
        g = torch.Generator().manual_seed(5)
        r = diagonal_fisher(model, x, likelihood=likelihood, estimator=est, mc_samples=m,
                            generator=g, variance=True)
        assert r.mc_samples == m
        for k in exact:
            # Var of the N·M-draw mean is mean-over-inputs V / (N M): 5 standard errors
            se = torch.sqrt(r.variance[k] / (len(x) * m))
            assert torch.all((r.values[k] - exact[k]).abs() <= 5 * se + 1e-10), (est, k)
            lo, hi, v = r.bounds.lower[k], r.bounds.upper[k], r.variance[k]
            tol = 1e-10 * (1 + hi.abs())
            assert torch.all(lo <= v + tol) and torch.all(v <= hi + tol), (est, k)


def test_v2_zero_on_last_layer_and_bias_free_relu_network():
    x = batch((4,), n=5)
    r = diagonal_fisher(mlp(), x, estimator="i2", variance=True)
    assert torch.all(r.variance["4.weight"] == 0) and torch.all(r.variance["4.bias"] == 0)
    assert r.variance["0.weight"].abs().max() > 0          # smooth hidden layers: V2 > 0
    relu = mlp(act=nn.ReLU, bias=False)
    r = diagonal_fisher(relu, x, estimator="i2", variance=True)
    exact = diagonal_fisher(relu, x, estimator="exact").values
    for k, v in r.variance.items():
        assert torch.all(v == 0), k
        np.testing.assert_allclose(r.values[k].numpy(), exact[k].numpy(), rtol=1e-12, atol=1e-15)


def test_chunking_and_groups():
    model, x = cnn(), batch((1, 6, 6), n=5)
    y = draw_labels(model, x, "categorical")
    whole = diagonal_fisher(model, x, estimator="i2", labels=y, variance=True)
    one = diagonal_fisher(model, x, estimator="i2", labels=y, variance=True, chunk_size=2)
    assert_close(one.values, whole.values)
    assert_close(one.variance, whole.variance)
    groups = whole.groups(0.1)
    assert list(groups) == ["0", "4"]
    size = sum(p.numel() for p in model[0].parameters())
    assert groups["0"].size == size
    mean_var = float(sum(whole.variance[k].sum() for k in ("0.weight", "0.bias")) / size)
    assert math.isclose(groups["0"].variance, mean_var, rel_tol=1e-12)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(3, dtype=F64))

    def forward(self, x):
        return x * self.s


@pytest.mark.parametrize("model, match", [
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).to(F64), r"'1' \(LayerNorm\)"),
    (lambda: nn.Sequential(nn.Linear(4, 3), Scale()).to(F64), r"'1' \(Scale\)"),
])
def test_i2_refuses_uncovered_modules(model, match):
    m = model()
    with pytest.raises(NotImplementedError, match=match):
        diagonal_fisher(m, batch((4,)), estimator="i2")
    diagonal_fisher(m, batch((4,)), estimator="i1")          # first derivatives only: fine


def test_i2_refuses_a_reused_layer():
    lin = nn.Linear(3, 3).to(F64)
    with pytest.raises(NotImplementedError, match="runs 2 times"):
        diagonal_fisher(nn.Sequential(lin, nn.Tanh(), lin), batch((3,)), estimator="i2")


def test_bad_input_errors():
    model, x = mlp(), batch((4,))
    with pytest.raises(ValueError, match="mc_samples must be >= 1"):
        diagonal_fisher(model, x, mc_samples=0)
    with pytest.raises(ValueError, match="C >= 2"):
        diagonal_fisher(mlp(c=1), x)
    with pytest.raises(ValueError, match=r"outputs shaped \(N, C\)"):
        diagonal_fisher(nn.Sequential(nn.Linear(4, 3), nn.Unflatten(1, (3, 1))).to(F64), x,
                        likelihood="gaussian")
    with pytest.raises(ValueError, match="needs targets"):
        diagonal_fisher(model, x, estimator="empirical")
    with pytest.raises(ValueError, match="does not use targets"):
        diagonal_fisher(model, x, estimator="i1", targets=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lie in \[0, C\)"):
        diagonal_fisher(model, x, labels=torch.full((4,), 3))
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).to(F64)
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\).*model.eval\(\)"):
        diagonal_fisher(bn, x)
    bad = mlp()
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        diagonal_fisher(bad, x)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_factored_dense_route_equals_generic_route(likelihood, monkeypatch):
    import fimcore_adapters._torch.diagonal as td

    model, x = mlp(), batch((4,), n=5)
    assert td.dense_layers(model, dict(model.named_parameters()), x) is not None
    y = draw_labels(model, x, likelihood)
    fast = {e: diagonal_fisher(model, x, likelihood=likelihood, estimator=e, labels=y,
                               variance=True, chunk_size=2) for e in ("i1", "i2")}
    monkeypatch.setattr(td, "dense_layers", lambda *args: None)
    for e, r in fast.items():
        slow = diagonal_fisher(model, x, likelihood=likelihood, estimator=e, labels=y,
                               variance=True)
        for a, b in ((r.values, slow.values), (r.variance, slow.variance),
                     (r.bounds.lower, slow.bounds.lower), (r.bounds.upper, slow.bounds.upper)):
            assert_close(a, b, rtol=1e-10, atol=1e-14)
