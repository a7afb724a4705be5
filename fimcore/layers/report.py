"""The per-layer report every adapter returns: which exact path each layer took, and why."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerRecord", "Report"]


@dataclass
class LayerRecord:
    """How one layer's share of the Gram matrix ``G = J Jᵀ`` was formed in the last step.

    Attributes:
        name: qualified layer name in the model (``""`` for the model itself).
        module: the layer's class name.
        path: one of :data:`fimcore.layers.PATHS`: ``"factored"``, ``"materialize"``,
            ``"norm"``, ``"generic"``, ``"generic-coupled"`` or ``"not run"``.
        reason: the cost-model figures or the rule that decided the path.
        params: number of this layer's parameters that enter ``G``.
        calls: calls in the last step (> 1: the parameters were reused, their per-sample
            gradients summed over the calls before the Gram was formed).
        trace: this layer's share of ``Tr G`` (loss-reduction scaling applied), or None.
        gathered: in a data-parallel step that forms the global Gram, the form this layer's
            contribution was all-gathered in (``"factors"``: inputs and output gradients;
            ``"rows"``: per-sample gradients), else None.
        bytes_sent: in such a step, the bytes this process contributed to the layer's
            all-gathers, else None.
    """

    name: str
    module: str
    path: str = "not run"
    reason: str = ""
    params: int = 0
    calls: int = 0
    trace: float | None = None
    gathered: str | None = None
    bytes_sent: int | None = None

    def __str__(self) -> str:
        trace = "-" if self.trace is None else f"{self.trace:.4g}"
        return (f"{self.name or '<model>'} ({self.module}, {self.params} params, {self.calls} call(s)): "
                f"{self.path}, trace {trace} — {self.reason}")


class Report(list):
    """A list of :class:`LayerRecord`, printed as a table; ``paths()`` maps names to paths.

    Example:
        >>> r = Report([LayerRecord("fc", "Linear", "factored", "cost", 12, 1, 3.5)])
        >>> r.paths()
        {'fc': 'factored'}
    """

    def paths(self) -> dict[str, str]:
        """``{layer name: path}``."""
        return {rec.name: rec.path for rec in self}

    def __str__(self) -> str:
        head = ("layer", "module", "params", "calls", "path", "trace", "reason")
        rows = [head] + [
            (r.name or "<model>", r.module, str(r.params), str(r.calls), r.path,
             "-" if r.trace is None else f"{r.trace:.4g}", r.reason)
            for r in self
        ]
        widths = [max(len(row[k]) for row in rows) for k in range(len(head) - 1)]
        lines = []
        for n, row in enumerate(rows):
            cells = [row[k].ljust(widths[k]) for k in range(len(head) - 1)] + [row[-1]]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths) + "  ------")
        return "\n".join(lines)
