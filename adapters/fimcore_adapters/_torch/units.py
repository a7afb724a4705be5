"""Units: the modules whose parameters a recorder covers, and how a model is split into them.

A *unit* is one module plus the trainable parameters whose per-sample gradients it reports:

* a module with an exact layer rule (Linear, Conv1d/2d/3d, Embedding, the norm layers, and any
  type a user registered with ``register_layer_rule``; looked up in :mod:`.registry`) covers its
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

from torch import nn

# the rule modules register their module types into the registry when imported
from . import dense, embedding, norm  # noqa: F401
from .generic import GenericUnit
from .layout import TRANSFORMER_TYPES, seq_first
from .registry import Unit, unit_for

__all__ = ["build_units", "GENERIC_SUBTREE_TYPES"]

# Modules that use their children's parameters directly (without calling the children), so the
# whole subtree is one generic unit.
GENERIC_SUBTREE_TYPES: tuple[type, ...] = (nn.MultiheadAttention,)


def build_units(model: nn.Module, selected_ids: set, strategy: str,
                overrides: dict[str, str] | None = None) -> list[Unit]:
    """Split ``model`` into units covering every selected parameter.

    ``overrides`` maps module names to their own strategy (``"generic"`` there makes that module
    a generic unit even where a rule exists).

    Raises:
        ValueError: a module owns selected parameters beside parameterised children.
    """
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
        rule = unit_for(m)
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
