"""Slow float64 references for the PyTorch adapter's Gram matrix (share no code with the adapter).

* :func:`loop_gram`: one forward and one backward per sample (the gradient of that sample's own
  loss), stacked into J, then ``J Jᵀ``. Valid for models whose layers do not couple samples.
* :func:`contribution_gram`: per-sample contributions of the ordinary batch backward (the
  authors' BatchNorm semantics): one batch forward/backward that keeps every parameterised
  module's output gradient δ, then for every module and sample one ``autograd.grad`` of that
  module's output with the cotangent δ masked to the sample. Rows are scaled by B (mean loss).
"""

from __future__ import annotations

import torch
from torch import nn


def _flat(grads, params):
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, params)])


def loop_gram(model: nn.Module, per_sample_loss, inputs, targets, params=None) -> torch.Tensor:
    """G from a loop over samples: row i = ∇_θ ℓ_i with ℓ_i = per_sample_loss(model(x_i), y_i).

    ``inputs``/``targets`` are indexed along dim 0; ``per_sample_loss`` gets batch-1 slices.
    """
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    rows = []
    B = inputs.shape[0]
    for i in range(B):
        loss = per_sample_loss(model(inputs[i:i + 1]), targets[i:i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(_flat(grads, params))
    J = torch.stack(rows)
    return J @ J.T, J


def contribution_gram(model: nn.Module, batch_loss, inputs, targets, scale: float) -> torch.Tensor:
    """G of the per-sample contributions of the batch backward, times ``scale`` (B for a mean loss)."""
    owners = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    outs: dict[int, list] = {}
    handles = [m.register_forward_hook(lambda mod, a, o: outs.setdefault(id(mod), []).append(o))
               for m in owners]
    try:
        loss = batch_loss(model(inputs), targets)
    finally:
        for h in handles:
            h.remove()
    all_outs = [o for m in owners for o in outs.get(id(m), [])]
    deltas = torch.autograd.grad(loss, all_outs, retain_graph=True, allow_unused=True)
    delta_of = {id(o): d for o, d in zip(all_outs, deltas)}
    B = inputs.shape[0]
    params = [p for m in owners for p in m.parameters(recurse=False) if p.requires_grad]
    J = torch.zeros(B, sum(p.numel() for p in params), dtype=torch.float64)
    offset = 0
    for m in owners:
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        width = sum(p.numel() for p in own)
        for o in outs.get(id(m), []):
            d = delta_of[id(o)]
            if d is None:
                continue
            for i in range(B):
                mask = torch.zeros_like(d)
                mask[i] = 1
                g = torch.autograd.grad(o, own, grad_outputs=d * mask, retain_graph=True,
                                        allow_unused=True)
                J[i, offset:offset + width] += _flat(g, own).double()
        offset += width
    J = J * scale
    return J @ J.T, J
