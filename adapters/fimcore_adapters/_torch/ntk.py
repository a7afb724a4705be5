r"""Output-Jacobian Gram (empirical NTK) and its loss-Hessian-weighted form (PyTorch).

For network outputs h(x_i) ∈ ℝ^C and 𝒥 = ∂h/∂θ stacked to (B·C) × P, the NTK Gram is
Θ = 𝒥𝒥ᵀ (BC × BC, row i·C + c = output c of sample i). Weighted by the loss Hessian
Λ_i = ∇²_h ℓ (block-diagonal over samples) it is W = Λ^{1/2} Θ Λ^{1/2}, whose non-zero eigenvalues
are B × those of the Fisher F = (1/B) Σ_i 𝒥_iᵀ Λ_i 𝒥_i (the generalised Gauss–Newton matrix; equal
to the true Fisher for softmax cross-entropy and Gaussian regression). Λ^{1/2} is the symmetric
square root; any factor L with LLᵀ = Λ gives the same spectrum.

Exact: rows of 𝒥 come from one reverse pass per output entry through the batch forward's
retained graph, ``chunk_size`` rows at a time; the off-diagonal chunk blocks recompute their
partner chunk, so at most 2·chunk_size × P numbers are alive (B·C ≤ 100·B passes: meant for
measuring, not for every training step). The output is
differentiated as a whole batch, so layers that couple samples (BatchNorm in train mode) are
exact too.
"""

from __future__ import annotations

import torch
from torch import nn

from .._fisher import WEIGHTINGS

__all__ = ["output_jacobian_gram"]

MAX_OUTPUTS = 100


def output_jacobian_gram(model: nn.Module, x, *, weighted_by: str | None = None,
                         chunk_size: int | None = None, max_outputs: int = MAX_OUTPUTS,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""The (B·C, B·C) output-Jacobian Gram Θ = 𝒥𝒥ᵀ, or Λ^{1/2}𝒥𝒥ᵀΛ^{1/2}.

    Args:
        model: the network; ``model(x)`` returns (B, C) (or (B, …), flattened to C outputs).
        x: the input batch (a tensor, or a tuple of tensors passed positionally).
        weighted_by: None (Θ, the NTK Gram), ``"softmax"`` (Λ_i = diag(p_i) − p_i p_iᵀ,
            p_i = softmax(h_i): the Fisher of softmax cross-entropy on logits) or ``"mse"``
            (Λ = (2/C)·I, the Hessian of the per-sample batch-mean squared error (1/C)‖h − y‖²).
        chunk_size: Jacobian rows held at once (exact for every value; ``n = ⌈BC/chunk⌉`` chunks
            cost n(n+1)/2 chunk evaluations). None: all B·C rows in one chunk.
        max_outputs: refuse models with more than this many outputs per sample C.
        dtype: dtype of the Gram (rows are cast before the products); default the output's.

    Returns:
        (B·C, B·C) tensor; entry (i·C + a, j·C + b) = ∂h_ia/∂θ · ∂h_jb/∂θ (weighted by Λ^{1/2}).

    Raises:
        ValueError: a bad ``weighted_by`` or ``chunk_size``, C > ``max_outputs``, or an output
            without a batch dimension.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2, bias=False).double()
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> K = output_jacobian_gram(model, x)          # Θ = (x xᵀ) ⊗ I_2 for a linear model
        >>> bool(torch.allclose(K, torch.kron(x @ x.T, torch.eye(2, dtype=torch.float64))))
        True
    """
    if weighted_by not in WEIGHTINGS:
        raise ValueError(f"weighted_by must be one of {WEIGHTINGS}; received {weighted_by!r}. Use None "
                         "for the NTK Gram, 'softmax' for softmax cross-entropy, 'mse' for squared error")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None; received {chunk_size!r}")
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [(b, b.clone()) for b in model.buffers()]        # the forward may update them
    try:
        out = model(*inputs)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model output must be one tensor with a batch dimension, (B, C) or "
                         f"(B, …); received {shape}")
    h = out.reshape(out.shape[0], -1)
    B, C = h.shape
    if C > max_outputs:
        raise ValueError(f"output_jacobian_gram forms a (B·C)² Gram and B·C Jacobian rows; C must be "
                         f"at most {max_outputs} outputs per sample; received C = {C}. Pass "
                         "max_outputs=C if the memory allows, or take the per-sample Gram instead")
    dt = dtype or h.dtype
    n = B * C
    r = n if chunk_size is None else min(chunk_size, n)
    flat = h.reshape(-1)

    def rows(a0, a1):
        """Rows a0..a1 of 𝒥 (one reverse pass each through the retained graph)."""
        out_rows = torch.empty(a1 - a0, sum(p.numel() for p in params), dtype=dt, device=h.device)
        for k in range(a0, a1):
            grads = torch.autograd.grad(flat[k], params, retain_graph=True, allow_unused=True)
            out_rows[k - a0] = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                          for g, p in zip(grads, params)])
        return out_rows

    gram = torch.empty(n, n, dtype=dt, device=h.device)
    bounds = [(a, min(a + r, n)) for a in range(0, n, r)]
    for ia, (a0, a1) in enumerate(bounds):
        Ja = rows(a0, a1)
        gram[a0:a1, a0:a1] = Ja @ Ja.T
        for b0, b1 in bounds[:ia]:
            block = Ja @ rows(b0, b1).T
            gram[a0:a1, b0:b1] = block
            gram[b0:b1, a0:a1] = block.T
    if weighted_by is None:
        return gram
    if weighted_by == "mse":
        return gram * (2.0 / C)
    p = torch.softmax(h.detach().to(torch.float64), dim=1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    w, V = torch.linalg.eigh(lam)
    # Λ is singular (Λ1 = 0): eigenvalues at rounding level are zeros, not sqrt(eps)-sized roots
    w = torch.where(w > C * torch.finfo(w.dtype).eps * w.amax(dim=-1, keepdim=True), w,
                    torch.zeros((), dtype=w.dtype))
    root = ((V * w.sqrt().unsqueeze(1)) @ V.transpose(1, 2)).to(dt)   # (B, C, C)
    g4 = gram.view(B, C, B, C)
    g4 = torch.einsum("iab,ibjc->iajc", root, g4)
    g4 = torch.einsum("iajc,jcd->iajd", g4, root)
    return g4.reshape(n, n)
