"""c_k of a real float32 network equals that of the same weights in float64 (resolved rank).

A ResNet-20 (width 8, BatchNorm in train mode) is trained a few hundred iterations on the real
MNIST-5k digits in float32; then, on ten batches of 64 (drawn with replacement, so some
batches repeat a sample and their Gram has an exact null direction), the float32 recorder's
Gram (float32 gradients, float32 accumulation) and the Gram of a float64 copy of the same
weights must give the same c_k to 1 %. The legacy tolerance B·eps32·λ_max cut these Grams'
small eigenvalues (their c_k lie above 1/(B·eps32) ≈ 1.3e5 in most batches).
"""

from __future__ import annotations

import copy

import pytest

import fimcore
from tests.conftest import import_backend


@pytest.mark.slow
def test_float32_resnet_c_k_matches_float64_weights(one_thread):
    torch = import_backend("torch")
    import torch.nn.functional as F

    from fimcore_adapters.torch import GramRecorder
    from reference_training.data import load_dataset, normalise
    from reference_training.models import build_model

    torch.manual_seed(0)
    ds = load_dataset("mnist5k")
    model = build_model("resnet20", in_channels=1, num_classes=10, image_size=28, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(250):
        idx = torch.randint(0, len(ds.train_y), (16,), generator=gen)
        x = normalise(ds.train_x[idx], ds.mean, ds.std)
        opt.zero_grad()
        F.cross_entropy(model(x), ds.train_y[idx]).backward()
        opt.step()
    model64 = copy.deepcopy(model).double()

    def resolution(net, x, y):
        rec = GramRecorder(net, conv_method="grouped")
        with rec:
            F.cross_entropy(net(x), y).backward()
        net.zero_grad(set_to_none=True)
        return fimcore.resolution(rec.gram(), grad_dtype=rec.grad_dtype)

    legacy_cut = 0
    for _ in range(10):
        idx = torch.randint(0, len(ds.train_y), (64,), generator=gen)
        x, y = normalise(ds.train_x[idx], ds.mean, ds.std), ds.train_y[idx]
        r32, r64 = resolution(model, x, y), resolution(model64, x.double(), y)
        distinct = len(set(idx.tolist()))
        assert int(r32.rank) == int(r64.rank) == distinct
        assert float(r32.c) == pytest.approx(float(r64.c), rel=1e-2)
        assert not bool(r32.limited)
        legacy_cut += float(r32.c) > 1 / fimcore.default_rtol(64, torch.float32)
    assert legacy_cut >= 1
