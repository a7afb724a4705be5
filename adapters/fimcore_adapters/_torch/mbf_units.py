"""MBF's view of a PyTorch model: which parameters form which mini-blocks, and their estimates.

A *unit* is what one curvature tensor serves:

* ``nn.Linear`` → ``"dense"`` (d_out blocks of size d_in+1: rows ``[W | b]``) or
  ``"dense_averaged"`` (one shared block) above ``average_above`` block entries;
* ``nn.Conv1d/2d/3d`` weight → ``"conv"`` (one κ×κ block per (output, input-within-group)
  pair; the (c_out, c_in/groups, *kernel) weight layout already holds only the pairs that exist,
  so grouped and depthwise convolutions need nothing more) or ``"conv_averaged"``; its bias →
  ``"conv_bias"`` (size-1 blocks, no square root);
* every other trainable parameter → ``"diagonal"`` (Adam-like).

The block *rows* of a unit are its gradient laid out as (blocks..., block_size), so the
mini-batch estimate is ``rows[..., :, None] * rows[..., None, :]``. The per-sample estimate
(``curvature="per_sample"``) uses the layer input captured by a forward hook and the output
gradient captured by a tensor hook: for a dense layer with T positions per sample,
``g_n = Σ_t δ_{n,t} ã_{n,t}ᵀ`` (ã = [a; 1]); for T = 1 the blocks are
``F_o = (1/m) Σ_n δ_{n,o}² ã_n ã_nᵀ`` without per-sample gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fimcore.mbf import BlockLayout, conv_layout, dense_layout, diagonal_layout

from . import convps

__all__ = ["Unit", "discover_units", "unit_rows", "per_sample_estimate"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(eq=False)
class Unit:
    """One preconditioned group of parameters (see the module docstring for ``kind``)."""

    name: str
    kind: str
    layout: BlockLayout
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    module: nn.Module | None = None
    reason: str = ""
    captures: list = field(default_factory=list)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def key(self) -> torch.Tensor:
        """The parameter whose optimiser state holds the unit's curvature and factor."""
        return self.weight if self.weight is not None else self.bias


def _trainable(p) -> bool:
    return p is not None and p.requires_grad


def discover_units(model: nn.Module, params: set[int], *, average_above: float,
                   conv_average: bool) -> list[Unit]:
    """The units of ``model`` restricted to the parameters whose ``id`` is in ``params``.

    Raises:
        ValueError: no ``nn.Linear`` or convolution weight is trainable in ``params``.
    """
    units: list[Unit] = []
    claimed: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and _trainable(m.weight) and id(m.weight) in params \
                and id(m.weight) not in claimed:
            b = m.bias if _trainable(m.bias) and id(m.bias) in params else None
            lay = dense_layout(m.out_features, m.in_features, has_bias=b is not None,
                               average_above=average_above)
            units.append(Unit(name or "<model>", lay.kind, lay, m.weight, b, m))
            claimed.update(id(p) for p in (m.weight, b) if p is not None)
        elif isinstance(m, _CONV) and _trainable(m.weight) and id(m.weight) in params \
                and id(m.weight) not in claimed:
            w = m.weight
            lay = conv_layout(w.shape[0], w.shape[1], w.shape[2:], conv_average=conv_average)
            units.append(Unit(name or "<model>", lay.kind, lay, w, None, m))
            claimed.add(id(w))
            if _trainable(m.bias) and id(m.bias) in params and id(m.bias) not in claimed:
                units.append(Unit(f"{name}.bias", "conv_bias",
                                  diagonal_layout(m.bias.numel(), kind="conv_bias"), None, m.bias, m,
                                  reason="convolution bias: size-1 blocks μ_b/(F̄_b+λ)"))
                claimed.add(id(m.bias))
    if not units:
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if any(True for _ in m.parameters(recurse=False))})
        raise ValueError(
            "MBF needs at least one trainable nn.Linear or nn.Conv1d/2d/3d weight among the "
            f"optimised parameters; received a {type(model).__name__} whose parameterised modules "
            f"are {kinds or 'none'}. Use an Adam-like optimiser for such a model, or pass the "
            "parameters of its Linear/Conv layers.")
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if _trainable(p) and id(p) in params and id(p) not in claimed:
                full = f"{mname}.{pname}" if mname else pname
                units.append(Unit(full, "diagonal", diagonal_layout(p.numel()), None, p, m,
                                  reason=f"{type(m).__name__} has no mini-block rule: Adam-like μ/(√v+ε)"))
                claimed.add(id(p))
    return units


def unit_rows(unit: Unit, grads: dict[int, torch.Tensor]) -> torch.Tensor:
    """The unit's gradient (or momentum) as block rows (blocks..., block_size).

    ``grads`` maps ``id(param)`` to a tensor of that parameter's shape; a missing bias entry of
    a dense unit counts as zero.
    """
    if unit.kind in ("dense", "dense_averaged"):
        w = grads[id(unit.weight)]
        if unit.bias is None:
            return w
        b = grads.get(id(unit.bias))
        b = torch.zeros_like(unit.bias) if b is None else b
        return torch.cat([w, b.unsqueeze(1)], 1)
    if unit.kind in ("conv", "conv_averaged"):
        w = grads[id(unit.weight)]
        return w.reshape(w.shape[0], w.shape[1], -1)
    return grads[id(unit.bias)].reshape(-1)


def split_rows(unit: Unit, rows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Inverse of :func:`unit_rows`: {id(param): tensor of the parameter's shape}."""
    if unit.kind in ("dense", "dense_averaged"):
        if unit.bias is None:
            return {id(unit.weight): rows}
        return {id(unit.weight): rows[:, :-1], id(unit.bias): rows[:, -1]}
    if unit.kind in ("conv", "conv_averaged"):
        return {id(unit.weight): rows.reshape(unit.weight.shape)}
    return {id(unit.bias): rows.reshape(unit.bias.shape)}


def minibatch_estimate(unit: Unit, rows: torch.Tensor) -> torch.Tensor:
    """:math:`\\bar g_j\\bar g_j^\\top` per block, or their mean for the averaged kinds, or ḡ²."""
    if unit.kind in ("dense", "conv"):
        return rows.unsqueeze(-1) * rows.unsqueeze(-2)
    if unit.kind in ("dense_averaged", "conv_averaged"):
        flat = rows.reshape(-1, rows.shape[-1])
        return flat.T @ flat / flat.shape[0]
    return rows * rows


# ------------------------------------------------------------------------- per-sample capture


def conv_padding(m: nn.Module) -> list[int]:
    """Symmetric zero padding of a convolution as ints, or a ValueError for per-sample blocks."""
    d = len(m.kernel_size)
    if m.padding_mode != "zeros":
        raise ValueError(f"curvature='per_sample' supports zero-padded convolutions; module "
                         f"{type(m).__name__} uses padding_mode={m.padding_mode!r}. Use "
                         "curvature='minibatch_outer' for this model.")
    if m.padding == "valid":
        return [0] * d
    if m.padding == "same":
        pads = []
        for k, dil in zip(m.kernel_size, m.dilation):
            total = dil * (k - 1)
            if total % 2:
                raise ValueError(f"curvature='per_sample' needs symmetric padding; {type(m).__name__} "
                                 f"with padding='same' and kernel {tuple(m.kernel_size)} pads "
                                 "asymmetrically. Pad explicitly or use curvature='minibatch_outer'.")
            pads.append(total // 2)
        return pads
    return list(m.padding)


def install_capture(unit: Unit, wanted) -> torch.utils.hooks.RemovableHandle:
    """A forward hook keeping (input, output gradient) of ``unit.module`` while ``wanted()``."""

    def hook(module, inputs, output):
        if not (wanted() and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                and output.requires_grad):
            return
        entry = {"x": inputs[0].detach(), "go": None}
        unit.captures.append(entry)

        def grad_hook(g, entry=entry):
            entry["go"] = g.detach()

        output.register_hook(grad_hook)

    return unit.module.register_forward_hook(hook)


def per_sample_estimate(unit: Unit, *, loss_reduction: str) -> torch.Tensor:
    """The exact empirical-Fisher blocks :math:`\\tfrac1m\\sum_n g_{n,j}g_{n,j}^\\top` of one unit.

    ``g_n = ∇ℓ_n``: the captured output gradient times m for a mean-reduced loss.

    Raises:
        RuntimeError: the module did not run exactly once with a backward since the last step.
    """
    done = [e for e in unit.captures if e["go"] is not None]
    if len(done) != 1:
        raise RuntimeError(
            f"curvature='per_sample' needs exactly one forward and backward of module "
            f"{unit.name!r} ({type(unit.module).__name__}) before a refreshing step; received "
            f"{len(done)}. Call forward, loss.backward() and step() once per iteration (a module "
            "used twice per forward, e.g. tied weights, needs curvature='minibatch_outer').")
    x, go = done[0]["x"], done[0]["go"]
    m = x.shape[0]
    scale = float(m) if loss_reduction == "mean" else 1.0
    if unit.kind in ("dense", "dense_averaged"):
        return _dense_per_sample(unit, x, go, m, scale)
    if unit.kind == "conv_bias":
        c = go.reshape(m, go.shape[1], -1).sum(-1) * scale
        return (c * c).mean(0)
    return _conv_per_sample(unit, x, go, m, scale)


def _dense_per_sample(unit, x, go, m, scale):
    d_in, d_out = x.shape[-1], go.shape[-1]
    a = x.reshape(m, -1, d_in)
    g = go.reshape(m, -1, d_out) * scale
    if unit.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], -1)
    if a.shape[1] == 1:                                   # one position per sample
        a, g = a[:, 0], g[:, 0]
        if unit.kind == "dense_averaged":
            s = (g * g).sum(1)                            # Σ_o δ_{n,o}²
            return (a * s[:, None]).T @ a / (m * d_out)
        return torch.einsum("no,ni,nj->oij", g * g, a, a) / m
    rows = torch.einsum("nto,nti->noi", g, a)             # per-sample gradients (m, d_out, k)
    if unit.kind == "dense_averaged":
        flat = rows.reshape(-1, rows.shape[-1])
        return flat.T @ flat / (m * d_out)
    return torch.einsum("noi,noj->oij", rows, rows) / m


def _conv_per_sample(unit, x, go, m, scale):
    mod = unit.module
    spec = convps.ConvSpec(dim=len(mod.kernel_size), kernel=tuple(mod.kernel_size),
                           stride=list(mod.stride), dilation=list(mod.dilation), groups=mod.groups,
                           in_channels=mod.in_channels, out_channels=mod.out_channels)
    J = convps.per_sample("grouped", x, go, spec, conv_padding(mod), 0, mod.out_channels)
    rows = J.reshape(m, mod.out_channels, -1, math.prod(spec.kernel)) * scale
    if unit.kind == "conv_averaged":
        flat = rows.reshape(-1, rows.shape[-1])
        return flat.T @ flat / flat.shape[0]
    return torch.einsum("noik,noil->oikl", rows, rows) / m
