"""The torch generic path sees coupling through a parameter's Jacobian, not only through outputs."""

from __future__ import annotations

import pytest

from tests.conftest import import_backend

torch = import_backend("torch")
nn = torch.nn

from fimcore_adapters.torch import GramRecorder  # noqa: E402

B = 6


class _Gated(nn.Module):
    """``h·s + a·mean_b(h)``: at ``a = 0`` every output equals the per-sample re-run's, but the
    gradient of ``a`` reads the batch mean, so rows of ``a`` couple samples."""

    def __init__(self, n: int, a: float):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.0, n, dtype=torch.float64))
        self.a = nn.Parameter(torch.full((n,), a, dtype=torch.float64))

    def forward(self, h):
        return h * self.s + self.a * h.mean(0)


def _reference(model, x, y):
    """Row i = B·∂L/∂θ_i with one copy of every parameter per sample, the network by hand."""
    lin0, gated, lin3 = model[0], model[1], model[3]
    copies = [[p.detach().clone().requires_grad_() for p in model.parameters()] for _ in range(B)]
    h = torch.stack([nn.functional.linear(x[i], c[0], c[1]) for i, c in enumerate(copies)])
    mean = h.mean(0)
    z = torch.tanh(torch.stack([h[i] * c[2] + c[3] * mean for i, c in enumerate(copies)]))
    out = torch.stack([nn.functional.linear(z[i], c[4], c[5]) for i, c in enumerate(copies)])
    nn.functional.cross_entropy(out, y).backward()
    J = torch.stack([B * torch.cat([p.grad.flatten() for p in c]) for c in copies])
    return J @ J.T


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("a", [0.0, 0.3])
def test_parameter_multiplying_a_batch_statistic_is_coupled_even_at_zero(a, mode, monkeypatch):
    if mode == "reverse":               # as for an op without a forward-mode rule (CPU flash attention)
        import fimcore_adapters._torch.generic as generic

        def no_forward_mode(*args, **kwargs):
            raise NotImplementedError("Trying to use forward AD with an op that does not support it")

        monkeypatch.setattr(generic, "jvp", no_forward_mode)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Gated(4, a), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(B, 3, dtype=torch.float64), torch.randint(0, 2, (B,))
    rec = GramRecorder(model)
    with rec:
        nn.functional.cross_entropy(model(x), y).backward()
    G = rec.gram()
    torch.testing.assert_close(G, _reference(model, x, y), rtol=1e-10, atol=1e-12)
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(G.sum()) == pytest.approx(B**2 * float(g @ g), rel=1e-10)
    paths = {r.name: r.path for r in rec.report()}
    assert paths["1"] == "generic-coupled"
    why = {r.name: r.reason for r in rec.report()}["1"]
    assert ("Jacobian" in why) if a == 0.0 else ("re-run differs" in why), why

