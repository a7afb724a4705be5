"""PyTorch adapter: user-written layer rules (``register_layer_rule``).

A custom module ``y = s·(x Wᵀ + b)`` with a learnable scalar s gets a rule written here; the Gram
it gives equals a float64 loop of ``torch.autograd.grad`` of one sample's loss (no code shared
with the adapter), and the report names the rule. Bad registrations fail with clear errors.
"""

from __future__ import annotations

import pytest

from tests.conftest import import_backend

torch = import_backend("torch")
nn = torch.nn
F = torch.nn.functional

from fimcore_adapters.torch import GramRecorder, LayerRule, register_layer_rule  # noqa: E402

D = torch.float64


def scaled_linear_type():
    """A fresh module type per test (the registry is global)."""

    class ScaledLinear(nn.Module):
        def __init__(self, d_in, d_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_out, d_in, dtype=D) / d_in ** 0.5)
            self.bias = nn.Parameter(torch.randn(d_out, dtype=D))
            self.scale = nn.Parameter(torch.tensor(1.7, dtype=D))

        def forward(self, x):
            return self.scale * F.linear(x, self.weight, self.bias)

    return ScaledLinear


class ScaledLinearRule(LayerRule):
    """dℓ_i/dW = s·Σ_t δ_itᵀ x_it, dℓ_i/db = s·Σ_t δ_it, dℓ_i/ds = Σ_t δ_it·(x_it Wᵀ + b)."""

    name = "scaled-linear"

    def parameters(self, module):
        return [module.weight, module.bias, module.scale]

    def forward(self, module, call, args, kwargs):
        x = args[0]
        z = F.linear(x, module.weight, module.bias)
        y = module.scale * z
        return y, {"x": x.detach(), "z": z.detach(), "watch": [y]}

    def per_sample(self, module, capture, deltas):
        (d,) = deltas
        B = d.shape[0]
        x = capture["x"].reshape(B, -1, capture["x"].shape[-1])
        z = capture["z"].reshape(B, -1, d.shape[-1])
        d = d.reshape(B, -1, d.shape[-1])
        s = module.scale.detach()
        return [s * torch.einsum("bto,bti->boi", d, x), s * d.sum(1), (d * z).sum((1, 2))]


def loop_gram(model, loss_fn, x, y):
    """float64 reference: ∇ℓ_i of each sample alone, rows stacked into J, G = J Jᵀ."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    J = torch.stack(rows)
    return J @ J.T


@pytest.mark.parametrize("shape", [(6, 3), (5, 4, 3)], ids=["BxD", "BxTxD"])
def test_registered_rule_gives_the_loop_gram_and_is_reported(shape):
    ScaledLinear = scaled_linear_type()
    register_layer_rule(ScaledLinear, ScaledLinearRule())
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    x = torch.randn(*shape, dtype=D)
    y = torch.randn(*shape[:-1], 2, dtype=D)
    rec = GramRecorder(model, keep_blocks=True)
    with rec:
        F.mse_loss(model(x), y).backward()
    B = shape[0]
    # ℓ_i is sample i's share of the batch-mean loss times B (a mean over its own elements)
    expected = loop_gram(model, F.mse_loss, x, y)
    assert torch.allclose(rec.gram(), expected, rtol=1e-10, atol=1e-12)
    rows = {r.name: r for r in rec.report()}
    assert rows["0"].module == "ScaledLinear"
    assert "scaled-linear rule" in rows["0"].reason and rows["0"].params == 4 * 3 + 4 + 1
    assert rows["2"].path in ("factored", "materialize") and "scaled-linear" not in rows["2"].reason
    # the custom module's own block is J_0 J_0ᵀ with J_0 its parameters' columns only
    first = list(model[0].parameters())
    J0 = []
    for i in range(B):
        loss = F.mse_loss(model(x[i:i + 1]), y[i:i + 1])
        J0.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, first)]))
    J0 = torch.stack(J0)
    assert torch.allclose(rec.blocks()["0"], J0 @ J0.T, rtol=1e-10, atol=1e-12)


def test_rule_as_decorator_and_generic_strategy_still_available():
    ScaledLinear = scaled_linear_type()

    @register_layer_rule(ScaledLinear)
    class Rule(ScaledLinearRule):
        name = "decorated"

    torch.manual_seed(1)
    model = nn.Sequential(ScaledLinear(3, 2))
    x, y = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    grams = {}
    for strategy in ("auto", "generic"):
        rec = GramRecorder(model, strategy=strategy)
        with rec:
            F.mse_loss(model(x), y).backward()
        grams[strategy] = rec.gram()
        reason = rec.report()[0].reason
        assert ("decorated rule" in reason) == (strategy == "auto"), reason
    assert torch.allclose(grams["auto"], grams["generic"], rtol=1e-10, atol=1e-12)


def test_bad_registrations_are_refused():
    ScaledLinear = scaled_linear_type()
    with pytest.raises(TypeError, match="torch.nn.Module subclass; received 3"):
        register_layer_rule(3, ScaledLinearRule())
    with pytest.raises(TypeError, match="LayerRule instance or subclass; received"):
        register_layer_rule(ScaledLinear, object())
    with pytest.raises(TypeError, match="LayerRule instance or subclass"):
        register_layer_rule(ScaledLinear, lambda m: None)
    register_layer_rule(ScaledLinear, ScaledLinearRule())
    with pytest.raises(ValueError, match="ScaledLinear already has the rule 'scaled-linear'; pass override=True"):
        register_layer_rule(ScaledLinear, ScaledLinearRule())
    with pytest.raises(ValueError, match="Linear already has a built-in rule; pass override=True"):
        register_layer_rule(nn.Linear, ScaledLinearRule())

    class Other(ScaledLinearRule):
        name = "other"

    register_layer_rule(ScaledLinear, Other(), override=True)
    model = ScaledLinear(2, 2)
    with GramRecorder(model) as rec:
        model(torch.randn(3, 2, dtype=D)).sum().backward()
    assert rec.report()[0].reason.startswith("other rule")


def test_rule_leaving_a_selected_parameter_uncovered_is_refused():
    ScaledLinear = scaled_linear_type()

    class NoScale(ScaledLinearRule):
        name = "no-scale"

        def parameters(self, module):
            return [module.weight, module.bias]

    register_layer_rule(ScaledLinear, NoScale())
    model = ScaledLinear(2, 2)
    with pytest.raises(ValueError, match=r"rule 'no-scale' .* does not cover its selected parameters \['scale'\]"):
        GramRecorder(model)
    GramRecorder(model, params=["weight", "bias"])      # leaving it out of G is allowed


def test_rule_returning_the_wrong_blocks_is_named():
    ScaledLinear = scaled_linear_type()

    class Short(ScaledLinearRule):
        name = "short"

        def per_sample(self, module, capture, deltas):
            return super().per_sample(module, capture, deltas)[:2]

    register_layer_rule(ScaledLinear, Short())
    model = ScaledLinear(2, 2)
    with pytest.raises(ValueError, match="rule 'short' .* returned 2 per-sample blocks; it covers 3"):
        with GramRecorder(model):
            model(torch.randn(3, 2, dtype=D)).sum().backward()
