"""GramRecorder against slow float64 references that share no code with it.

References (tests/adapters/_torch_reference.py): a per-sample loop (one backward per sample) for
models without cross-sample layers, and the per-sample contributions of the batch backward
(masked cotangents, one autograd call per module and sample) for BatchNorm in train mode; BackPACK
``BatchGrad`` as a second oracle there. Every forced strategy must agree with the references.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fimcore_adapters.torch import GramRecorder, per_sample_gram
from tests.conftest import import_backend

from ._torch_reference import contribution_gram, loop_gram

TOL = 1e-10
STRATEGIES = ["auto", "factored", "materialize", "generic"]
B = 5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def record(model, x, y, loss_fn, **options):
    rec = GramRecorder(model, **options)
    model.zero_grad(set_to_none=True)
    with rec:
        loss = loss_fn(model(x), y)
        loss.backward()
    return rec.gram(), rec


def ce_sum(out, t):
    return F.cross_entropy(out, t, reduction="sum")


def plain_grads(model, x, y, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_grads_match(model, reference):
    for p, g in zip(model.parameters(), reference):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def check_against_loop(model, x, y, loss_fn, per_sample_loss, strategies=STRATEGIES, **options):
    model = model.double()
    G_ref, J = loop_gram(model, per_sample_loss, x, y)
    want_grads = plain_grads(model, x, y, loss_fn)
    for strategy in strategies:
        G, rec = record(model, x, y, loss_fn, strategy=strategy, **options)
        assert G.dtype == torch.float64 and G.shape == (x.shape[0],) * 2
        assert rel(G, G_ref) <= TOL, (strategy, rel(G, G_ref), str(rec.report()))
        assert_grads_match(model, want_grads)
    return rec


# ---------------------------------------------------------------- dense and sequence models
def test_mlp_all_strategies():
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(B, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    rec = check_against_loop(model, x, y, F.cross_entropy, ce_sum)
    assert {r.path for r in rec.report()} == {"generic"}


def test_mlp_auto_takes_factored_path_and_linear_without_bias():
    model = nn.Sequential(nn.Linear(6, 9, bias=False), nn.Tanh(), nn.Linear(9, 3))
    x = torch.randn(B, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    rec = check_against_loop(model, x, y, F.cross_entropy, ce_sum, strategies=["auto"])
    assert [r.path for r in rec.report()] == ["factored", "factored"]


def test_factored_linear_runs_natively_and_materialised_linear_through_the_recorder():
    """On the factored path autograd's own Linear backward forms the batch gradients (the
    recorder only reads the output gradient); on the materialised path the recorder's backward
    replaces it and returns Σ_i J_i."""
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    x = torch.randn(B, 6, dtype=torch.float64)
    G_ref, _ = loop_gram(model, lambda o, t: o.sum(), x, x)
    want = plain_grads(model, x, x, lambda o, t: o.sum())
    for strategy, native in (("factored", True), ("materialize", False)):
        model.zero_grad(set_to_none=True)
        rec = GramRecorder(model, strategy=strategy, loss_reduction="sum")
        with rec:
            out = model[0](x)
            assert (type(out.grad_fn).__name__ == "AddmmBackward0") == native, strategy
            model[2](torch.tanh(out)).sum().backward()
        assert rel(rec.gram(), G_ref) <= TOL, strategy
        assert_grads_match(model, want)


def test_linear_with_leading_dimensions_and_sum_reduction():
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    x = torch.randn(B, 3, 2, 4, dtype=torch.float64)
    y = torch.randn(B, 3, 2, 2, dtype=torch.float64)
    loss = lambda o, t: ((o - t) ** 2).sum()
    check_against_loop(model, x, y, loss, loss, loss_reduction="sum")


class SeqModel(nn.Module):
    """Embedding (padding_idx) → LayerNorm → LSTM → MultiheadAttention → Linear per token."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        h = self.norm(self.emb(idx))
        h, _ = self.rnn(h)
        h = h + self.att(h, h, h, need_weights=False)[0]
        return self.head(h)


def token_loss(out, t):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))


def test_embedding_sequence_model_token_mean_loss():
    model = SeqModel()
    idx = torch.randint(0, 11, (B, 4))
    idx[0, 1] = idx[2, 0] = 0                      # padding positions get no gradient
    tgt = torch.randint(0, 11, (B, 4))
    # ℓ_i is sample i's token mean (rows of J are B × sample i's contribution to ∇L), the reference's per-sample loss
    rec = check_against_loop(model, idx, tgt, token_loss, token_loss)
    paths = {r.name: r.path for r in check_against_loop(model, idx, tgt, token_loss, token_loss,
                                                        strategies=["auto"]).report()}
    assert paths["rnn"] == "generic-coupled" and paths["att"] == "generic"
    assert rec is not None


@pytest.mark.parametrize("freq", [False, True])
def test_embedding_scale_grad_by_freq_and_repeated_tokens(freq):
    model = nn.Sequential(nn.Embedding(7, 3, padding_idx=2, scale_grad_by_freq=freq), nn.Flatten(),
                          nn.Linear(12, 2))
    idx = torch.tensor([[1, 1, 2, 3], [3, 3, 3, 1], [0, 2, 2, 6], [5, 1, 0, 0], [4, 4, 4, 4]])
    y = torch.randint(0, 2, (5,))
    model = model.double()
    want_grads = plain_grads(model, idx, y, F.cross_entropy)
    # with scale_grad_by_freq the batch counts couple samples: compare with the batch contributions
    G_ref, _ = contribution_gram(model, F.cross_entropy, idx, y, 5)
    for strategy in ("factored", "materialize"):
        G, _ = record(model, idx, y, F.cross_entropy, strategy=strategy)
        assert rel(G, G_ref) <= TOL
        assert_grads_match(model, want_grads)


# ---------------------------------------------------------------- convolutions
CONV_CASES = [
    dict(cls=nn.Conv2d, kw=dict(kernel_size=3, padding=1)),
    dict(cls=nn.Conv2d, kw=dict(kernel_size=3, stride=2, padding=0, bias=False)),
    dict(cls=nn.Conv2d, kw=dict(kernel_size=(2, 3), padding="same", dilation=(1, 2))),
    dict(cls=nn.Conv2d, kw=dict(kernel_size=2, padding="same")),                 # asymmetric "same"
    dict(cls=nn.Conv2d, kw=dict(kernel_size=3, padding="valid", dilation=2, groups=2)),
    dict(cls=nn.Conv2d, kw=dict(kernel_size=3, padding=1, groups=4, stride=(1, 2))),
    dict(cls=nn.Conv2d, kw=dict(kernel_size=3, padding=2, padding_mode="reflect")),
    dict(cls=nn.Conv2d, kw=dict(kernel_size=3, padding=1, padding_mode="circular", bias=False)),
    dict(cls=nn.Conv1d, kw=dict(kernel_size=3, padding=1, stride=2, groups=2)),
    dict(cls=nn.Conv1d, kw=dict(kernel_size=4, padding="same", dilation=2)),
    dict(cls=nn.Conv3d, kw=dict(kernel_size=2, padding=1, stride=(1, 2, 1))),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c['cls'].__name__}-{c['kw']}")
def test_convolution_options(case):
    cls = case["cls"]
    dims = {nn.Conv1d: (9,), nn.Conv2d: (7, 8), nn.Conv3d: (4, 5, 4)}[cls]
    model = nn.Sequential(cls(4, 4, **case["kw"]), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(B, 4, *dims, dtype=torch.float64)
    model(x.float())                                   # materialise the lazy layer
    y = torch.randint(0, 3, (B,))
    for method in ("grouped", "unfold", "channels_last"):
        check_against_loop(model, x, y, F.cross_entropy, ce_sum,
                           strategies=["factored", "materialize"], conv_method=method)
    check_against_loop(model, x, y, F.cross_entropy, ce_sum, strategies=["auto"])


def test_cnn_with_memory_budget_chunks():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(B, 3, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    # 2 kB forces several chunks per layer (output channels; samples for the factored form)
    for method in ("auto", "channels_last"):   # channels-last chunks the ungrouped layer's output channels
        check_against_loop(model, x, y, F.cross_entropy, ce_sum, strategies=["auto", "materialize", "factored"],
                           memory_budget=2048, conv_method=method)


# ---------------------------------------------------------------- norm layers
def norm_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.LayerNorm(6), nn.BatchNorm1d(6), nn.Linear(6, 3))


def test_norm_layers_in_eval_mode():
    model = norm_net().double()
    x = torch.randn(B, 3, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    model.train()
    model(x)                                          # non-trivial running statistics
    model.eval()
    check_against_loop(model, x, y, F.cross_entropy, ce_sum, strategies=STRATEGIES[:-1])
    _, rec = record(model, x, y, F.cross_entropy)  # auto: every norm layer on its own rule, once
    norms = [r for r in rec.report() if "Norm" in r.module]
    assert [r.module for r in norms] == ["BatchNorm2d", "GroupNorm", "InstanceNorm2d", "LayerNorm",
                                         "BatchNorm1d"]
    assert all(r.path == "norm" and r.calls == 1 for r in norms), norms


def test_batchnorm3d_and_instancenorm1d_eval():
    model = nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3), nn.Flatten(2), nn.InstanceNorm1d(3, affine=True),
                          nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(B, 2, 3, 3, 3, dtype=torch.float64)
    model(x.float())
    y = torch.randint(0, 2, (B,))
    model.double().train()
    model(x)
    model.eval()
    check_against_loop(model, x, y, F.cross_entropy, ce_sum, strategies=["auto", "generic"])


@pytest.mark.parametrize("strategy", ["auto", "materialize", "factored", "generic"])
def test_batchnorm_train_mode_contributions_and_invariant(strategy):
    model = norm_net().double().train()
    x = torch.randn(6, 3, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    G, rec = record(model, x, y, F.cross_entropy, strategy=strategy)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    G_ref, _ = contribution_gram(model, F.cross_entropy, x, y, 6)
    assert rel(G, G_ref) <= TOL
    # running statistics updated exactly once, as by a plain step
    model.load_state_dict(state)
    F.cross_entropy(model(x), y).backward()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-15)
    model.load_state_dict(state)
    model.zero_grad()
    G, _ = record(model, x, y, F.cross_entropy, strategy=strategy)
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert abs(float(G.sum()) / (36 * float(flat @ flat)) - 1) <= 1e-12      # 1ᵀG1 = B²‖∇L‖²


def test_batchnorm_train_against_backpack_batchgrad():
    backpack = import_backend("backpack")
    from backpack.extensions import BatchGrad

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, stride=2), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(),
                          nn.Linear(5 * 3 * 3, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(6, 3, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    G, _ = record(model, x, y, F.cross_entropy)
    model.load_state_dict(state)
    ext = backpack.extend(model)
    loss_fn = backpack.extend(nn.CrossEntropyLoss())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack.backpack(BatchGrad()):
            loss_fn(ext(x), y).backward()
    # BatchGrad rows are per-sample terms of the *mean* loss: times B for the rows of J
    J = 6 * torch.cat([p.grad_batch.reshape(6, -1) for p in model.parameters()], 1)
    assert rel(G, J @ J.T) <= TOL


# ---------------------------------------------------------------- generic path
class Scale(nn.Module):
    """A custom leaf module with its own parameters and no layer rule (separable)."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(n))
        self.shift = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return torch.tanh(x * self.gain) + self.shift * x ** 2


class BatchCenter(nn.Module):
    """A custom module that couples samples (subtracts the batch mean), with a parameter."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))

    def forward(self, x):
        h = x * self.w
        return h - h.mean(0, keepdim=True)


def test_generic_separable_module():
    model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Linear(5, 3))
    x = torch.randn(B, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    rec = check_against_loop(model, x, y, F.cross_entropy, ce_sum, strategies=["auto"])
    assert rec.report()[1].path == "generic"


def test_generic_coupled_module_gives_batch_contributions():
    model = nn.Sequential(nn.Linear(4, 5), BatchCenter(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(B, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    G, rec = record(model, x, y, F.cross_entropy)
    G_ref, _ = contribution_gram(model, F.cross_entropy, x, y, B)
    assert rel(G, G_ref) <= TOL
    assert rec.report()[1].path == "generic-coupled"


def test_dropout_inside_generic_module_is_replayed():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x * self.w)

    model = nn.Sequential(nn.Linear(4, 5), Noisy(), nn.Linear(5, 3)).double()
    x = torch.randn(B, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    torch.manual_seed(3)
    G, _ = record(model, x, y, F.cross_entropy)
    torch.manual_seed(3)
    G_ref, _ = contribution_gram(model, F.cross_entropy, x, y, B)   # same dropout mask
    assert rel(G, G_ref) <= TOL


# ---------------------------------------------------------------- reuse, subsets, functional form
def test_module_called_twice_and_tied_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.mid = nn.Linear(4, 4)
            self.out = nn.Linear(4, 6, bias=False)
            self.out.weight = self.emb.weight           # tied, registered in two modules

        def forward(self, idx):
            h = self.mid(torch.tanh(self.mid(self.emb(idx))))   # mid called twice
            return self.out(h)

    model = Tied()
    idx = torch.randint(0, 6, (B, 3))
    tgt = torch.randint(0, 6, (B, 3))
    rec = check_against_loop(model, idx, tgt, token_loss, token_loss, strategies=["auto", "factored"])
    calls = {r.name: r.calls for r in rec.report()}
    assert calls["mid"] == 2


def test_params_filter_by_name_module_and_parameter():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(B, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    sel = [model[0].bias, model[2].weight]
    _, J = loop_gram(model, ce_sum, x, y, params=sel)
    want = J @ J.T
    for params in (["0.bias", "2.weight"], [model[0].bias, model[2].weight]):
        G, _ = record(model, x, y, F.cross_entropy, params=params)
        assert rel(G, want) <= TOL
    _, J = loop_gram(model, ce_sum, x, y, params=list(model[2].parameters()))
    for params in (["2"], [model[2]]):
        G, _ = record(model, x, y, F.cross_entropy, params=params)
        assert rel(G, J @ J.T) <= TOL


def test_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(B, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    check_against_loop(model, x, y, F.cross_entropy, ce_sum)


def test_frozen_weight_of_a_reused_sequence_layer_bias_rows_only():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):                       # (B, T, 4): mid applied twice per token
            return self.head(torch.tanh(self.mid(torch.tanh(self.mid(x)))))

    model = Reuse()
    model.mid.weight.requires_grad_(False)
    x = torch.randn(B, 3, 4, dtype=torch.float64)
    tgt = torch.randint(0, 3, (B, 3))
    check_against_loop(model, x, tgt, token_loss, token_loss, strategies=["auto", "factored", "materialize"])


def test_per_sample_gram_functional_and_grad_left_as_plain_step():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).double()
    x = torch.randn(B, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (B,))
    want = plain_grads(model, x, y, F.cross_entropy)
    G_ref, _ = loop_gram(model, ce_sum, x, y)
    model.zero_grad(set_to_none=True)
    G = per_sample_gram(model, nn.CrossEntropyLoss(), x, y)
    assert rel(G, G_ref) <= TOL
    assert_grads_match(model, want)


def test_recorder_reused_across_steps_and_disabled_steps():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    rec = GramRecorder(model)
    for step in range(4):
        x = torch.randn(3 + step, 4, dtype=torch.float64)
        y = torch.randint(0, 3, (3 + step,))
        model.zero_grad()
        with rec(measure=step != 2):
            F.cross_entropy(model(x), y).backward()
        if step == 2:
            assert not rec.measured
            with pytest.raises(RuntimeError, match="measuring disabled"):
                rec.gram()
            continue
        G_ref, _ = loop_gram(model, ce_sum, x, y)
        assert rec.measured and rec.batch_size == 3 + step
        assert rel(rec.gram(), G_ref) <= TOL


@pytest.mark.parametrize("strategy", ["factored", "materialize", "generic"])
def test_float64_accumulation_of_a_float32_model(strategy):
    """float32 per-sample gradients, exact in float32, whose Gram entries are not: with
    ``dtype=torch.float64`` G is exact, accumulated in float32 it is not.

    The loss Σ_i c·(w·x_i) has per-sample gradients c·x_i (integers times a power of two, exact in
    float32); G_ij = c²·x_i·x_j reaches ~1e9 > 2²⁴, where float32 keeps only 24 bits, while float64
    holds it exactly (< 2⁵³). The reference is the integer Gram in NumPy int64.
    """
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1000, 4096, (B, 64), generator=gen).float()
    model = nn.Linear(64, 1, bias=False)
    c = 2.0
    exact = (c * c) * (x.numpy().astype(np.int64) @ x.numpy().astype(np.int64).T)
    grams = {}
    for dtype in (torch.float64, None):
        model.zero_grad(set_to_none=True)
        rec = GramRecorder(model, loss_reduction="sum", strategy=strategy, dtype=dtype)
        with rec:
            (c * model(x)).sum().backward()
        grams[dtype] = rec.gram()
        assert rec.grad_dtype == torch.float32
        assert torch.equal(model.weight.grad, c * x.sum(0, keepdim=True))  # exact in float32 too
    assert grams[torch.float64].dtype == torch.float64 and grams[None].dtype == torch.float32
    assert np.array_equal(grams[torch.float64].numpy(), exact.astype(np.float64))
    assert not np.array_equal(grams[None].double().numpy(), exact.astype(np.float64))


@pytest.mark.parametrize("method", ["grouped", "unfold", "channels_last"])
def test_convolution_called_twice_per_forward(method):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
            self.head = nn.Linear(4 * 5 * 5, 3)

        def forward(self, x):
            return self.head(self.conv(torch.tanh(self.conv(x))).flatten(1))

    model = Twice()
    x = torch.randn(B, 4, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    rec = check_against_loop(model, x, y, F.cross_entropy, ce_sum, strategies=["auto"], conv_method=method)
    assert {r.name: r.calls for r in rec.report()}["conv"] == 2
