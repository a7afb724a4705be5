"""GramRecorder: bad input gives clear errors, and hooks never outlive a ``with`` block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fimcore_adapters.torch import GramRecorder, per_sample_gram


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def batch(n=4):
    return torch.randn(n, 3), torch.randint(0, 2, (n,))


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + ("forward" in m.__dict__) for m in model.modules())


def test_model_without_trainable_parameters():
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="no trainable parameters"):
        GramRecorder(model)
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GramRecorder(frozen)


def test_bad_options():
    model = mlp()
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        GramRecorder(model, loss_reduction="batchmean")
    with pytest.raises(ValueError, match="strategy must be one of"):
        GramRecorder(model, strategy="fast")
    with pytest.raises(ValueError, match="strategy values must be in"):
        GramRecorder(model, strategy={"0": "fast"})
    with pytest.raises(ValueError, match="strategy names modules that hold no selected parameter"):
        GramRecorder(model, strategy={"1": "factored"})
    with pytest.raises(ValueError, match="dtype must be None or a floating"):
        GramRecorder(model, dtype=torch.int64)
    with pytest.raises(ValueError, match="memory_budget must be None or a positive"):
        GramRecorder(model, memory_budget=0)
    with pytest.raises(ValueError, match="conv_method must be"):
        GramRecorder(model, conv_method="fft")
    with pytest.raises(ValueError, match="check_uses must be"):
        GramRecorder(model, check_uses="never")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        GramRecorder(lambda x: x)


def test_params_filter_errors():
    model = mlp()
    with pytest.raises(ValueError, match="names neither a trainable parameter nor a module"):
        GramRecorder(model, params=["5.weight"])
    with pytest.raises(ValueError, match="not a trainable parameter of the model"):
        GramRecorder(model, params=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="has no trainable parameters"):
        GramRecorder(model, params=["1"])
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        GramRecorder(model, params=[])
    with pytest.raises(TypeError, match="params= entries must be"):
        GramRecorder(model, params=[3])


def test_backward_outside_the_block():
    model = mlp()
    x, y = batch()
    rec = GramRecorder(model)
    with rec:
        loss = F.cross_entropy(model(x), y)
    with pytest.raises(RuntimeError, match="after its `with recorder:` block had ended"):
        loss.backward()
    with pytest.raises(RuntimeError, match="no loss.backward\\(\\) ran inside"):
        rec.gram()
    assert hook_count(model) == 0


def test_two_backwards_in_one_block():
    model = mlp()
    x, y = batch()
    rec = GramRecorder(model)
    with pytest.raises(RuntimeError, match="second backward pass reached layer"):
        with rec:
            loss = F.cross_entropy(model(x), y)
            loss.backward(retain_graph=True)
            loss.backward()
    assert hook_count(model) == 0


def test_second_forward_after_backward_in_one_block():
    model = mlp()
    x, y = batch()
    rec = GramRecorder(model)
    with pytest.raises(RuntimeError, match="ran a forward after a backward"):
        with rec:
            F.cross_entropy(model(x), y).backward()
            F.cross_entropy(model(x), y).backward()
    assert hook_count(model) == 0


def test_batch_dimension_differs_between_layers():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x).reshape(2, -1, 4)).sum(0)

    model = Bad()
    x, y = batch(4)
    with pytest.raises(ValueError, match="batch dimension \\(dim 0\\) must be the same"):
        with GramRecorder(model):
            F.cross_entropy(model(x), y[:2]).backward()
    assert hook_count(model) == 0


def test_non_finite_gradients_name_the_layer():
    model = mlp()
    x, y = batch()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    rec = GramRecorder(model)
    with rec:
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(FloatingPointError, match="non-finite per-sample gradients in layer '2'"):
        rec.gram()


def test_gram_inside_block_and_before_any_step():
    model = mlp()
    x, y = batch()
    rec = GramRecorder(model)
    with pytest.raises(RuntimeError, match="no loss.backward\\(\\) ran inside"):
        rec.gram()
    with rec:
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(RuntimeError, match="called inside the `with recorder:` block"):
            rec.gram()
    with pytest.raises(RuntimeError, match="cannot nest"):
        with rec:
            with rec:
                pass


def test_parameter_used_outside_its_module_is_refused():
    class TiedByFunction(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.mix = nn.Linear(3, 3)

        def forward(self, idx):
            return F.linear(self.mix(self.emb(idx)), self.emb.weight)   # weight used outside emb

    model = TiedByFunction()
    idx = torch.randint(0, 5, (4, 2))
    with pytest.raises(RuntimeError, match="parameter 'emb.weight' is used by .*linear outside"):
        with GramRecorder(model):
            model(idx).sum().backward()
    assert hook_count(model) == 0
    rec = GramRecorder(model, params=["mix"])       # excluding it is the documented way out
    with rec:
        model(idx).sum().backward()
    assert rec.gram().shape == (4, 4)


def test_l2_penalty_in_the_loss_is_refused():
    model = mlp()
    x, y = batch()
    with pytest.raises(RuntimeError, match="use the optimiser's weight_decay"):
        with GramRecorder(model):
            loss = F.cross_entropy(model(x), y) + 1e-4 * sum((p ** 2).sum() for p in model.parameters())
            loss.backward()


def test_parent_parameter_beside_parameterised_children_is_refused():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) * self.scale

    with pytest.raises(ValueError, match="parameters scale are owned by module '<model>'"):
        GramRecorder(Parent())
    GramRecorder(Parent(), params=["fc"])          # the documented way out


def test_non_scalar_loss_in_functional_form():
    model = mlp()
    x, y = batch()
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        per_sample_gram(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    assert hook_count(model) == 0


def test_hooks_removed_after_exception_in_forward_and_after_success():
    model = mlp()
    before = hook_count(model)
    rec = GramRecorder(model)
    with pytest.raises(ZeroDivisionError):
        with rec:
            model(torch.randn(2, 3))
            1 / 0
    assert hook_count(model) == before
    x, y = batch()
    with rec:
        F.cross_entropy(model(x), y).backward()
    assert hook_count(model) == before
    # an instance-level forward set by the user survives
    marker = model[0].forward
    model[0].forward = marker
    with rec:
        pass
    assert model[0].__dict__["forward"] is marker


def test_report_is_a_readable_table():
    model = mlp()
    x, y = batch()
    rec = GramRecorder(model)
    with rec:
        F.cross_entropy(model(x), y).backward()
    rep = rec.report()
    text = str(rep)
    assert "layer" in text.splitlines()[0] and "factored" in text
    assert [r.name for r in rep] == ["0", "2"]
    total = sum(r.trace for r in rep)
    assert abs(total - float(rec.gram().trace())) <= 1e-5 * abs(total)
    assert "factored" in str(rep[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gram_stays_on_device():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3)).cuda()
    x = torch.randn(6, 3, 7, 7, device="cuda")
    y = torch.randint(0, 3, (6,), device="cuda")
    rec = GramRecorder(model)
    with rec:
        F.cross_entropy(model(x), y).backward()
    G = rec.gram()
    assert G.device.type == "cuda" and G.shape == (6, 6)
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(G.sum(), 36 * flat @ flat, rtol=1e-4, atol=1e-6)
