"""Exact rules for ``nn.Linear`` and ``nn.Conv1d/2d/3d``.

Where the layer's share of G is formed from its per-sample gradients J_i (every convolution
with many output positions, and dense layers whose cost model says so), the layer's forward is
routed through a custom autograd function for the duration of a step. Its backward receives the
output gradient g (B, T, d_out) of the ordinary batch backward, computes the input gradient as
usual, adds ``J Jᵀ`` and returns the batch weight gradient as the sum Σ_i J_i, so autograd never
computes the weight gradient a second time. A dense layer on the factored path runs natively
instead (its batch gradients are autograd's own) and a hook on its output adds
``Σ_{t,s}(a_it·a_js)(g_it·g_js)`` from the output gradient and the saved input.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import convps
from .cost import choose
from .registry import Unit, override_forward, register_unit

__all__ = ["LinearUnit", "ConvUnit"]

_REUSED = "parameters reused in this step: per-sample gradients summed over uses"
_DEFAULT_WORK = 1 << 27   # bytes of temporaries for the factored form when no budget is given


def _chunks(total: int, per_item_bytes: int, budget: int | None):
    if budget is None or per_item_bytes * total <= budget:
        return [(0, total)]
    step = max(1, budget // max(per_item_bytes, 1))
    return [(i, min(i + step, total)) for i in range(0, total, step)]


def factored_sum(acc: torch.Tensor, A: torch.Tensor, G: torch.Tensor, budget: int | None) -> None:
    """``acc_ij += Σ_{t,s} (a_it·a_js)(g_it·g_js)`` for A (B, T, d_a), G (B, T, d_g), in sample chunks.

    Grouped layers pass a leading group dimension: A (k, B, T, d_a), G (k, B, T, d_g), summed over k.
    """
    if A.dim() == 3:
        A, G = A.unsqueeze(0), G.unsqueeze(0)
    k, B, T, _ = A.shape
    A2 = A.reshape(k, B * T, -1).to(acc.dtype)
    G2 = G.reshape(k, B * T, -1).to(acc.dtype)
    per_sample = 2 * k * T * B * T * acc.element_size()
    for i0, i1 in _chunks(B, per_sample, budget or _DEFAULT_WORK):
        KA = torch.bmm(A2[:, i0 * T:i1 * T], A2.transpose(1, 2))
        KG = torch.bmm(G2[:, i0 * T:i1 * T], G2.transpose(1, 2))
        KA.mul_(KG)
        acc[i0:i1] += KA.view(k, i1 - i0, T, B, T).sum(dim=(0, 2, 4))


def _workspace(rec) -> convps.Workspace:
    """The recorder's shared buffer for per-sample convolution gradients (made on first use)."""
    ws = rec.__dict__.get("_conv_workspace")
    if ws is None:
        ws = rec.__dict__["_conv_workspace"] = convps.Workspace()
    return ws


def _batch_sum(J: torch.Tensor) -> torch.Tensor:
    """Σ_i J_i (the batch weight gradient) as a matrix-vector product (faster than ``sum(0)``)."""
    B = J.shape[0]
    flat = J.reshape(B, -1)
    ones = torch.ones(B, dtype=J.dtype, device=J.device)
    return torch.mv(flat.T, ones).view(J.shape[1:])


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, unit, choice):
        ctx.save_for_backward(x, weight)
        ctx.unit = unit
        ctx.choice = choice
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        unit = ctx.unit
        gx = go.matmul(w) if ctx.needs_input_grad[0] else None
        gw, gb = unit.backward(x, go, ctx.choice, ctx.needs_input_grad[1],
                               ctx.has_bias and ctx.needs_input_grad[2])
        return gx, gw, gb, None, None


class LinearUnit(Unit):
    """``nn.Linear`` on inputs (B, *, d_in): T = product of the middle dimensions.

    The path is chosen in the forward, where B and T are known. On the factored path the layer
    runs natively (autograd forms the input, weight and bias gradients in C++) and a hook on its
    output receives the output gradient, from which the layer's share of G is formed; on the
    materialised path the forward goes through :class:`_LinearFn`, whose backward forms the
    per-sample weight gradients J_i and returns Σ_i J_i as the weight gradient.
    """

    kind = "linear"

    def install(self, rec):
        self.rec = rec
        m = self.module

        def forward(x):
            rec._forward(self, x.shape[0], m.weight.dtype, lead=x.shape[:-1])
            try:
                choice = self._path(x)          # (path, reason), reported by the backward
                if choice[0] == "factored":
                    out = F.linear(x, m.weight, m.bias)
                    if out.requires_grad:
                        # a bias-only layer needs just the input's shape: holding the input
                        # itself would keep an activation autograd does not save
                        held = x if self.w_sel else x.new_empty(()).expand(x.shape)
                        out.register_hook(functools.partial(self._factored_hook, held, choice))
                    return out
                return _LinearFn.apply(x, m.weight, m.bias, self, choice)
            finally:
                rec._forward_done(self)

        return [override_forward(m, forward)]

    def _path(self, x) -> tuple[str, str]:
        B = x.shape[0]
        d_in, d_out = self.module.in_features, self.module.out_features
        T = math.prod(x.shape[1:-1])
        return choose(self.strategy, self.rec._cost_batch(B), T, d_in if self.w_sel else 0, d_out,
                      d_in * d_out if self.w_sel else 0)

    def _factored_hook(self, x, choice, go) -> None:
        """Output-gradient hook of the factored path: add ``Σ_{t,s}(a_it·a_js)(g_it·g_js)``."""
        rec = self.rec
        rec._backward(self)
        w_sel, b_sel = self.w_sel, self.b_sel
        if rec._multi_use(self):
            # a reused weight: the per-sample gradient is the sum over its uses (autograd still
            # forms the batch gradient)
            self.set_path("materialize", _REUSED)
            B = x.shape[0]
            G = go.reshape(B, -1, self.module.out_features)
            blocks = []
            if w_sel:
                A = x.reshape(B, -1, self.module.in_features)
                blocks.append((self.module.weight, torch.bmm(G.transpose(1, 2), A).reshape(B, -1)))
            if b_sel:
                blocks.append((self.module.bias, G.sum(1)))
            rec._add_rows(self, blocks)
            return None
        self.set_path(*choice)
        if rec._gather is not None:      # global scope: gathered across ranks first (distributed.py)
            B = x.shape[0]
            rec._gather.add_factors(self, x.reshape(B, -1, self.module.in_features) if w_sel else None,
                                    go.reshape(B, -1, self.module.out_features), bias=b_sel)
            return None
        acc = rec._acc(go, self)
        if x.dim() == 2:                 # one position per sample: rank-one per-sample gradients
            g = go if go.dtype == acc.dtype else go.to(acc.dtype)
            if w_sel:
                a = x if x.dtype == acc.dtype else x.to(acc.dtype)
                # G += (A Aᵀ [+ 1 for the bias]) ⊙ (Gₒ Gₒᵀ)
                K = torch.addmm(acc.new_ones(()), a, a.T) if b_sel else a @ a.T
                acc.addcmul_(K, g @ g.T)
            elif b_sel:
                acc.addmm_(g, g.T)
        else:
            B = x.shape[0]
            G = go.reshape(B, -1, self.module.out_features)
            if w_sel:
                factored_sum(acc, x.reshape(B, -1, self.module.in_features), G, rec.memory_budget)
            if b_sel:
                s = G.sum(1).to(acc.dtype)
                acc.addmm_(s, s.T)
        rec._mark(self)
        return None

    def backward(self, x, go, choice, need_w, need_b):
        """Backward of the materialised path: per-sample weight gradients J_i = G_iᵀ A_i."""
        rec = self.rec
        rec._backward(self)
        m = self.module
        B = x.shape[0]
        d_in, d_out = m.in_features, m.out_features
        A, G = x.reshape(B, -1, d_in), go.reshape(B, -1, d_out)
        w_sel, b_sel = self.w_sel, self.b_sel
        multi = rec._multi_use(self)
        self.set_path(*(("materialize", _REUSED) if multi else choice))
        gw = gb = None
        Sb = G.sum(1) if (b_sel or need_b) else None
        blocks = []
        if w_sel:
            per = B * d_in * x.element_size()
            parts = []
            for o0, o1 in _chunks(d_out, per, rec.memory_budget):
                J = torch.bmm(G[:, :, o0:o1].transpose(1, 2), A)      # (B, o, d_in)
                if multi:
                    parts.append(J)
                else:
                    rec._add_rows(self, [(m.weight, J.reshape(B, -1))])
                if need_w:
                    if gw is None:
                        gw = x.new_empty(d_out, d_in)
                    gw[o0:o1] = _batch_sum(J)
                del J
            if multi:
                blocks.append((m.weight, torch.cat(parts, 1).reshape(B, -1)))
        elif need_w:
            gw = G.reshape(-1, d_out).T.mm(A.reshape(-1, d_in))
        if b_sel:
            blocks.append((m.bias, Sb))
        if blocks:
            rec._add_rows(self, blocks)
        if need_b:
            gb = Sb.sum(0)
        return gw, gb


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, unit, padding):
        ctx.save_for_backward(x, weight)
        ctx.unit = unit
        ctx.padding = padding
        ctx.has_bias = bias is not None
        spec = unit.spec
        return torch.ops.aten.convolution(x, weight, bias, spec.stride, padding, spec.dilation,
                                          False, [0] * spec.dim, spec.groups)

    @staticmethod
    def backward(ctx, go):
        x, w = ctx.saved_tensors
        unit = ctx.unit
        spec = unit.spec
        go = go.contiguous()
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                go, x, w, None, spec.stride, ctx.padding, spec.dilation, False, [0] * spec.dim,
                spec.groups, [True, False, False])[0]
        gw, gb = unit.backward(x, go, ctx.padding, ctx.needs_input_grad[1],
                               ctx.has_bias and ctx.needs_input_grad[2])
        return gx, gw, gb, None, None


class ConvUnit(Unit):
    """``nn.Conv1d/2d/3d`` (stride, padding incl. "same"/"valid", dilation, groups, any padding_mode)."""

    kind = "conv"

    @classmethod
    def supports(cls, module) -> bool:
        return not module.transposed

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        m = self.module
        self.spec = convps.ConvSpec(
            dim=len(m.kernel_size), kernel=tuple(m.kernel_size), stride=list(m.stride),
            dilation=list(m.dilation), groups=m.groups,
            in_channels=m.in_channels, out_channels=m.out_channels)

    def _padding(self):
        """(explicit F.pad list or None, symmetric conv padding)."""
        m = self.module
        d = self.spec.dim
        if m.padding_mode != "zeros":
            return m._reversed_padding_repeated_twice, [0] * d, m.padding_mode
        if m.padding == "valid":
            return None, [0] * d, None
        if m.padding == "same":
            left, right = [], []
            for k, dil in zip(m.kernel_size, m.dilation):
                total = dil * (k - 1)
                left.append(total // 2)
                right.append(total - total // 2)
            if left == right:
                return None, left, None
            pads = []
            for lo, hi in zip(reversed(left), reversed(right)):
                pads += [lo, hi]
            return pads, [0] * d, "constant"
        return None, list(m.padding), None

    def install(self, rec):
        self.rec = rec
        m = self.module
        pre, pad, mode = self._padding()

        def forward(x):
            rec._forward(self, x.shape[0], m.weight.dtype)
            try:
                if pre is not None:
                    x = F.pad(x, pre, mode=mode)
                return _ConvFn.apply(x, m.weight, m.bias, self, pad)
            finally:
                rec._forward_done(self)

        return [override_forward(m, forward)]

    def backward(self, x, go, padding, need_w, need_b):
        rec = self.rec
        rec._backward(self)
        m = self.module
        spec = self.spec
        B = x.shape[0]
        T = go[0, 0].numel()
        w_sel, b_sel = self.w_sel, self.b_sel
        multi = rec._multi_use(self)
        d_a = spec.in_channels * spec.kernel_numel
        p_w = m.weight.numel() if w_sel else 0
        path, reason = choose(self.strategy, rec._cost_batch(B), T, d_a if w_sel else 0,
                              spec.out_channels, p_w)
        if multi:
            path, reason = "materialize", _REUSED
        Sb = go.reshape(B, spec.out_channels, -1).sum(2) if (b_sel or need_b) else None
        gw = None
        if path == "factored":
            self.set_path(path, reason)
            if rec._gather is not None:  # global scope: gathered across ranks first (distributed.py)
                if w_sel:
                    rec._gather.add_factors(self, *convps.patches(x, go, spec, padding), bias=False)
                if b_sel:
                    rec._gather.add_rows(self, Sb)
            else:
                acc = rec._acc(go, self)
                if w_sel:
                    A, Gg = convps.patches(x, go, spec, padding)
                    factored_sum(acc, A, Gg, rec.memory_budget)
                if b_sel:
                    s = Sb.to(acc.dtype)
                    acc.addmm_(s, s.T)
                rec._mark(self)
            if need_w:
                gw = torch.ops.aten.convolution_backward(
                    go, x, m.weight, None, spec.stride, padding, spec.dilation, False,
                    [0] * spec.dim, spec.groups, [False, True, False])[1]
        else:
            blocks = []
            if w_sel:
                method = rec._pick_conv(self, lambda: convps.pick_method(rec.conv_method, x, go, spec, padding))
                self.set_path(path, f"{reason}; per-sample weights by {method}")
                per_channel = B * (spec.in_channels // spec.groups) * spec.kernel_numel * x.element_size()
                parts = []
                gw = x.new_empty(m.weight.shape) if need_w else None
                chunk = convps.sample_chunk(spec, B, T, x.element_size())
                for o0, o1 in convps.channel_chunks(spec, per_channel, rec.memory_budget):
                    shape = convps.per_sample_shape(method, B, spec, o0, o1)
                    # one recorder-wide buffer, unless the gradients are kept for a later use or
                    # handed to the asynchronous all-gather of scope="global" (which reads them
                    # after the next layer would have overwritten a shared buffer)
                    J = (x.new_empty(shape) if multi or rec._gather is not None else
                         _workspace(rec).take(shape, x.dtype, x.device))
                    convps.per_sample_into(J, method, x, go, spec, padding, o0, o1, chunk)
                    if multi:
                        parts.append(convps.weight_layout(J, method, spec, o1 - o0))
                    else:
                        rec._add_rows(self, [(m.weight, J.reshape(B, -1))])
                    if need_w:
                        total = _batch_sum(J).unsqueeze(0)
                        gw[o0:o1] = convps.weight_layout(total, method, spec, o1 - o0)[0]
                    del J
                if multi:
                    blocks.append((m.weight, torch.cat(parts, 1).reshape(B, -1)))
            else:
                self.set_path(path, reason)
                if need_w:
                    gw = torch.ops.aten.convolution_backward(
                        go, x, m.weight, None, spec.stride, padding, spec.dilation, False,
                        [0] * spec.dim, spec.groups, [False, True, False])[1]
            if b_sel:
                blocks.append((m.bias, Sb))
            if blocks:
                rec._add_rows(self, blocks)
        gb = Sb.sum(0) if need_b else None
        return gw, gb


register_unit(nn.Linear, LinearUnit)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_unit(_conv, ConvUnit)
