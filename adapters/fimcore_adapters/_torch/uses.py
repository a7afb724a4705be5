"""Watch for selected parameters used outside the forward of every unit that covers them.

Such a use (a tied weight applied through ``F.linear`` in a parent's forward, an L2 penalty
written into the loss) reaches the parameter's gradient without passing any layer rule, so its
share of the per-sample gradients would be missing from G. A ``TorchFunctionMode`` sees every
torch call made while the recorder is active and raises when a call takes such a parameter, with
gradients on, outside the forward of its covering units.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["UseTracker"]


class UseTracker(TorchFunctionMode):
    """Catches a selected parameter used, with gradients, outside every unit covering it."""

    def __init__(self, rec):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            owners = self.rec._param_units
            hit = None
            for a in args:
                if isinstance(a, nn.Parameter):
                    if id(a) in owners:
                        hit = a
                        break
                elif isinstance(a, (list, tuple)):
                    for b in a:
                        if isinstance(b, nn.Parameter) and id(b) in owners:
                            hit = b
                            break
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
                        "Apply the parameter through its module, use the optimiser's weight_decay "
                        "instead of a penalty in the loss, or exclude the parameter with params=..."
                    )
        return out


def _differentiable(out) -> bool:
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    if isinstance(out, (list, tuple)):
        return any(isinstance(o, torch.Tensor) and o.requires_grad for o in out)
    return False
