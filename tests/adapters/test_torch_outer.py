"""``add_outer``: G += J Jᵀ from one block triangle, against dot products written out here, and the
recorder's G with the split active (B ≥ MIN_BATCH) against a float64 per-sample loop."""

from __future__ import annotations

import pytest

from fimcore_adapters._torch import outer
from fimcore_adapters.torch import GramRecorder
from tests.conftest import import_backend

torch = import_backend("torch")
F = torch.nn.functional


@pytest.mark.parametrize("blocks", [2, 3, 4])
@pytest.mark.parametrize("B,p", [(5, 3000), (64, 1024), (65, 1500), (130, 2000), (128, 10)])
def test_add_outer_equals_the_dot_products(monkeypatch, blocks, B, p):
    monkeypatch.setattr(outer, "BLOCKS", blocks)
    gen = torch.Generator().manual_seed(B + p)
    J = torch.randn(B, p, generator=gen, dtype=torch.float64)
    start = torch.randn(B, B, generator=gen, dtype=torch.float64)
    start = start + start.T                                # a symmetric earlier contribution
    acc = start.clone()
    outer.add_outer(acc, J)
    ref = start + torch.stack([J @ J[i] for i in range(B)])   # row i: one matrix-vector product
    assert torch.allclose(acc, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    if B >= outer.MIN_BATCH and p >= outer.MIN_COLUMNS:      # the upper blocks are exact mirrors
        D, size = acc - start, -(-B // blocks)
        for i0 in range(size, B, size):
            i1 = min(i0 + size, B)
            assert torch.equal(D[:i0, i0:i1], D[i0:i1, :i0].T)


def test_recorder_with_the_split_matches_a_per_sample_loop():
    torch.manual_seed(0)
    B = outer.MIN_BATCH + 3
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 16, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 6 * 6, 3)).double()
    x = torch.randn(B, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    params = list(model.parameters())
    rows = []
    for i in range(B):
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum"), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    J = torch.stack(rows)
    rec = GramRecorder(model, loss_reduction="sum", strategy="materialize")
    with rec:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    G = rec.gram()
    assert float((G - J @ J.T).norm() / (J @ J.T).norm()) < 1e-12
    assert 16 * 2 * 9 < outer.MIN_COLUMNS <= 16 * 6 * 6 * 3   # the conv stays whole, the dense layer splits
