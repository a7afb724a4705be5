"""Path and strategy names, one spelling for every adapter.

A *path* is how one layer's Gram contribution was formed (see :mod:`fimcore.layers`); a
*strategy* is what the user asks for: ``"auto"`` (the cost model of :mod:`.cost` picks
factored or materialised per layer), ``"factored"`` or ``"materialize"`` (forced on every layer
that has both forms), ``"generic"`` (every layer through the framework's generic per-sample
path; slow, for checking), or a dict ``{layer name: strategy}`` with ``"auto"`` elsewhere.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PATHS", "STRATEGIES", "check_strategy"]

#: how a layer's share of G was formed ("generic-coupled": the batch-backward rows of a module
#: that mixes samples; "not run": the layer was not called in the last step)
PATHS = ("factored", "materialize", "norm", "generic", "generic-coupled", "not run")

#: what a user may ask for, per model or per layer
STRATEGIES = ("auto", "factored", "materialize", "generic")


def check_strategy(strategy: Any) -> tuple[str, dict[str, str]]:
    """Validate ``strategy``; return ``(default, {layer name: strategy})``.

    Raises:
        ValueError: a value outside :data:`STRATEGIES`.
        TypeError: neither a string nor a dict of strings.

    Example:
        >>> check_strategy("auto")
        ('auto', {})
        >>> check_strategy({"fc": "materialize"})
        ('auto', {'fc': 'materialize'})
    """
    if isinstance(strategy, dict):
        bad = {k: v for k, v in strategy.items() if v not in STRATEGIES}
        if bad:
            raise ValueError(f"strategy values must be in {STRATEGIES}; received {bad}. Pass e.g. "
                             "strategy={'layer.name': 'materialize'}.")
        return "auto", dict(strategy)
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES} or a dict of them; received "
                             f"{strategy!r}.")
        return strategy, {}
    raise TypeError(f"strategy must be a string in {STRATEGIES} or a dict {{layer name: strategy}}; "
                    f"received {type(strategy).__name__}.")
