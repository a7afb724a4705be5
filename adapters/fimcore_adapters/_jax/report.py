"""Per-layer blocks, the report and :class:`fimcore.GramResult` for the JAX paths.

A jitted step returns arrays only: the Gram ``G`` and, with ``keep_blocks=True``, the dict
``{layer: (B, B) block}`` with :math:`\\sum_l` block :math:`= G`. What is static (layer names,
paths, the gradients' dtype, B, P) is recorded when the step is traced, so
``result(gram, blocks)`` can be called on the host with the step's outputs, jitted or not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fimcore.layers import LayerRecord, Report
from fimcore.results import GramResult

__all__ = ["StepInfo", "leaf_groups"]


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_groups(params):
    """``[(layer name, [leaf indices])]`` of a parameter pytree, in leaf order.

    A layer is the container holding a leaf (``"Dense_0"`` for ``params["Dense_0"]["kernel"]``,
    ``"/"``-joined path); a leaf at the top level of the pytree is its own layer (``"w"``), a
    bare array is ``"<root>"``.
    """
    groups: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        keys = [_key(k) for k in path]
        name = "/".join(keys[:-1]) if len(keys) > 1 else ("/".join(keys) or "<root>")
        groups.setdefault(name, []).append(i)
    return list(groups.items())


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class StepInfo:
    """What a traced step knows statically: its layers and the gradients' dtype, B and P."""

    def __init__(self) -> None:
        self.records: list[LayerRecord] = []
        self.grad_dtype = None
        self.batch_size: int | None = None
        self.num_params: int | None = None
        self.blocks = None          # the last eager step's blocks (None under jit)

    def report(self, blocks=None) -> Report:
        """The per-layer :class:`fimcore.layers.Report`; traces from ``blocks`` when concrete."""
        blocks = self.blocks if blocks is None else blocks
        traces = {}
        if blocks is not None and all(_concrete(b) for b in blocks.values()):
            traces = {k: float(jnp.trace(b)) for k, b in blocks.items()}
        return Report(LayerRecord(r.name, r.module, r.path, r.reason, r.params, r.calls,
                                  traces.get(r.name)) for r in self.records)

    def result(self, gram, blocks=None, *, what: str) -> GramResult:
        if self.batch_size is None:
            raise RuntimeError(f"no step was run: call {what} (or its jitted form) on a batch "
                               "first, then pass its Gram (and blocks) to result().")
        if np.shape(gram) != (self.batch_size, self.batch_size):
            raise ValueError(f"result() takes the (B, B) Gram of the last step, B = "
                             f"{self.batch_size}; received shape {np.shape(gram)}.")
        if blocks is not None and set(blocks) != {r.name for r in self.records}:
            raise ValueError(f"result() takes the blocks of the last step, layers "
                             f"{[r.name for r in self.records]}; received {sorted(blocks)}.")
        return GramResult(gram=gram, grad_dtype=self.grad_dtype, batch_size=self.batch_size,
                          num_params=self.num_params, blocks=None if blocks is None else dict(blocks),
                          report=self.report(blocks), loss_reduction="mean",
                          checked=True)  # the adapter's Σ J Jᵀ: the core reads finiteness off Tr G
