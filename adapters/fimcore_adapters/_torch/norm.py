"""Affine parameters of BatchNorm, GroupNorm, LayerNorm and InstanceNorm.

With x̂ the normalised input (batch statistics for BatchNorm in train mode, running statistics in
eval mode, per-sample statistics for GroupNorm/LayerNorm/InstanceNorm) and δ the gradient arriving
at the layer's output in the ordinary batch backward, sample i contributes

    γ_i = Σ_t x̂_it ⊙ δ_it,    β_i = Σ_t δ_it,

summed over the positions t that share one affine entry. For BatchNorm in train mode δ already
carries the coupling through the batch statistics, so these are the per-sample contributions of
the batch backward (they sum to the batch gradient, so ``1ᵀ G 1 = B²‖∇L‖²`` for a mean loss).

The layer's forward runs through the ATen op that also returns its statistics (native batch/
group/layer norm, the op ``F.batch_norm`` etc. reach), so no statistic is recomputed; a reference
to the input (autograd keeps it anyway) and the statistics are kept, and a hook on the output
tensor receives δ. InstanceNorm keeps its own forward and computes its statistics in a hook.
For channel-wise layers both sums come from one call of the batch-norm backward kernel over the
B·C (sample, channel) pairs with the recorded statistics, so x̂ is never formed.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import Unit, override_forward, register_unit

__all__ = ["NormUnit"]


def _family(m: nn.Module) -> str:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batch"
    if isinstance(m, nn.GroupNorm):
        return "group"
    if isinstance(m, nn.LayerNorm):
        return "layer"
    return "instance"


class NormUnit(Unit):
    kind = "norm"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = _family(self.module)

    def install(self, rec):
        self.rec = rec
        m = self.module
        if self.family == "instance":
            return self._install_hooks(rec)

        def forward(x):
            lead = x.shape[:x.dim() - len(m.normalized_shape)] if self.family == "layer" else None
            rec._forward(self, x.shape[0], x.dtype, lead=lead)
            try:
                out, ctx = self._forward_with_stats(x)
            finally:
                rec._forward_done(self)
            if out.requires_grad:
                out.register_hook(lambda g: self._grad(ctx, g))
            return out

        return [override_forward(m, forward)]

    def _install_hooks(self, rec):
        m = self.module

        def pre(module, args):
            x = args[0]
            rec._forward(self, x.shape[0], x.dtype)

        def post(module, args, out):
            rec._forward_done(self)
            if not rec._active or not isinstance(out, torch.Tensor) or not out.requires_grad:
                return None
            ctx = self._stats(args[0])
            out.register_hook(lambda g: self._grad(ctx, g))
            return None

        return [m.register_forward_pre_hook(pre), m.register_forward_hook(post, always_call=True)]

    def _forward_with_stats(self, x):
        """The module's own computation, through the ATen ops that also return its statistics."""
        out, ctx = self._native_forward(x)
        # the statistics leave autograd: holding graph-attached copies kept activation-sized
        # buffers alive until the backward (measured: one extra activation per GroupNorm)
        return out, tuple(t.detach() for t in ctx)

    def _native_forward(self, x):
        m = self.module
        B = x.shape[0]
        if self.family == "layer":
            out, mean, rstd = torch.ops.aten.native_layer_norm(x, list(m.normalized_shape), m.weight,
                                                               m.bias, m.eps)
            D = 1
            for s in m.normalized_shape:
                D *= s
            return out, (x.reshape(B, -1, D), mean.reshape(B, -1, 1), rstd.reshape(B, -1, 1))
        if self.family == "group":
            C = x.shape[1]
            xc = x.contiguous()
            out, mean, rstd = torch.ops.aten.native_group_norm(
                xc, m.weight, m.bias, B, C, xc[0, 0].numel(), m.num_groups, m.eps)
            reps = C // m.num_groups
            return out, (xc.reshape(B, C, -1), mean.repeat_interleave(reps, 1), rstd.repeat_interleave(reps, 1))
        # batch norm: mirrors nn.modules.batchnorm._BatchNorm.forward
        m._check_input_dim(x)
        eaf = 0.0 if m.momentum is None else m.momentum
        if m.training and m.track_running_stats and m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            eaf = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
        use_batch = m.training or (m.running_mean is None and m.running_var is None)
        keep = not m.training or m.track_running_stats
        rm = m.running_mean if keep else None
        rv = m.running_var if keep else None
        C = x.shape[1] if x.dim() > 1 else 1
        xr = x.reshape(B, C, -1)
        if use_batch:
            out, mean, invstd = torch.ops.aten.native_batch_norm(x, m.weight, m.bias, rm, rv, True, eaf, m.eps)
            return out, (xr, mean.unsqueeze(0), invstd.unsqueeze(0))
        out = torch.nn.functional.batch_norm(x, rm, rv, m.weight, m.bias, False, eaf, m.eps)
        return out, (xr, rm.unsqueeze(0), torch.rsqrt(rv + m.eps).unsqueeze(0))

    def _stats(self, x):
        """(x, mean, invstd) broadcastable to the (B, C, S) or (B, T, D) view used in backward."""
        m = self.module
        B = x.shape[0]
        with torch.no_grad():
            if self.family == "layer":
                D = 1
                for s in m.normalized_shape:
                    D *= s
                xr = x.reshape(B, -1, D)
                var, mean = torch.var_mean(xr, dim=2, keepdim=True, correction=0)
                return xr, mean, torch.rsqrt(var + m.eps)
            C = x.shape[1] if x.dim() > 1 else 1
            xr = x.reshape(B, C, -1)
            if self.family == "group":
                G = m.num_groups
                var, mean = torch.var_mean(xr.reshape(B, G, -1), dim=2, correction=0)
                reps = C // G
                return xr, mean.repeat_interleave(reps, 1), torch.rsqrt(var + m.eps).repeat_interleave(reps, 1)
            use_batch = m.training or m.running_mean is None
            if self.family == "batch":
                if use_batch:
                    var, mean = torch.var_mean(xr, dim=(0, 2), correction=0)
                else:
                    mean, var = m.running_mean, m.running_var
                return xr, mean.unsqueeze(0), torch.rsqrt(var + m.eps).unsqueeze(0)
            # instance norm
            if use_batch:
                var, mean = torch.var_mean(xr, dim=2, correction=0)
                return xr, mean, torch.rsqrt(var + m.eps)
            return xr, m.running_mean.unsqueeze(0), torch.rsqrt(m.running_var + m.eps).unsqueeze(0)

    def _grad(self, ctx, g):
        rec = self.rec
        rec._backward(self)
        m = self.module
        xr, mean, invstd = ctx
        B = xr.shape[0]
        w_sel, b_sel = self.w_sel, self.b_sel
        with torch.no_grad():
            gr = g.reshape(xr.shape)
            blocks = []
            if self.family == "layer":
                if w_sel:
                    xhat = (xr - mean) * invstd
                    blocks.append((m.weight, (xhat * gr).sum(1)))
                if b_sel:
                    blocks.append((m.bias, gr.sum(1)))
            else:
                # per-(sample, channel) sums Σ_s x̂·δ and Σ_s δ in one fused pass: the batch-norm
                # backward kernel over B·C "channels", fed the statistics actually used
                C = xr.shape[1]
                BC = B * C
                _, s_w, s_b = torch.ops.aten.native_batch_norm_backward(
                    gr.reshape(1, BC, -1), xr.reshape(1, BC, -1), None, None, None,
                    mean.expand(B, C).reshape(BC), invstd.expand(B, C).reshape(BC), True, 0.0,
                    [False, w_sel, b_sel])
                if w_sel:
                    blocks.append((m.weight, s_w.view(B, C)))
                if b_sel:
                    blocks.append((m.bias, s_b.view(B, C)))
            self.set_path("norm", f"{self.family} norm, {'batch' if self._coupled() else 'per-sample'} "
                                  "statistics; per-sample affine terms (B×C)")
            rec._add_rows(self, [(p, J.reshape(B, -1)) for p, J in blocks])
        return None

    def _coupled(self) -> bool:
        m = self.module
        return self.family == "batch" and (m.training or m.running_mean is None)


for _norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_unit(_norm, NormUnit)
