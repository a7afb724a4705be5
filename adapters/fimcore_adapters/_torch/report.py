"""Per-layer records of which exact path a :class:`GramRecorder` step took, and why."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerRecord", "Report"]


@dataclass
class LayerRecord:
    """How one module's share of the Gram matrix ``G = J Jᵀ`` was formed in the last step.

    Attributes:
        name: qualified module name in the model (``""`` for the model itself).
        module: the module's class name.
        path: ``"factored"`` (Σ_{t,s}(a_it·a_js)(g_it·g_js) without per-sample gradients),
            ``"materialize"`` (that layer's per-sample gradients J_l, then J_l J_lᵀ),
            ``"norm"`` (per-sample affine terms γ_i = Σ_t x̂_i δ_i, β_i = Σ_t δ_i),
            ``"generic"`` (``torch.func`` VJP per sample), ``"generic-coupled"`` (masked batch VJP:
            per-sample contributions of a module that mixes samples), or ``"not run"``.
        reason: the cost-model figures or the rule that decided the path.
        params: number of parameters of this module that enter ``G``.
        calls: forward calls in the last step (> 1 means the parameters were reused; their
            per-sample gradients are summed over the calls before the Gram is formed).
        trace: this layer's share of ``Tr G`` (with the loss-reduction scaling applied), or None
            before a step ran.
        gathered: with ``scope="global"``, the form this layer's contribution was all-gathered
            in (``"factors"``: inputs and output gradients; ``"rows"``: per-sample gradients),
            else None.
        bytes_sent: with ``scope="global"``, the bytes this rank contributed to that layer's
            all-gathers in the last step (padded to the largest local batch; each all-gather
            delivers W−1 times that to every rank), else None.
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
    """A list of :class:`LayerRecord`, printed as a table.

    Attributes:
        communication: with ``scope="global"``, the last step's Gram gathers: ``{"world_size",
            "sizes" (each rank's B_r), "synced" (False under DDP's ``no_sync()``), "bytes" (this
            rank's total contribution), "layers": {name: {"form", "bytes", "rows_bytes",
            "factor_bytes"}}}``; None otherwise.
    """

    communication: dict | None = None

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
        if self.communication is not None:
            c = self.communication
            lines.append(f"global scope: W = {c['world_size']}, local batches {c['sizes']}, "
                         f"{c['bytes']} bytes gathered from this rank in the last step")
        return "\n".join(lines)
