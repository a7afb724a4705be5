"""Property tests of GramRecorder: random convolution hyper-parameters, float32 accuracy bound."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fimcore_adapters.torch import GramRecorder

from ._torch_reference import contribution_gram, loop_gram


def rel(a, b):
    return float((a - b).norm() / b.norm())


@st.composite
def conv_configs(draw):
    dim = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.sampled_from([0, 1, "same", "valid"]))
    if padding == "same":
        stride = 1
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    if mode != "zeros" and padding in ("same", "valid"):
        padding = 1
    size = draw(st.integers(dilation * (k - 1) + 2, 7))
    bias = draw(st.booleans())
    method = draw(st.sampled_from(["grouped", "unfold", "channels_last"]))
    strategy = draw(st.sampled_from(["auto", "factored", "materialize"]))
    batch = draw(st.integers(1, 4))
    return dict(dim=dim, groups=groups, c_in=c_in, c_out=c_out, k=k, stride=stride, dilation=dilation,
                padding=padding, mode=mode, size=size, bias=bias, method=method, strategy=strategy,
                batch=batch)


@settings(max_examples=25, deadline=None)
@given(cfg=conv_configs(), seed=st.integers(0, 2 ** 16))
def test_random_convolutions_match_the_per_sample_loop(cfg, seed):
    torch.manual_seed(seed)
    conv_cls = nn.Conv1d if cfg["dim"] == 1 else nn.Conv2d
    conv = conv_cls(cfg["c_in"], cfg["c_out"], cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
                    dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"],
                    padding_mode=cfg["mode"]).double()
    x = torch.randn(cfg["batch"], cfg["c_in"], *([cfg["size"]] * cfg["dim"]), dtype=torch.float64)
    target = torch.randn_like(conv(x))
    model = nn.Sequential(conv, nn.Tanh())
    loss_mean = lambda o, t: ((o - t) ** 2).sum() / o.shape[0]
    loss_one = lambda o, t: ((o - t) ** 2).sum()
    G_ref, _ = loop_gram(model, loss_one, x, target)
    model.zero_grad()
    loss_mean(model(x), target).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    rec = GramRecorder(model, strategy=cfg["strategy"], conv_method=cfg["method"])
    with rec:
        loss_mean(model(x), target).backward()
    assert rel(rec.gram(), G_ref) <= 1e-10
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-13)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2 ** 16), strategy=st.sampled_from(["auto", "factored", "materialize"]))
def test_float32_accumulation_within_documented_bound(seed, strategy):
    """|G32_ij − G*_ij| ≤ 1e-4·sqrt(G*_ii·G*_jj) (the bound stated in GramRecorder's docstring),
    G* the float64 per-sample contributions of the batch backward of a float64 copy of the model
    (BatchNorm couples the samples), computed without the recorder."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 4, (8,))
    G_ref, _ = contribution_gram(copy.deepcopy(model).double(), F.cross_entropy, x.double(), y, scale=8)
    rec = GramRecorder(model, strategy=strategy)
    with rec:
        F.cross_entropy(model(x), y).backward()
    g32 = rec.gram()
    assert rec.grad_dtype == torch.float32 and g32.dtype == torch.float32
    d = G_ref.diagonal().sqrt()
    assert float(((g32.double() - G_ref).abs() / torch.outer(d, d)).max()) <= 1e-4


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ones_gram_ones_equals_scaled_batch_gradient(reduction):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(27, 5), nn.LayerNorm(5), nn.Linear(5, 2)).double()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    rec = GramRecorder(model, loss_reduction=reduction)
    with rec:
        F.cross_entropy(model(x), y, reduction=reduction).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    scale = 36 if reduction == "mean" else 1
    torch.testing.assert_close(rec.gram().sum(), scale * flat @ flat, rtol=1e-12, atol=0)
