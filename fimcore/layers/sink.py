r"""The sink seam: where layer rules put what they compute.

A layer rule never adds into a private accumulator. It hands its contribution to a *sink* in
one of three forms, with the layer's name:

* :meth:`Sink.add_factors` — the factored operands ``a`` (B, T, d_a) and ``g`` (B, T, d_g) of a
  weight used at T positions (``bias``: the layer's bias shares the output gradients);
* :meth:`Sink.add_rows` — per-sample rows :math:`J_l` (B, P_l) of materialised gradients;
* :meth:`Sink.add_block` — a ready (B, B) contribution :math:`J_l J_l^\top`.

A summing sink (:class:`SummingSink`) gives :math:`G = \sum_l J_l J_l^\top`; a per-layer sink
(:class:`PerLayerSink`) also keeps ``{layer: block}`` (and, on request, the factors or rows
themselves), which mini-block curvature and per-layer statistics read; a distributed sink
overrides :meth:`add_factors`/:meth:`add_rows` to gather them across processes before they are
multiplied, because the global Gram needs cross-process products :math:`J_r J_s^\top`.

This module is the array-API reference (NumPy, PyTorch, JAX arrays); the adapters implement the
same four methods on their framework's tensors (in place where the framework allows it), and
TensorFlow, which has no array-API namespace, natively.

Example:
    >>> import numpy as np
    >>> sink = PerLayerSink()
    >>> sink.add_rows("fc", np.array([[1.0, 0.0], [0.0, 2.0]]))
    >>> sink.add_block("norm", np.eye(2))
    >>> sink.gram()
    array([[2., 0.],
           [0., 5.]])
    >>> sorted(sink.blocks())
    ['fc', 'norm']
"""

from __future__ import annotations

from typing import Any

from .._namespace import resolve_namespace
from .kernels import factored_gram, rows_gram

__all__ = ["PerLayerSink", "Sink", "SummingSink"]


class Sink:
    """Interface of a sink (see the module docstring). Subclasses implement :meth:`add_block`."""

    def add_block(self, layer: str, block: Any) -> None:
        """Add a ready (B, B) contribution of ``layer``."""
        raise NotImplementedError

    def add_factors(self, layer: str, a: Any, g: Any, *, bias: bool) -> None:
        r"""Add :math:`\sum_{t,s}(a_{it}\cdot a_{js} + \beta)(g_{it}\cdot g_{js})` of ``layer``."""
        self.add_block(layer, factored_gram(a, g, bias=bias))

    def add_rows(self, layer: str, rows: Any) -> None:
        r"""Add :math:`J_l J_l^\top` of per-sample rows (B, ...) of ``layer``."""
        self.add_block(layer, rows_gram(rows))

    def gram(self) -> Any:
        """The summed (B, B) Gram, or None when nothing was added."""
        raise NotImplementedError

    def blocks(self) -> dict[str, Any] | None:
        """``{layer: (B, B) block}`` when this sink keeps them, else None."""
        return None


class SummingSink(Sink):
    """Sums every contribution into one (B, B) Gram (today's G)."""

    def __init__(self) -> None:
        self._total: Any = None

    def add_block(self, layer: str, block: Any) -> None:
        self._total = block if self._total is None else self._total + block

    def gram(self) -> Any:
        return self._total


class PerLayerSink(SummingSink):
    """Sums into G and keeps ``{layer: block}``; a layer called twice has its blocks summed.

    Args:
        keep_factors: also keep the operands handed over (``factors()``: ``{layer: [("factors",
            a, g, bias) | ("rows", rows)]}``), for consumers that need more than the Gram.

    Note: the blocks of a layer whose parameters are reused across calls are summed per call,
    which is the layer's Gram only if the rule hands over the per-sample gradient summed over
    the calls (the adapters do: reused parameters report once, after their last use).
    """

    def __init__(self, *, keep_factors: bool = False) -> None:
        super().__init__()
        self.keep_factors = keep_factors
        self._blocks: dict[str, Any] = {}
        self._factors: dict[str, list] = {}

    def add_block(self, layer: str, block: Any) -> None:
        super().add_block(layer, block)
        old = self._blocks.get(layer)
        self._blocks[layer] = block if old is None else old + block

    def add_factors(self, layer: str, a: Any, g: Any, *, bias: bool) -> None:
        if self.keep_factors:
            self._factors.setdefault(layer, []).append(("factors", a, g, bias))
        super().add_factors(layer, a, g, bias=bias)

    def add_rows(self, layer: str, rows: Any) -> None:
        if self.keep_factors:
            self._factors.setdefault(layer, []).append(("rows", rows))
        super().add_rows(layer, rows)

    def blocks(self) -> dict[str, Any]:
        return dict(self._blocks)

    def factors(self) -> dict[str, list]:
        """The operands handed over per layer (empty unless ``keep_factors``)."""
        return {k: list(v) for k, v in self._factors.items()}


def check_blocks_sum(gram: Any, blocks: dict[str, Any], *, rtol: float) -> float:
    """Largest |G − Σ blocks| relative to max|G| (a consistency check for tests and debugging)."""
    xp = resolve_namespace(gram)
    total = None
    for b in blocks.values():
        total = b if total is None else total + b
    scale = float(xp.max(xp.abs(gram)))
    err = float(xp.max(xp.abs(gram - total))) / (scale if scale > 0 else 1.0)
    if err > rtol:
        raise AssertionError(f"per-layer blocks must sum to G within {rtol:g} relative; the "
                             f"largest difference is {err:.3g}.")
    return err
