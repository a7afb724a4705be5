"""Units: the modules whose parameters a recorder covers, and how a model is split into them.

A *unit* is one module plus the trainable parameters whose per-sample gradients it reports:

* a module with an exact layer rule (Linear, Conv1d/2d/3d, Embedding, the norm layers) covers its
  own parameters;
* any other module that owns trainable parameters is a *generic* unit covering its whole subtree
  (``torch.func`` VJP per sample); this is also how ``nn.MultiheadAttention``, RNNs and custom
  leaf modules are handled, split along the batch dimension they declare (``batch_first``);
* an ``nn.Transformer*`` module with ``batch_first=False`` is one generic unit over its subtree
  (its Linear and LayerNorm children see sequence-first tensors);
* a module that owns parameters *and* has parameterised children (a parent using an
  ``nn.Parameter`` directly in its forward beside its submodules) is refused: its own parameters
  cannot be split per sample without re-running the children.

Every selected parameter belongs to at least one unit, so nothing is silently dropped; a parameter
used outside the forward of every unit that covers it is caught at run time by the recorder.
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import TRANSFORMER_TYPES, seq_first
from .report import LayerRecord

__all__ = ["Unit", "build_units", "GENERIC_SUBTREE_TYPES"]

# Modules that use their children's parameters directly (without calling the children), so the
# whole subtree is one generic unit.
GENERIC_SUBTREE_TYPES: tuple[type, ...] = (nn.MultiheadAttention,)


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


def _rule_for(module: nn.Module):
    """The unit class of an exact layer rule for ``module``, or None.

    A subclass counts only if it does not override ``forward`` (otherwise its computation is
    unknown and the generic path is used).
    """
    from .dense import ConvUnit, LinearUnit
    from .embedding import EmbeddingUnit
    from .norm import NormUnit

    table = (
        (nn.Linear, LinearUnit),
        (nn.Conv1d, ConvUnit), (nn.Conv2d, ConvUnit), (nn.Conv3d, ConvUnit),
        (nn.Embedding, EmbeddingUnit),
        (nn.BatchNorm1d, NormUnit), (nn.BatchNorm2d, NormUnit), (nn.BatchNorm3d, NormUnit),
        (nn.GroupNorm, NormUnit), (nn.LayerNorm, NormUnit),
        (nn.InstanceNorm1d, NormUnit), (nn.InstanceNorm2d, NormUnit), (nn.InstanceNorm3d, NormUnit),
    )
    for base, unit_cls in table:
        if isinstance(module, base) and type(module).forward is base.forward:
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.transposed:
                return None
            return unit_cls
    return None


def build_units(model: nn.Module, selected_ids: set, strategy: str,
                overrides: dict[str, str] | None = None) -> list[Unit]:
    """Split ``model`` into units covering every selected parameter.

    ``overrides`` maps module names to their own strategy (``"generic"`` there makes that module
    a generic unit even where a rule exists).

    Raises:
        ValueError: a module owns selected parameters beside parameterised children.
    """
    from .generic import GenericUnit

    units: list[Unit] = []
    seen: set[int] = set()

    def trainable(m, recurse):
        return [(n, p) for n, p in m.named_parameters(recurse=recurse, remove_duplicate=False)
                if p.requires_grad]

    def visit(name: str, m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        own = trainable(m, recurse=False)
        own_sel = [(n, p) for n, p in own if id(p) in selected_ids]
        rule = _rule_for(m)
        qual = (lambda n: f"{name}.{n}" if name else n)
        chosen = (overrides or {}).get(name, strategy)
        if isinstance(m, TRANSFORMER_TYPES) and seq_first(m):
            # its Linear/LayerNorm children see (S, B, E): the whole module is one generic unit
            # that splits along the declared batch dim 1
            sub = [(qual(n), p) for n, p in trainable(m, recurse=True)]
            if any(id(p) in selected_ids for _, p in sub):
                units.append(GenericUnit(name, m, sub, selected_ids, chosen))
            return
        if own_sel and rule is not None and chosen != "generic":
            units.append(rule(name, m, [(qual(n), p) for n, p in own], selected_ids, chosen))
        elif own_sel or (own and isinstance(m, GENERIC_SUBTREE_TYPES)):
            children_params = [(n, p) for n, p in trainable(m, recurse=True)
                               if "." in n]
            if children_params and not isinstance(m, GENERIC_SUBTREE_TYPES) and rule is None:
                names = ", ".join(qual(n) for n, _ in own_sel)
                raise ValueError(
                    f"parameters {names} are owned by module {name or '<model>'!r} "
                    f"({type(m).__name__}), which also has parameterised submodules; their "
                    "per-sample gradients cannot be split off without re-running the submodules. "
                    "Move these parameters into their own small nn.Module (used in the forward), "
                    "or exclude them with params=..."
                )
            sub = [(qual(n), p) for n, p in trainable(m, recurse=True)]
            if any(id(p) in selected_ids for _, p in sub):
                units.append(GenericUnit(name, m, sub, selected_ids, chosen))
            return
        for cname, child in m.named_children():
            visit(qual(cname), child)

    visit("", model)
    return units
