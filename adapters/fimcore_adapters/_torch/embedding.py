"""``nn.Embedding``: per-sample gradients of a lookup table.

Sample i's gradient of row v is ``Σ_{t: idx_it = v} g_it`` (positions holding ``padding_idx``
contribute nothing; with ``scale_grad_by_freq`` each g_it is divided by the count of idx_it in the
batch, as the batch backward does). Two exact forms:

* factored: ``G_ij = Σ_{t,s} [idx_it = idx_js] (g_it·g_js)`` — B²T²(d+1), no V-sized buffer;
* materialised: scatter the per-sample rows into (B, V·d) and form J Jᵀ — B·V·d memory.
"""

from __future__ import annotations

import torch
from torch import nn

from .cost import choose
from .dense import _DEFAULT_WORK, _chunks
from .registry import Unit, register_unit

__all__ = ["EmbeddingUnit"]


class EmbeddingUnit(Unit):
    kind = "embedding"

    def install(self, rec):
        self.rec = rec
        m = self.module

        def pre(module, args):
            rec._forward(self, args[0].shape[0], m.weight.dtype, lead=args[0].shape)

        def post(module, args, out):
            rec._forward_done(self)
            if not rec._active or not out.requires_grad:
                return None
            idx = args[0]
            out.register_hook(lambda g: self._grad(idx, g))
            return None

        return [m.register_forward_pre_hook(pre), m.register_forward_hook(post, always_call=True)]

    def _grad(self, idx, g):
        rec = self.rec
        rec._backward(self)
        m = self.module
        B = idx.shape[0]
        V, d = m.weight.shape
        with torch.no_grad():
            I = idx.reshape(B, -1)
            T = I.shape[1]
            Gg = g.reshape(B, T, d)
            if m.scale_grad_by_freq:
                counts = torch.bincount(I.reshape(-1), minlength=V).to(Gg.dtype)
                Gg = Gg / counts[I].unsqueeze(-1)
            if m.padding_idx is not None:
                Gg = Gg * (I != m.padding_idx).unsqueeze(-1).to(Gg.dtype)
            multi = rec._multi_use(self)
            path, reason = choose(self.strategy, B, T, 1, d, V * d)
            if multi:
                path, reason = "materialize", "parameters reused in this step: per-sample gradients summed over uses"
            self.set_path(path, reason)
            if path == "factored":
                acc = rec._acc(Gg, self)
                G2 = Gg.reshape(B * T, d).to(acc.dtype)
                I2 = I.reshape(B * T)
                per_sample = 2 * T * B * T * acc.element_size()
                for i0, i1 in _chunks(B, per_sample, rec.memory_budget or _DEFAULT_WORK):
                    K = G2[i0 * T:i1 * T] @ G2.T
                    K.mul_(I2[i0 * T:i1 * T, None] == I2[None, :])
                    acc[i0:i1] += K.view(i1 - i0, T, B, T).sum(dim=(1, 3))
                rec._mark(self)
            else:
                J = Gg.new_zeros(B * V, d)
                rows = (torch.arange(B, device=I.device).unsqueeze(1) * V + I).reshape(-1)
                J.index_add_(0, rows, Gg.reshape(B * T, d))
                rec._add_rows(self, [(m.weight, J.view(B, V * d))])
        return None


register_unit(nn.Embedding, EmbeddingUnit)
