"""GramRecorder: every route by which a selected parameter can reach the loss outside its layer.

A use outside the forward of the module that owns the parameter has no recorded per-sample
gradient, so G would miss it. Each route below is either caught by the torch-call check
(positional, keyword, nested-container arguments; functions, tensor methods, properties), or by the
whole-batch identity ``1ᵀG1 = B²‖∇L‖²`` (``‖∇L‖²`` for a sum) for routes no torch call shows. The
same routes kept inside the owning module are exact: checked against a float64 per-sample loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fimcore_adapters.torch import GramRecorder

from ._torch_reference import loop_gram

B, V, D = 4, 5, 3


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + ("forward" in m.__dict__) for m in model.modules()) + sum(
        len(p._backward_hooks or {}) for p in model.parameters())


_OTHER = nn.Linear(D, V, bias=False, dtype=torch.float64)   # not part of any model below

# every way a weight w (V, D) can be applied to h (B, T, D) to give (B, T, V)-shaped logits
ROUTES = {
    "positional": lambda h, w: F.linear(h, w),
    "keyword": lambda h, w: F.linear(h, weight=w),
    "keyword only bias": lambda h, w: F.linear(h, torch.ones(V, D, dtype=h.dtype), bias=w[:, 0]),
    "all keywords": lambda h, w: F.linear(input=h, weight=w),
    "unpacked dict": lambda h, w: F.linear(h, **{"weight": w}),
    "tensor method t()": lambda h, w: h.matmul(w.t()),
    "property .T": lambda h, w: h @ w.T,
    "property .mT": lambda h, w: h @ w.mT,
    "indexing": lambda h, w: h @ w[:, :].transpose(0, 1),
    "operator": lambda h, w: (h.unsqueeze(-2) * w).sum(-1),
    "list argument": lambda h, w: torch.stack([h @ r for r in torch.unbind(w)], -1),
    "list of list": lambda h, w: h @ torch.cat([w[:2], w[2:]]).T,
    "einsum operands": lambda h, w: torch.einsum("btd,vd->btv", h, w),
    "functional_call into another module": lambda h, w: torch.func.functional_call(
        _OTHER, {"weight": w}, (h,)),
}


class TiedOutside(nn.Module):
    """The embedding's weight applied again in the parent's forward (outside ``emb``)."""

    def __init__(self, route):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.route = route

    def forward(self, idx):
        return ROUTES[self.route](self.mix(self.emb(idx)), self.emb.weight)


class TiedInside(nn.Module):
    """One module owning w that looks tokens up in w and applies w again by the same route."""

    def __init__(self, route):
        super().__init__()
        self.w = nn.Parameter(torch.randn(V, D))
        self.route = route

    def forward(self, idx):
        return ROUTES[self.route](torch.tanh(F.embedding(idx, weight=self.w)), self.w)


def seq_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")


def gram(model, idx, y, **options):
    rec = GramRecorder(model, loss_reduction="sum", **options)
    model.zero_grad(set_to_none=True)
    with rec:
        seq_loss(model(idx), y).backward()
    return rec.gram()


@pytest.fixture
def data():
    torch.manual_seed(0)
    return torch.randint(0, V, (B, 2)), torch.randint(0, V, (B, 2))


@pytest.mark.parametrize("route", ROUTES)
def test_use_outside_the_owner_is_refused_by_every_route(route, data):
    torch.manual_seed(1)
    model = TiedOutside(route).double()
    idx, y = data
    G_ref, _ = loop_gram(model, seq_loss, idx, y)
    # reference sanity: the loop rows sum to autograd's batch gradient of the same model
    model.zero_grad(set_to_none=True)
    seq_loss(model(idx), y).backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(G_ref.sum(), flat.dot(flat), rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="parameter 'emb.weight' is used by .* outside the forward"):
        gram(model, idx, y)
    assert hook_count(model) == 0
    # excluding the tied parameter is the documented way out, and the rest is exact
    G = gram(model, idx, y, params=["mix"])
    G_mix, _ = loop_gram(model, seq_loss, idx, y, params=list(model.mix.parameters()))
    torch.testing.assert_close(G, G_mix, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("route", ROUTES)
def test_the_same_route_inside_the_owning_module_is_exact(route, data):
    torch.manual_seed(2)
    model = TiedInside(route).double()
    idx, y = data
    G_ref, _ = loop_gram(model, seq_loss, idx, y)
    G = gram(model, idx, y)
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12)



# ------------------------------------------------------------ routes no torch call shows
class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        return h * w

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        return g * w, (g * h).sum(0)


class Net(nn.Module):
    def __init__(self, extra=None):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)
        self.extra = extra

    def forward(self, x, wt=None):
        h = torch.tanh(self.fc(x))
        if self.extra == "function":
            h = _Scale.apply(h, self.fc.bias)    # no torch call with grad: the forward runs no_grad
        if wt is not None:
            h = h + x @ wt                    # a view of fc.weight taken before the block
        return self.out(h)


def ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def xy():
    torch.manual_seed(4)
    return torch.randn(B, 3, dtype=torch.float64), torch.randint(0, 2, (B,))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_custom_autograd_function_taking_a_parameter_is_refused_by_the_identity(reduction):
    torch.manual_seed(5)
    model = Net("function").double()
    x, y = xy()
    loss_fn = ce_sum if reduction == "sum" else F.cross_entropy
    rec = GramRecorder(model, loss_reduction=reduction)
    with pytest.raises(RuntimeError, match="do not add up to autograd's gradient: 1ᵀG1 / \\(B²‖∇L‖²\\)"):
        with rec:
            loss_fn(model(x), y).backward()
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="no Gram matrix was recorded"):
        rec.gram()
    # excluding the parameter the Function takes makes the rest exact
    rec = GramRecorder(model, loss_reduction="sum", params=["fc.weight", "out"])
    with rec:
        ce_sum(model(x), y).backward()
    G_ref, _ = loop_gram(model, ce_sum, x, y, params=[model.fc.weight, *model.out.parameters()])
    torch.testing.assert_close(rec.gram(), G_ref, rtol=1e-10, atol=1e-12)


def test_view_taken_before_the_block_is_refused_by_the_identity():
    torch.manual_seed(6)
    model = Net().double()
    x, y = xy()
    wt = model.fc.weight.t()                  # outside the block: no torch call to see inside it
    with pytest.raises(RuntimeError, match="a view or copy of it made before the `with recorder:`"):
        with GramRecorder(model, loss_reduction="sum"):
            ce_sum(model(x, wt), y).backward()
    assert hook_count(model) == 0


def test_gradient_hook_that_changes_a_gradient_is_refused_by_the_identity():
    torch.manual_seed(7)
    model = Net().double()
    x, y = xy()
    handle = model.out.weight.register_hook(lambda g: 3 * g)
    try:
        with pytest.raises(RuntimeError, match="or a gradient hook that changes its gradient"):
            with GramRecorder(model, loss_reduction="sum"):
                ce_sum(model(x), y).backward()
    finally:
        handle.remove()
    G_ref, _ = loop_gram(model, ce_sum, x, y)           # without the hook: exact
    rec = GramRecorder(model, loss_reduction="sum")
    with rec:
        ce_sum(model(x), y).backward()
    torch.testing.assert_close(rec.gram(), G_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("check_uses", ["first", "always"])
def test_identity_is_checked_on_the_steps_check_uses_selects(check_uses):
    torch.manual_seed(8)
    model = Net().double()
    x, y = xy()
    rec = GramRecorder(model, loss_reduction="sum", check_uses=check_uses)
    with rec:                                   # step 1: clean
        ce_sum(model(x), y).backward()
    model.extra = "function"                    # step 2: the use changes
    if check_uses == "always":
        with pytest.raises(RuntimeError, match="do not add up"):
            with rec:
                ce_sum(model(x), y).backward()
    else:                                       # documented: only the first measured step is checked
        with rec:
            ce_sum(model(x), y).backward()
        G = rec.gram()
        flat = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert float(G.sum()) < float(flat.dot(flat)) * (1 - 1e-6)     # the miss the check exists for
    assert hook_count(model) == 0


def test_sparse_embedding_gradients_pass_the_identity():
    torch.manual_seed(9)
    sparse = nn.Sequential(nn.Embedding(6, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)).double()
    dense = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    dense.load_state_dict(sparse.state_dict())
    idx, y = torch.tensor([[1, 1], [2, 3], [1, 5], [0, 1]]), torch.tensor([0, 1, 1, 0])
    rec = GramRecorder(sparse)
    with rec:
        F.cross_entropy(sparse(idx), y).backward()
    G_ref, _ = loop_gram(dense, ce_sum, idx, y)
    torch.testing.assert_close(rec.gram(), G_ref, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ outputs that feed each other
class Chained(nn.Module):
    """Two outputs, the second computed from the first (as LSTMCell's h' from c'), or one twice."""

    def __init__(self, twice):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))
        self.twice = twice

    def forward(self, x):
        c = torch.tanh(x @ self.w)
        return (c, c) if self.twice else (c, torch.sigmoid(c) * x)


@pytest.mark.parametrize("twice", [False, True], ids=["dependent", "same tensor twice"])
def test_generic_outputs_feeding_each_other_get_only_their_outside_gradient(twice):
    torch.manual_seed(10)
    model = Chained(twice).double()
    x = torch.randn(B, 3, dtype=torch.float64)

    def loss(out, _):
        return out[0].square().sum() + (out[1] * torch.arange(3.0, dtype=out[1].dtype)).sum()

    G_ref, _ = loop_gram(model, loss, x, x)
    rec = GramRecorder(model, loss_reduction="sum")
    with rec:
        loss(model(x), None).backward()
    torch.testing.assert_close(rec.gram(), G_ref, rtol=1e-10, atol=1e-12)


def test_identity_catches_the_miss_in_float32_too():
    torch.manual_seed(11)
    model = Net("function")                                       # float32
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with pytest.raises(RuntimeError, match="do not add up"):
        with GramRecorder(model):
            F.cross_entropy(model(x), y).backward()
    model.extra = None                                            # the clean float32 model passes
    rec = GramRecorder(model)
    model.zero_grad(set_to_none=True)
    with rec:
        F.cross_entropy(model(x), y).backward()
    G = rec.gram().double()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    s = float(G.diagonal().sqrt().sum())
    assert abs(float(G.sum()) - 64 * float(flat.dot(flat))) <= 1e-4 * s * s   # float32 entry bound
