"""GramRecorder on modules whose batch is not in dim 0, against a float64 per-sample loop.

RNN/GRU/LSTM, MultiheadAttention and the Transformer modules declare where their batch is
(``batch_first``; hidden states ``(layers, B, H)`` and key padding masks ``(B, S)`` whatever it
says; packed sequences by ``batch_sizes``/``sorted_indices``). The recorder must split along the
declared dimension, including when the sequence length equals the batch size (where splitting
along dim 0 would silently give per-time-step rows), or refuse naming the module and the fix.

The reference runs the module on each sample alone (its own slice along the declared batch
dimension, or its own unpadded sequence) and stacks ∇θ ℓ_i: it shares no code with the adapter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fimcore_adapters.torch import GramRecorder

B, D, H = 3, 4, 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def loop_reference(model, sample_loss, n=B):
    """G = J Jᵀ with row i = ∇θ sample_loss(i) (sample i run alone)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(n):
        g = torch.autograd.grad(sample_loss(i), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1)
                               for x, p in zip(g, params)]))
    J = torch.stack(rows)
    return J @ J.T


def recorded(model, batch_loss, reduction="sum", **options):
    rec = GramRecorder(model, loss_reduction=reduction, **options)
    model.zero_grad(set_to_none=True)
    with rec:
        batch_loss().backward()
    return rec.gram(), rec


def assert_exact(G, G_ref, rec):
    torch.testing.assert_close(G, G_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"{m}\n{rec.report()}")


def take(t, i, dim):
    return t.narrow(dim, i, 1)


# ------------------------------------------------------------------ recurrent modules
class RecurrentNet(nn.Module):
    """RNN → loss on every output step, on h_n of every layer, and a head on the last h_n."""

    def __init__(self, cls, batch_first, **kw):
        super().__init__()
        self.rnn = cls(D, H, num_layers=2, batch_first=batch_first, **kw)
        self.head = nn.Linear(H * (2 if kw.get("bidirectional") else 1), 2)

    def forward(self, x, hx=None):
        out, h = self.rnn(x, hx)
        h_n = h[0] if isinstance(h, tuple) else h                    # (layers·dirs, B, H)
        last = torch.cat([h_n[-1], h_n[-2]], -1) if self.rnn.bidirectional else h_n[-1]
        return out, h_n, self.head(last)


def rnn_loss(net, x, hx, y):
    out, h_n, logits = net(x, hx)
    return (out.square().sum() + h_n.square().sum()
            + F.cross_entropy(logits, y, reduction="sum"))


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("T", [B, B + 2], ids=["T==B", "T!=B"])
def test_recurrent_modules_split_along_their_declared_batch_dim(cls, batch_first, T):
    net = RecurrentNet(cls, batch_first, bidirectional=cls is nn.GRU).double()
    bd = 0 if batch_first else 1
    x = torch.randn(*((B, T) if batch_first else (T, B)), D, dtype=torch.float64)
    y = torch.randint(0, 2, (B,))
    layers = 2 * (2 if net.rnn.bidirectional else 1)
    h0 = torch.randn(layers, B, H, dtype=torch.float64)          # batch in dim 1 for any batch_first
    hx = (h0, torch.randn_like(h0)) if cls is nn.LSTM else h0

    def hx_of(i):
        return tuple(take(h, i, 1) for h in hx) if cls is nn.LSTM else take(hx, i, 1)

    G_ref = loop_reference(net, lambda i: rnn_loss(net, take(x, i, bd), hx_of(i), y[i:i + 1]))
    G, rec = recorded(net, lambda: rnn_loss(net, x, hx, y))
    assert_exact(G, G_ref, rec)
    assert rec.batch_size == B


def test_recurrent_mean_reduction_and_no_initial_state():
    net = RecurrentNet(nn.LSTM, False).double()
    x = torch.randn(B, B, D, dtype=torch.float64)                # T == B, batch in dim 1
    y = torch.randint(0, 2, (B,))

    def loss(xs, ys):
        return F.cross_entropy(net(xs)[2], ys)

    G_ref = loop_reference(net, lambda i: loss(take(x, i, 1), y[i:i + 1]))
    G, rec = recorded(net, lambda: loss(x, y), reduction="mean")
    assert_exact(G, G_ref, rec)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequences_rows_follow_sorted_indices(cls, enforce_sorted):
    rnn = cls(D, H, num_layers=2, batch_first=True).double()
    head = nn.Linear(H, 2).double()
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    lengths = torch.tensor([B, B - 1, 1]) if enforce_sorted else torch.tensor([1, B, B - 1])
    x = torch.randn(B, B, D, dtype=torch.float64)                 # T_max == B
    y = torch.randint(0, 2, (B,))

    def loss(xs, lens, ys):
        out, h = rnn(pack_padded_sequence(xs, lens, batch_first=True, enforce_sorted=enforce_sorted))
        h_n = h[0] if isinstance(h, tuple) else h
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=B)   # zeros past lengths
        return (out.data.square().sum() + h_n.square().sum()
                + F.cross_entropy(head(padded).sum(1), ys, reduction="sum"))

    G_ref = loop_reference(model, lambda i: loss(x[i:i + 1, :lengths[i]], lengths[i:i + 1], y[i:i + 1]))
    G, rec = recorded(model, lambda: loss(x, lengths, y))
    assert_exact(G, G_ref, rec)
    assert {r.path for r in rec.report() if r.name == "rnn"} == {"generic-coupled"}


# ------------------------------------------------------------------ attention and transformers
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("L", [B, B + 1], ids=["L==B", "L!=B"])
def test_multihead_attention_with_masks(batch_first, L):
    att = nn.MultiheadAttention(D, 2, batch_first=batch_first).double()
    bd = 0 if batch_first else 1
    S = L + 1
    shape = (lambda n: (B, n, D)) if batch_first else (lambda n: (n, B, D))
    q, k = torch.randn(*shape(L), dtype=torch.float64), torch.randn(*shape(S), dtype=torch.float64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -1] = pad[2, 0] = True                                 # (B, S): batch in dim 0 always
    causal = torch.triu(torch.ones(L, S, dtype=torch.bool), diagonal=2)   # (L, S), shared

    def loss(qs, ks, mask):
        out, w = att(qs, ks, ks, key_padding_mask=mask, attn_mask=causal)
        return out.square().sum() + (w * torch.arange(S, dtype=w.dtype)).sum()   # w: (B, L, S)

    G_ref = loop_reference(att, lambda i: loss(take(q, i, bd), take(k, i, bd), pad[i:i + 1]))
    G, rec = recorded(att, lambda: loss(q, k, pad))
    assert_exact(G, G_ref, rec)


def test_multihead_attention_per_head_3d_mask_is_exact():
    att = nn.MultiheadAttention(D, 2).double()
    q = torch.randn(B, B, D, dtype=torch.float64)
    mask = torch.randn(B * 2, B, B, dtype=torch.float64)          # (B·heads, L, S): not split, shared

    G_ref = loop_reference(att, lambda i: att(take(q, i, 1), take(q, i, 1), take(q, i, 1),
                                              attn_mask=mask[2 * i:2 * i + 2])[0].square().sum())
    G, rec = recorded(att, lambda: att(q, q, q, attn_mask=mask)[0].square().sum())
    assert_exact(G, G_ref, rec)


def transformer_case(kind, batch_first):
    S, bd = B, (0 if batch_first else 1)                           # sequence length == batch size

    def seq(n):
        return torch.randn(*((B, n) if batch_first else (n, B)), D, dtype=torch.float64)

    src, tgt = seq(S), seq(S + 1)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, -1] = True
    enc = dict(d_model=D, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=batch_first)
    if kind == "encoder layer":
        m = nn.TransformerEncoderLayer(**enc)
        return m, (lambda i: m(take(src, i, bd), src_key_padding_mask=take(pad, i, 0))), \
            (lambda: m(src, src_key_padding_mask=pad))
    if kind == "decoder layer":
        m = nn.TransformerDecoderLayer(**enc)
        return m, (lambda i: m(take(tgt, i, bd), take(src, i, bd),
                               memory_key_padding_mask=take(pad, i, 0))), \
            (lambda: m(tgt, src, memory_key_padding_mask=pad))
    if kind == "encoder with norm":
        m = nn.TransformerEncoder(nn.TransformerEncoderLayer(**enc), 2, norm=nn.LayerNorm(D),
                                  enable_nested_tensor=False)
        return m, (lambda i: m(take(src, i, bd), src_key_padding_mask=take(pad, i, 0))), \
            (lambda: m(src, src_key_padding_mask=pad))
    m = nn.Transformer(d_model=D, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                       dim_feedforward=6, dropout=0.0, batch_first=batch_first)
    causal = m.generate_square_subsequent_mask(S + 1, dtype=torch.float64)
    return m, (lambda i: m(take(src, i, bd), take(tgt, i, bd), tgt_mask=causal,
                           src_key_padding_mask=take(pad, i, 0))), \
        (lambda: m(src, tgt, tgt_mask=causal, src_key_padding_mask=pad))


@pytest.mark.parametrize("kind,batch_first", [
    ("encoder layer", False), ("decoder layer", False), ("encoder with norm", False),
    ("transformer", False), ("encoder layer", True), ("transformer", True)])
def test_transformer_modules_split_along_their_declared_batch_dim(kind, batch_first):
    m, one, whole = transformer_case(kind, batch_first)
    m.double()
    G_ref = loop_reference(m, lambda i: one(i).square().sum())
    G, rec = recorded(m, lambda: whole().square().sum())
    assert_exact(G, G_ref, rec)
    modules = [r.module for r in rec.report()]
    if batch_first:             # children keep their layer rules
        assert {"Linear", "LayerNorm", "MultiheadAttention"} <= set(modules)
    else:                       # children see (S, B, E): one generic unit split along dim 1
        assert modules == [type(m).__name__]


# ------------------------------------------------------------------ refusals
def test_unbatched_inputs_are_refused_naming_the_module():
    net = RecurrentNet(nn.GRU, False).double()
    with pytest.raises(ValueError, match="module 'rnn' \\(GRU\\) got an unbatched input of shape "
                                         "\\(5, 4\\).*pass input as \\(T, B, features\\) with "
                                         "batch_first=False"):
        with GramRecorder(net):
            net(torch.randn(5, D, dtype=torch.float64))[0].sum().backward()
    att = nn.MultiheadAttention(D, 2).double()
    q = torch.randn(5, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="module '<model>' \\(MultiheadAttention\\) got an unbatched "
                                         "query of shape \\(5, 4\\).*\\(L, B, E\\) with batch_first=False"):
        with GramRecorder(att):
            att(q, q, q)[0].sum().backward()


class SeqFirstLM(nn.Module):
    """Embedding → LSTM(batch_first=False) → Linear on every step: all on (T, B, ·) tensors."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.emb = nn.Embedding(7, D)
        self.rnn = nn.LSTM(D, H, batch_first=batch_first)
        self.out = nn.Linear(H, 7)

    def forward(self, idx):
        return self.out(self.rnn(self.emb(idx))[0])


def test_sequence_first_layers_around_a_sequence_first_rnn_are_refused_when_ambiguous():
    model = SeqFirstLM().double()
    idx = torch.randint(0, 7, (B, B))                              # (T, B) with T == B
    with pytest.raises(ValueError, match="layer 'emb' \\(Embedding\\) takes an input with leading "
                                         "dimensions \\(3, 3\\) in a step where layer 'rnn' \\(LSTM\\) "
                                         "declares its batch in dim 1.*batch_first=True on 'rnn'"):
        with GramRecorder(model):
            model(idx).sum().backward()


def test_sequence_first_layers_with_another_length_disagree_on_the_batch():
    model = SeqFirstLM().double()
    idx = torch.randint(0, 7, (B + 2, B))                          # (T, B): Embedding reads T
    with pytest.raises(ValueError, match="layer 'emb' \\(Embedding\\) read B = 5 from dim 0 of its "
                                         "input, but layer 'rnn' \\(LSTM\\) read 3 from dim 1 of its "
                                         "sequence input \\(batch_first=False\\).*batch_first=True"):
        with GramRecorder(model):
            model(idx).sum().backward()


def test_the_batch_first_fix_of_the_refusals_is_exact():
    model = SeqFirstLM(batch_first=True).double()
    idx = torch.randint(0, 7, (B, B))
    G_ref = loop_reference(model, lambda i: model(idx[i:i + 1]).square().sum())
    G, rec = recorded(model, lambda: model(idx).square().sum())
    assert_exact(G, G_ref, rec)


class PackedScale(nn.Module):
    """A custom module with a parameter that takes a PackedSequence (no declared layout)."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(D))

    def forward(self, seq):
        return seq._replace(data=seq.data * self.s)


def test_packed_sequence_into_a_module_without_a_declared_layout_is_refused():
    model = nn.ModuleDict({"scale": PackedScale(), "rnn": nn.GRU(D, H, batch_first=True)}).double()
    seq = pack_padded_sequence(torch.randn(B, B, D, dtype=torch.float64), torch.tensor([3, 2, 1]),
                               batch_first=True)
    with pytest.raises(ValueError, match="module 'scale' \\(PackedScale\\) takes a PackedSequence.*"
                                         "pad_packed_sequence"):
        with GramRecorder(model):
            model["rnn"](model["scale"](seq))[1].sum().backward()


def test_layer_on_packed_data_is_refused_as_a_batch_disagreement():
    model = nn.ModuleDict({"rnn": nn.LSTM(D, H, batch_first=True), "proj": nn.Linear(H, 2)}).double()
    seq = pack_padded_sequence(torch.randn(B, B, D, dtype=torch.float64), torch.tensor([3, 2, 1]),
                               batch_first=True)
    with pytest.raises(ValueError, match="layer 'rnn' \\(LSTM\\) read B = 3 from a packed sequence, but "
                                         "layer 'proj' \\(Linear\\) read 6 from dim 0.*PackedSequence's "
                                         "data sees tokens"):
        with GramRecorder(model):
            model["proj"](model["rnn"](seq)[0].data).sum().backward()


@pytest.mark.parametrize("cls", [nn.RNNCell, nn.GRUCell, nn.LSTMCell])
def test_recurrent_cells_unrolled_over_time(cls):
    cell = cls(D, H).double()
    x = torch.randn(B, B, D, dtype=torch.float64)                 # (T, B, D), T == B, cell sees (B, D)
    h0 = torch.randn(B, H, dtype=torch.float64)

    def loss(xs, h):
        state = (h, torch.zeros_like(h)) if cls is nn.LSTMCell else h
        total = 0
        for t in range(xs.shape[0]):
            state = cell(xs[t], state)
            total = total + (state[0] if isinstance(state, tuple) else state).square().sum()
        return total

    G_ref = loop_reference(cell, lambda i: loss(take(x, i, 1), h0[i:i + 1]))
    G, rec = recorded(cell, lambda: loss(x, h0))
    assert_exact(G, G_ref, rec)
    with pytest.raises(ValueError, match=f"module '<model>' \\({cls.__name__}\\) got an unbatched "
                                         "input of shape \\(4,\\).*\\(B, features\\)"):
        with GramRecorder(cell):
            out = cell(x[0, 0])
            (out[0] if isinstance(out, tuple) else out).sum().backward()


def test_subclass_with_renamed_forward_arguments_is_refused():
    class MyGRU(nn.GRU):
        def forward(self, seq):                                    # not the name nn.GRU uses
            return super().forward(seq)

    net = MyGRU(D, H).double()
    x = torch.randn(B, B, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="module '<model>' \\(MyGRU\\) was called without a batched "
                                         "tensor input.*other names \\(here \\(.seq.,\\)\\)"):
        with GramRecorder(net):
            net(x)[0].sum().backward()
