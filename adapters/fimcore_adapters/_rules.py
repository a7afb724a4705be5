"""The user-rule mechanics the three adapters share: registration and the nearest-class lookup.

Framework-free: each adapter passes its own base types, the name of the method a subclass
must not override, and how it stores a rule.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["nearest_rule", "registration"]


def registration(owner: Any, rule: Any, *, override: Any, owner_base: type, owner_kind: str,
                 base_name: str, rule_base: type, framework: str,
                 store: Callable[[Any], None]):
    """``register_layer_rule(owner, rule=None, *, override=False)`` in either form.

    Checks that ``owner`` is a ``base_name`` subclass (a ``owner_kind`` class), that
    ``override`` is a bool and that the rule is a ``rule_base`` instance or subclass (a subclass
    is instantiated), then hands the instance to ``store`` (which refuses a duplicate unless
    ``override``). Called with ``rule=None`` it returns the decorator.
    """
    if not isinstance(owner, type) or not issubclass(owner, owner_base):
        kind = owner_kind.capitalize()
        raise TypeError(
            f"register_layer_rule needs a {base_name} subclass; received {owner!r}. Pass the "
            f"{owner_kind} class, e.g. register_layer_rule(My{kind}, MyRule()).")
    if not isinstance(override, bool):
        raise TypeError(f"override must be True or False; received {override!r}")

    def _store(r):
        instance = r() if isinstance(r, type) and issubclass(r, rule_base) else r
        if not isinstance(instance, rule_base):
            raise TypeError(
                f"a layer rule must be a LayerRule instance or subclass; received {r!r}. "
                f"Subclass fimcore_adapters.{framework}.LayerRule.")
        store(instance)
        return r

    if rule is None:
        return _store
    _store(rule)
    return rule


def nearest_rule(table: dict, obj: Any, method: str) -> Any:
    """The entry of the nearest class in ``type(obj).__mro__`` that ``table`` holds, or None.

    It applies only if ``obj`` runs that class's own ``method`` (a subclass that overrides it
    changed the computation) and the entry ``supports(obj)``.
    """
    if not table:
        return None
    for cls in type(obj).__mro__:
        entry = table.get(cls)
        if entry is None:
            continue
        if getattr(type(obj), method) is not getattr(cls, method):
            return None
        return entry if entry.supports(obj) else None
    return None
