"""Per-sample convolution gradients formed in sample chunks into the recorder's shared workspace.

The chunk size is forced down to one or a few samples, so every layer's gradients are written in
several calls into one buffer that the next layer and the next step overwrite. G and the batch
gradient must still equal a float64 loop written here (one backward per sample), on two
consecutive steps with different weights (a stale or aliased buffer would show there), for each
per-sample method, with channel groups, strides and dilation.
"""

from __future__ import annotations

import pytest

from fimcore_adapters._torch import convps
from fimcore_adapters.torch import GramRecorder
from tests.conftest import import_backend

torch = import_backend("torch")
nn = torch.nn
F = torch.nn.functional

B = 5


class Net(nn.Module):
    """Three convolutions of different sizes (one grouped, one strided and dilated) and a head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2)
        self.c3 = nn.Conv2d(6, 5, 1, bias=False)
        self.fc = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x))
        x = torch.tanh(self.c3(x))
        return self.fc(x.flatten(1))


def loop_reference(model, x, y):
    """(G, batch gradient) in float64 from one backward per sample (sum reduction)."""
    params = [p for p in model.parameters()]
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)
    return J @ J.T, J.sum(0)


@pytest.mark.parametrize("method", ["grouped", "unfold", "channels_last"])
@pytest.mark.parametrize("chunk_bytes", [1, 2048])
def test_chunked_per_sample_gradients_match_a_loop_over_two_steps(monkeypatch, method, chunk_bytes):
    monkeypatch.setattr(convps, "SAMPLE_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(convps, "CHUNK_ABOVE_BYTES", 0)
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(B, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    rec = GramRecorder(model, loss_reduction="sum", strategy="materialize", conv_method=method)
    for step in range(2):
        G_ref, g_ref = loop_reference(model, x, y)
        model.zero_grad(set_to_none=True)
        with rec:
            F.cross_entropy(model(x), y, reduction="sum").backward()
        G = rec.gram()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert float((G - G_ref).norm() / G_ref.norm()) < 1e-12, (method, step)
        assert float((g - g_ref).norm() / g_ref.norm()) < 1e-12, (method, step)
        with torch.no_grad():                       # new weights for the second step
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    paths = {r.name: r.path for r in rec.report()}
    assert paths["c1"] == paths["c2"] == paths["c3"] == "materialize"


def test_sample_chunk_bounds_and_workspace_reuse():
    spec = convps.ConvSpec(2, (3, 3), [1, 1], [1, 1], 1, 16, 16)
    # 16 channels · 9 taps · 1024 positions · 4 bytes = 589,824 bytes per sample: 75 MB at B = 128
    assert convps.sample_chunk(spec, 128, 1024, 4) == convps.SAMPLE_CHUNK_BYTES // 589_824
    assert convps.sample_chunk(spec, 32, 1024, 4) == 32            # 18.9 MB: one call
    assert convps.sample_chunk(spec, 4, 1024, 4) == 4
    assert convps.sample_chunk(spec, 128, 10 ** 9, 8) == 1
    ws = convps.Workspace()
    a = ws.take((4, 6), torch.float32, torch.device("cpu"))
    b = ws.take((2, 3), torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr() and b.is_contiguous()   # the same buffer, reused
    c = ws.take((10, 10), torch.float32, torch.device("cpu"))    # grown for a larger layer
    assert c.shape == (10, 10) and c.is_contiguous()
    d = ws.take((3,), torch.float64, torch.device("cpu"))        # one buffer per dtype
    assert d.dtype == torch.float64
