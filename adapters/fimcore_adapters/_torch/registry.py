"""The unit base type and the module-type → rule table of the PyTorch adapter.

A *unit* is one module plus the trainable parameters whose per-sample gradients it reports (see
:mod:`.units` for how a model is split into units). This module holds

* :class:`Unit`, the base of every rule (it registers the hooks of one step and adds the module's
  share of ``G = J Jᵀ`` to the recorder);
* the table mapping a module type to the :class:`Unit` subclass of its exact rule. The rule
  modules (``dense``, ``embedding``, ``norm``) register their types into it when imported, and
  :mod:`.custom` registers the rules users write (``register_layer_rule``);
* :func:`unit_for`, the lookup: a type's own entry or that of its nearest registered base class,
  provided the module does not override ``forward`` (then its computation is unknown and the
  generic path is used).

It imports none of the rule modules, so the rules can import it without a cycle.
"""

from __future__ import annotations

from torch import nn

from .._rules import nearest_rule
from .report import LayerRecord

__all__ = ["Unit", "override_forward", "register_unit", "registered_unit", "unit_for"]


class Unit:
    """One module covered by a recorder.

    Attributes:
        name: qualified module name.
        module: the module.
        params: ``[(qualified_name, parameter)]`` trainable parameters this unit's forward uses.
        selected: ids of the parameters that enter the Gram matrix.
        record: the :class:`LayerRecord` shown by ``GramRecorder.report()``.
        calls, bw_calls: forward calls and backward calls in the current step.
    """

    kind = "unit"

    def __init__(self, name: str, module: nn.Module, params, selected_ids: set, strategy: str):
        self.name = name
        self.module = module
        self.params = list(params)
        self.selected = {id(p) for _, p in self.params if id(p) in selected_ids}
        self.strategy = strategy
        n_sel = sum(p.numel() for _, p in self.params if id(p) in self.selected)
        self.record = LayerRecord(name=name, module=type(module).__name__, params=n_sel)
        # whether the module's own ``weight`` / ``bias`` enter G (fixed at construction, read on
        # every backward)
        self.w_sel = self.is_selected(getattr(module, "weight", None))
        self.b_sel = self.is_selected(getattr(module, "bias", None))
        self.calls = 0
        self.bw_calls = 0

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this rule is exact for ``module`` (else the module takes the generic path)."""
        return True

    def is_selected(self, p) -> bool:
        return p is not None and id(p) in self.selected

    def install(self, rec) -> list:
        """Register this unit's hooks for one step; return handles with ``.remove()``."""
        raise NotImplementedError

    def set_path(self, path: str, reason: str) -> None:
        self.record.path = path
        self.record.reason = reason


class _ForwardOverride:
    """Handle that installs ``module.forward`` as an instance attribute and restores it."""

    def __init__(self, module: nn.Module, forward):
        self.module = module
        self.had_instance = "forward" in module.__dict__
        self.previous = module.__dict__.get("forward")
        module.forward = forward

    def remove(self) -> None:
        if self.had_instance:
            self.module.forward = self.previous
        else:
            self.module.__dict__.pop("forward", None)


def override_forward(module: nn.Module, forward) -> _ForwardOverride:
    """Replace ``module.forward`` for the duration of a step (undone by ``.remove()``)."""
    return _ForwardOverride(module, forward)


# module type -> factory ``(name, module, params, selected_ids, strategy) -> Unit``
_UNITS: dict[type, object] = {}


def register_unit(module_type: type, unit_factory) -> None:
    """Enter ``unit_factory`` (a :class:`Unit` subclass, or a callable with its constructor's
    signature and a ``supports(module)`` attribute) as the rule of ``module_type``."""
    _UNITS[module_type] = unit_factory


def registered_unit(module_type: type):
    """The factory registered for exactly ``module_type``, or None."""
    return _UNITS.get(module_type)


def unit_for(module: nn.Module):
    """The unit factory of the exact rule for ``module``, or None (generic path).

    The nearest class in ``type(module).__mro__`` with a registered rule decides; it applies only
    if ``module`` runs that class's own ``forward`` and the rule ``supports`` it.
    """
    return nearest_rule(_UNITS, module, "forward")
