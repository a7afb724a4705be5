r"""Per-layer versions of the Gram statistics, from the per-layer blocks :math:`G = \sum_l G_l`.

Every adapter can keep the blocks :math:`G_l = J_l J_l^\top` of each layer (``blocks=True`` /
a per-layer sink); each is itself the Gram of that layer's per-sample gradients, so every
statistic of a Gram has a per-layer version: :func:`per_layer` maps a function of a Gram over the
blocks, and :class:`PerLayer` records chosen ones at every measured step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .base import Statistic, StepInputs, register_statistic
from .batch import _noise, _tests
from .spectral import _effective_rank, _stable_rank
from ..spectral import _eigs

__all__ = ["MEASURES", "PerLayer", "per_layer"]


def per_layer(fn: Callable[..., Any], blocks: dict[str, Any], /, **kwargs: Any) -> dict[str, Any]:
    """``{layer: fn(block, **kwargs)}`` over per-layer Gram blocks.

    Raises:
        TypeError: ``blocks`` is not a dict of Grams.

    Example:
        >>> import numpy as np
        >>> from fimcore.stats import per_layer, stable_rank
        >>> out = per_layer(stable_rank, {"fc1": np.diag([2.0, 2.0]), "fc2": np.diag([4.0, 0.0])})
        >>> {k: float(v) for k, v in out.items()}
        {'fc1': 2.0, 'fc2': 1.0}
    """
    if not isinstance(blocks, dict):
        raise TypeError(f"blocks must be a dict {{layer name: (B, B) Gram block}}; received "
                        f"{type(blocks).__name__}. Ask the adapter for per-layer blocks.")
    return {name: fn(block, **kwargs) for name, block in blocks.items()}


def _trace(sym, eigs, *, xp):
    return xp.sum(xp.linalg.diagonal(sym))


def _b_simple(sym, eigs, *, xp):
    return _noise(sym, xp=xp).B_simple


def _norm(sym, eigs, *, xp):
    return _tests(sym, xp=xp).norm


#: what :class:`PerLayer` can record per layer: name -> f(sym block, its eigenvalues, xp)
MEASURES: dict[str, Callable[..., Any]] = {
    "trace": _trace,
    "effective_rank": lambda sym, eigs, *, xp: _effective_rank(eigs, xp=xp),
    "stable_rank": lambda sym, eigs, *, xp: _stable_rank(eigs, xp=xp),
    "B_simple": _b_simple,
    "norm_test": _norm,
}


@register_statistic
@dataclasses.dataclass(frozen=True)
class PerLayer(Statistic):
    r"""Chosen statistics of every layer's block at every measured step.

    The record field ``per_layer`` is ``{layer: {measure: value}}`` (None where undefined, e.g.
    an all-zero block's ranks). Needs the per-layer blocks (``blocks=`` of the tracker's
    ``update``, or a ``GramResult`` that carries them); without them it records ``{}``. The state
    is a dict keyed by layer, so its structure is fixed only after the first step.

    Args:
        measures: names from :data:`MEASURES` (``trace``, ``effective_rank``, ``stable_rank``,
            ``B_simple``, ``norm_test``).
    """

    measures: tuple[str, ...] = ("trace", "effective_rank", "stable_rank")
    name = "per_layer"
    fields = ("per_layer",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "measures", tuple(self.measures))
        unknown = [m for m in self.measures if m not in MEASURES]
        if unknown or not self.measures:
            raise ValueError(f"measures must be a non-empty subset of {sorted(MEASURES)}; "
                             f"received unknown {unknown}.")

    def init(self, *, xp=None, device=None) -> dict:
        return {}

    def update(self, state: dict, step: StepInputs, *, xp: Any) -> dict:
        if not step.blocks:
            return {}
        out = {}
        for layer, block in step.blocks.items():
            eigs = _eigs(block, xp=xp)
            batch_measures = ("B_simple", "norm_test")
            out[layer] = {m: MEASURES[m](block, eigs, xp=xp) for m in self.measures
                          if block.shape[0] >= 2 or m not in batch_measures}
        return out

    def record(self, state: dict) -> dict[str, Any]:
        return {"per_layer": {layer: {m: _value(v) for m, v in values.items()}
                              for layer, values in state.items()}}


def _value(v: Any) -> float | None:
    v = float(v)
    return None if v != v else v
