r"""Labels drawn from the model for the sampled-label Fisher Gram (PyTorch).

:func:`output_cotangents` turns the model output h (B, …) into K output cotangents
``v_k = ∇_h L(h, ŷ_k)`` of the batch loss at labels ŷ_k drawn from the model's predictive
distribution (formulas in :mod:`fimcore_adapters._fisher`). One backward of h with each v_k
through the recorder's layer rules gives the Gram of draw k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._fisher import LIKELIHOODS, unsampled_loss

__all__ = ["resolve_likelihood", "output_cotangents", "make_generator"]


def resolve_likelihood(loss) -> str:
    """``"cross_entropy"`` or ``"mse"`` for a loss the sampled Fisher can draw labels for.

    Accepts those names, ``nn.CrossEntropyLoss`` (no class weights, no label smoothing),
    ``nn.MSELoss``, ``F.cross_entropy`` and ``F.mse_loss``.

    Raises:
        ValueError: any other loss (named), with the fix.
    """
    if isinstance(loss, str) and loss in LIKELIHOODS:
        return loss
    if loss is F.cross_entropy:
        return "cross_entropy"
    if loss is F.mse_loss:
        return "mse"
    if isinstance(loss, nn.CrossEntropyLoss):
        if loss.weight is not None or loss.label_smoothing != 0.0:
            raise ValueError(
                "fisher='sampled' reads nn.CrossEntropyLoss as the negative log-likelihood of a "
                "softmax categorical; received one with class weights or label_smoothing="
                f"{loss.label_smoothing}, which is not a log-likelihood. Use nn.CrossEntropyLoss() "
                "without them for the Fisher, or fisher='empirical'")
        return "cross_entropy"
    if isinstance(loss, nn.MSELoss):
        return "mse"
    if loss is None:
        raise ValueError("fisher='sampled' needs the loss to know which likelihood to draw labels "
                         "from; received loss=None. Pass loss=nn.CrossEntropyLoss() (or "
                         "'cross_entropy') or loss=nn.MSELoss() (or 'mse')")
    name = loss if isinstance(loss, str) else type(loss).__name__
    raise unsampled_loss(repr(name))


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from torch's global RNG when ``seed`` is None."""
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    return torch.Generator().manual_seed(seed)


def output_cotangents(h: torch.Tensor, likelihood: str, mc_samples: int, reduction: str,
                      generator: torch.Generator):
    """K cotangents of the batch loss at sampled labels, and the labels.

    Args:
        h: model output: logits (B, C, *) for ``"cross_entropy"``, the mean (B, *) for ``"mse"``.
        likelihood: ``"cross_entropy"`` or ``"mse"``.
        mc_samples: K.
        reduction: the batch loss's reduction, ``"mean"`` (over every element the framework's
            loss averages) or ``"sum"``.
        generator: CPU generator the draws come from (drawn in float64 on the CPU, so a seed gives
            the same labels on every device).

    Returns:
        ``(v, labels)``: v of shape (K, *h.shape) in h's dtype and device, ``∂L/∂h`` at each draw;
        labels (K, B, *) class indices (int64) or regression targets (h's dtype).

    Raises:
        ValueError: an output shape the likelihood cannot take.
    """
    hd = h.detach().to(device="cpu", dtype=torch.float64)
    B = h.shape[0]
    if likelihood == "cross_entropy":
        if h.dim() < 2:
            raise ValueError(
                "fisher='sampled' with cross-entropy needs logits of shape (B, C) or (B, C, …) "
                f"(class axis 1); received a model output of shape {tuple(h.shape)}")
        C = h.shape[1]
        positions = math.prod(h.shape[2:])
        p = torch.softmax(hd, dim=1)
        flat = p.movedim(1, -1).reshape(-1, C)                     # (B·positions, C)
        draws = torch.multinomial(flat, mc_samples, replacement=True, generator=generator)
        labels = draws.T.reshape((mc_samples, B) + tuple(h.shape[2:]))   # (K, B, *)
        onehot = F.one_hot(labels, C).movedim(-1, 2).to(torch.float64)  # (K, B, C, *)
        v = p.unsqueeze(0) - onehot
        if reduction == "mean":
            v = v / (B * positions)
    elif likelihood == "mse":
        D = math.prod(h.shape[1:])
        c = 1.0 / D if reduction == "mean" else 1.0       # per-sample loss c·‖h_i − y_i‖²
        sigma = math.sqrt(1.0 / (2.0 * c))
        eps = torch.randn((mc_samples,) + tuple(h.shape), generator=generator, dtype=torch.float64)
        labels = hd.unsqueeze(0) + sigma * eps
        v = 2.0 * c * (hd.unsqueeze(0) - labels)
        if reduction == "mean":
            v = v / B
        labels = labels.to(h.dtype)
    else:                                                   # pragma: no cover (validated before)
        raise unsampled_loss(repr(likelihood))
    return v.to(device=h.device, dtype=h.dtype), labels.to(h.device)
