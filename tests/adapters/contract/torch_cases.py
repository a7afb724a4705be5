"""The adapter contract's model cases for PyTorch (see the package docstring).

The reference Gram is float64 and written here, sharing nothing with the adapter: row i of J is
B·∂L/∂θ_i, the gradient of the batch loss with respect to a copy θ_i of the parameters that
only sample i's computation uses. Where no layer couples samples that is ∇ℓ_i, one
``torch.autograd.grad`` of sample i's own loss per sample; for BatchNorm in train mode (batch
statistics) the network is written out by hand with one parameter copy per sample.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fimcore_adapters.torch import GramRecorder
from tests.adapters.contract import CASES, ContractRun, NotApplicable

B = 6


class _Scale(nn.Module):
    """A module the adapter has no rule for: it takes the generic path."""

    def __init__(self, n: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x) * self.scale


class _Tied(nn.Module):
    """Token embedding whose weight is also the output projection's (one Parameter in two
    modules), and a layer applied twice."""

    def __init__(self, vocab: int = 7, dim: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.emb(tokens).mean(1)))
        return self.head(torch.tanh(self.mix(h)))


def _case(case: str, gen: torch.Generator):
    if case == "dense":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        x = torch.randn(B, 5, generator=gen, dtype=torch.float64)
    elif case == "conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2),
                              nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
        x = torch.randn(B, 2, 6, 6, generator=gen, dtype=torch.float64)
    elif case == "norm_train":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(3 * 4 * 4, 3))
        x = torch.randn(B, 2, 6, 6, generator=gen, dtype=torch.float64)
    elif case == "embedding":
        model = nn.Sequential(nn.Embedding(9, 4), nn.Flatten(), nn.Linear(4 * 5, 3))
        x = torch.randint(0, 9, (B, 5), generator=gen)
    elif case == "tied":
        model = _Tied()
        x = torch.randint(0, 7, (B, 5), generator=gen)
    elif case == "generic":
        model = nn.Sequential(nn.Linear(5, 4), _Scale(4), nn.Linear(4, 3))
        x = torch.randn(B, 5, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(f"unknown case {case!r}; cases are {CASES}")
    model = model.double().train()
    classes = 7 if case == "tied" else 3
    y = torch.randint(0, classes, (B,), generator=gen)
    return model, x, y


def _flat_grad(model: nn.Module) -> np.ndarray:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).numpy().copy()


def _reference(model: nn.Module, x, y) -> np.ndarray:
    model = copy.deepcopy(model)
    params = list(model.parameters())
    rows = []
    for i in range(B):
        out = model(x)                                   # whole-batch forward every time
        loss_i = nn.functional.cross_entropy(out[i:i + 1], y[i:i + 1], reduction="sum")
        grads = torch.autograd.grad(loss_i, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                               for g, p in zip(grads, params)]))
    J = torch.stack(rows).numpy()                        # row i = B · ∂(ℓ_i / B)/∂θ
    return J @ J.T


def _reference_norm_train(model: nn.Sequential, x, y) -> np.ndarray:
    """Conv → BatchNorm (train mode, batch statistics) → ReLU → Linear written out by hand with
    one copy of every parameter per sample; row i = B·∂L/∂(sample i's copies), one backward."""
    conv, bn, lin = model[0], model[1], model[4]
    copies = [[p.detach().clone().requires_grad_() for p in model.parameters()] for _ in range(B)]
    h = torch.cat([nn.functional.conv2d(x[i:i + 1], copies[i][0], copies[i][1],
                                        stride=conv.stride, padding=conv.padding) for i in range(B)])
    mean = h.mean(dim=(0, 2, 3), keepdim=True)
    var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)     # biased, as in training
    xhat = (h - mean) / torch.sqrt(var + bn.eps)
    z = torch.relu(torch.cat([xhat[i:i + 1] * copies[i][2][None, :, None, None]
                              + copies[i][3][None, :, None, None] for i in range(B)])).flatten(1)
    out = torch.cat([nn.functional.linear(z[i:i + 1], copies[i][4], copies[i][5]) for i in range(B)])
    nn.functional.cross_entropy(out, y).backward()
    J = torch.stack([B * torch.cat([c.grad.flatten() for c in row]) for row in copies]).numpy()
    return J @ J.T


def run(case: str, strategy: str) -> ContractRun:
    gen = torch.Generator().manual_seed(CASES.index(case) + 11)
    torch.manual_seed(CASES.index(case))
    model, x, y = _case(case, gen)
    plain = copy.deepcopy(model)
    reference = (_reference_norm_train if case == "norm_train" else _reference)(model, x, y)
    try:
        rec = GramRecorder(model, strategy=strategy, keep_blocks=True)
    except ValueError as exc:       # a strategy the adapter refuses for this model
        raise NotApplicable(str(exc)) from exc
    with rec:
        nn.functional.cross_entropy(model(x), y).backward()
    result = rec.result()
    nn.functional.cross_entropy(plain(x), y).backward()
    return ContractRun(
        gram=result.gram.numpy().astype(np.float64), gram_dtype=str(result.gram.dtype).removeprefix("torch."),
        blocks={k: v.numpy() for k, v in result.blocks.items()}, grad=_flat_grad(model),
        plain_grad=_flat_grad(plain), reference_gram=reference, batch_size=B,
        loss_reduction="mean", report_paths={r.name: r.path for r in result.report})
