"""Catch selected parameters whose gradient reaches them outside the recorded layer rules.

Such a use (a tied weight applied through ``F.linear`` in a parent's forward, an L2 penalty
written into the loss) reaches the parameter's gradient without passing any layer rule, so its
share of the per-sample gradients would be missing from G. Two checks, both run on the steps
``check_uses`` selects:

* :class:`UseTracker`, a ``TorchFunctionMode``, sees every torch call made while the recorder is
  active (functions of ``torch`` and ``torch.nn.functional``, tensor methods, operators and
  properties such as ``.T``) and raises, naming the parameter and the call, when a call takes a
  selected parameter, with gradients on, outside the forward of its covering units — whether
  the parameter is passed positionally, by keyword, or inside a list, tuple or dict argument.
* :class:`GradientTotal` is the whole-batch backstop for routes no torch call shows (a custom
  ``autograd.Function``, a view of the parameter taken before the block, a gradient hook that
  changes a gradient): the rows of J sum to the batch gradient, so
  ``1ᵀ G̃ 1 = ‖∇L‖²`` must hold for the unscaled accumulator G̃ (G = B² G̃ for a mean loss,
  G = G̃ for a sum), with ∇L read from autograd's own gradient of every selected parameter.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["UseTracker", "GradientTotal"]

_FIX = ("Apply the parameter through its module, use the optimiser's weight_decay instead of a "
        "penalty in the loss, or exclude the parameter with params=...")


def _find(obj, owners):
    """The first tensor in ``obj`` (nested lists, tuples, dicts) whose id is in ``owners``."""
    if isinstance(obj, torch.Tensor):
        return obj if id(obj) in owners else None
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    else:
        return None
    for o in items:
        hit = _find(o, owners)
        if hit is not None:
            return hit
    return None


class UseTracker(TorchFunctionMode):
    """Catches a selected parameter used, with gradients, outside every unit covering it."""

    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            owners = self.rec._param_units
            hit = _find(args, owners)
            if hit is None and kwargs:
                hit = _find(kwargs, owners)
            if hit is not None and _differentiable(out):
                stack = self.rec._step.stack if self.rec._step is not None else ()
                if not any(u in stack for u in owners[id(hit)]):
                    name = self.rec._param_names[id(hit)]
                    where = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
                    raise RuntimeError(
                        f"parameter {name!r} is used by {where} outside the forward of the module "
                        f"that owns it ({', '.join(repr(u.name) for u in owners[id(hit)])}); such a "
                        "use (tied weights applied through a function, a penalty term in the loss, "
                        "…) has no recorded per-sample gradient, so the Gram matrix would miss it. "
                        + _FIX)
        return out


def _differentiable(out) -> bool:
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    if isinstance(out, (list, tuple)):
        return any(_differentiable(o) for o in out)
    if isinstance(out, dict):
        return any(_differentiable(o) for o in out.values())
    return False


class GradientTotal:
    """‖∇L‖² of the selected parameters, from hooks on autograd's gradient of each of them.

    A leaf tensor's hook receives the parameter's whole gradient of this backward (the sum over
    its uses), before it is accumulated into ``.grad``.
    """

    def __init__(self, params):
        self.params = list(params)
        self.parts: list[torch.Tensor] = []
        self.eps = 0.0

    def install(self) -> list:
        return [p.register_hook(functools.partial(self._seen, p)) for p in self.params]

    def _seen(self, p, g) -> None:
        if g.is_sparse:
            g = g.coalesce().values()
        self.parts.append(torch.linalg.vector_norm(g, dtype=torch.float64).square())
        self.eps = max(self.eps, torch.finfo(g.dtype).eps if g.dtype.is_floating_point else 0.0)

    def check(self, acc: torch.Tensor, grad_dtype) -> None:
        """Raise unless ``1ᵀ acc 1 = ‖∇L‖²`` within rounding.

        Bound: ``|G̃_ij| ≤ sqrt(G̃_ii G̃_jj)``, so ``s² = (Σ_i sqrt(G̃_ii))²`` bounds ``Σ_ij |G̃_ij|``
        and ``‖∇L‖² ≤ s²``; each entry carries a rounding error of at most ``c·eps`` times its
        bound, so both sides agree to ``c·eps·s²``. c = 1e3 covers the float32 entry bound
        ``1e-4·sqrt(G_ii G_jj)`` the recorder is tested to (≈ 840 eps).
        """
        if not self.parts:
            return                    # autograd delivered no gradient to a selected parameter
        a = acc.to(torch.float64)
        grad_sq = torch.stack([t.to(a.device) for t in self.parts]).sum()
        lhs, s, rhs = torch.stack([a.sum(), a.diagonal().clamp_min(0).sqrt().sum(), grad_sq]).tolist()
        if not all(math.isfinite(v) for v in (lhs, s, rhs)):
            return                    # non-finite G: gram() names the layer
        eps = max(self.eps, torch.finfo(grad_dtype).eps if grad_dtype is not None else 0.0)
        if abs(lhs - rhs) > 1e3 * eps * s * s:
            raise RuntimeError(
                "the recorded per-sample gradients do not add up to autograd's gradient: "
                f"1ᵀG1 / (B²‖∇L‖²) = {lhs / rhs if rhs else float('inf'):.6g} (sum reduction: "
                "1ᵀG1 / ‖∇L‖²), where it must be 1. Some selected parameter receives gradient by a "
                "route no layer rule records: a custom autograd.Function taking it, a view or copy "
                "of it made before the `with recorder:` block, or a gradient hook that changes its "
                "gradient. Use the parameter through its module inside the block, remove the hook, "
                "or exclude the parameter with params=...")
