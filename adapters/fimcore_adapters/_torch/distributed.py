r"""The Gram of the global batch under data parallelism (``torch.distributed``, e.g. DDP).

Each of W ranks holds a local batch of B_r samples; the global batch has N = Σ_r B_r rows,
ordered by rank, then by local index. Its Gram needs the cross-rank products
:math:`J_r J_s^\top`, which no rank can form from its own samples. Per layer, each rank
therefore all-gathers what its layer rule hands over, in the form the rule produced:

* *factors* — the inputs ``a`` (B, T, d_a) and output gradients ``g`` (B, T, d_g) of a weight
  used at T positions (dense layers on the factored path, and convolutions there): the global
  block is :math:`\sum_{t,s}(a_{it}\cdot a_{js})(g_{it}\cdot g_{js})` over all N samples (or,
  when cheaper at N, the per-sample gradients :math:`J_i = \sum_t g_{it} a_{it}^\top` formed
  from the gathered factors);
* *rows* — per-sample gradients :math:`J_l` (B, P_l) of a materialised layer, norm layers'
  affine terms, generic and custom rules: the global block is :math:`J_l J_l^\top` of the
  stacked (N, P_l) rows.

A layer takes the factored path only where :math:`T^2(d_a+d_g+1) < d_a d_g`, which implies
:math:`T(d_a+d_g) < d_a d_g`: its factors are then always fewer bytes than its rows, so the
gathered form is the smaller one on that path; on the materialised path rows are gathered (for
dense layers with T > 1 that is the larger form in a narrow band of shapes; the report gives
both sizes). The path is chosen by the cost model at the global N, identically on every rank.

The gathers run on a dedicated process group (``dist.new_group`` over the same ranks), so they
never interleave with DDP's bucketed gradient all-reduce on the model's group; they are launched
asynchronously as the backward reaches each layer and consumed (waited for and multiplied) when
more than ``max_inflight_bytes`` of received data is outstanding, the rest at the end of the
``with`` block, so communication overlaps the backward. A handed-over tensor is sent as it is
(no copy unless it needs padding): layer rules never change it in place afterwards. Every rank
must hand over the same layers in the same order with the same per-sample shapes (the same model
and input shapes apart from the batch); the per-rank batch sizes are exchanged once per step, at
the first layer's forward.

Rows of the global J. DDP averages the ranks' gradients, so ``.grad`` holds
:math:`\nabla L = \frac1W \sum_r \nabla L_r`. With a mean loss (:math:`L_r = \frac1{B_r}
\sum_{i\in r}\ell_i`) row i of rank r is :math:`J_i = \frac{N}{W B_r}\nabla\ell_i`, with a
summed loss :math:`J_i = \frac1W\nabla\ell_i`; then :math:`\sum_i J_i = N\nabla L` (mean) or
:math:`\nabla L` (sum), so :math:`1^\top G 1 = N^2\|\nabla L\|^2` (mean) or :math:`\|\nabla L\|^2`
(sum) with the DDP gradient. For equal local batches (mean) :math:`J_i = \nabla\ell_i`: G is the
single-process Gram of the concatenated batch. Under cross-sample layers (per-rank BatchNorm)
:math:`\nabla\ell_i` stands for sample i's contribution to its rank's batch backward, which
couples it only with the samples of its own rank.

Written for gloo (tested) and NCCL (untested here: no GPU on the test machine); with NCCL the
tensors live on the rank's GPU, as the model's do.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from .cost import factored_cost, materialize_cost

__all__ = ["GlobalGather", "mean_over_ranks", "resolve_scope", "unwrap_ddp"]

SCOPES = ("global", "local")
_DEFAULT_INFLIGHT = 1 << 28      # bytes of received payload held before the oldest is consumed


def unwrap_ddp(model: nn.Module):
    """``(module the recorder hooks, the DDP wrapper or None)``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, model
    return model, None


def resolve_scope(scope, ddp, process_group):
    """The scope in force: ``scope`` itself, or the default (``"global"`` for a DDP model,
    ``"local"`` otherwise).

    Raises:
        ValueError: an unknown scope, or ``"global"`` without an initialised process group.
    """
    if scope is None:
        scope = "global" if ddp is not None else "local"
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} or None; received {scope!r}")
    if scope == "global" and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("scope='global' needs torch.distributed initialised "
                         "(dist.init_process_group(...)) before the recorder is built; received an "
                         "uninitialised torch.distributed. Initialise it, or use scope='local'")
    if process_group is not None and scope != "global":
        raise ValueError(f"process_group is used by scope='global' only; received scope={scope!r} "
                         "with a process_group")
    return scope


def _ranks_of(group) -> list[int]:
    if group is None or group is dist.group.WORLD:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


class _Layer:
    """Per-layer communication record of the last step."""

    __slots__ = ("form", "bytes", "rows_bytes", "factor_bytes")

    def __init__(self):
        self.form, self.bytes, self.rows_bytes, self.factor_bytes = "", 0, 0, 0


class GlobalGather:
    """Gathers each layer's factors or rows over the ranks of a dedicated group and forms the
    global (N, N) Gram (see the module docstring). One per recorder; every rank of the world
    must construct it, in the same order (``dist.new_group`` is collective).

    Args:
        process_group: the ranks whose batches make up the global batch (None: the world, or
            the DDP model's group).
        timeout: seconds a Gram collective may wait for the other ranks before it fails (None:
            torch's default for the backend).
        max_inflight_bytes: received payload held before the oldest gather is consumed.
    """

    def __init__(self, process_group=None, *, timeout: float | None = None,
                 max_inflight_bytes: int | None = None):
        self.ranks = _ranks_of(process_group)
        me = dist.get_rank()
        kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=float(timeout))}
        self.group = dist.new_group(ranks=self.ranks, **kwargs)
        if me not in self.ranks:
            raise ValueError(f"this process (rank {me}) is not in the recorder's process group "
                             f"{self.ranks}; build the global recorder on the ranks of the group")
        self.world = len(self.ranks)
        self.rank = self.ranks.index(me)
        self.timeout = timeout
        self.max_inflight = _DEFAULT_INFLIGHT if max_inflight_bytes is None else int(max_inflight_bytes)
        self.sizes: list[int] | None = None
        self.synced = True
        self.layers: dict[str, _Layer] = {}
        self._queue: deque = deque()
        self._inflight = 0
        self._targets: dict | None = None
        self._acc: torch.Tensor | None = None
        self._marks: list = []
        self._rec = None
        self.agreed: dict[str, str] = {}

    # ---------------------------------------------------------------- per step
    def begin(self, rec, synced: bool) -> None:
        """A ``with`` block starts."""
        self._rec = rec
        self.sizes = None
        self.synced = synced
        self.layers = {}
        self._queue.clear()
        self._inflight = 0
        self._acc = None
        self._targets = {} if rec.keep_blocks else None
        self._marks = []

    def exchange_sizes(self, batch: int, device) -> None:
        """Gather every rank's B_r (blocking; called at the step's first layer forward)."""
        t = torch.tensor([int(batch)], dtype=torch.int64, device=device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._wait(dist.all_gather(out, t, group=self.group, async_op=True), "the batch sizes")
        self.sizes = [int(v) for v in torch.cat(out).tolist()]

    def agree(self, choice: str, options) -> str:
        """Rank 0's ``choice`` (one of ``options``) on every rank (blocking broadcast)."""
        t = torch.tensor([list(options).index(choice)], dtype=torch.int64,
                         device="cuda" if dist.get_backend(self.group) == "nccl" else "cpu")
        self._wait(dist.broadcast(t, src=self.ranks[0], group=self.group, async_op=True),
                   "the per-sample convolution method")
        return list(options)[int(t.item())]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[:self.rank])

    def _wait(self, work, what: str) -> None:
        try:
            work.wait()
        except Exception as exc:      # noqa: BLE001 - re-raised with the context a user needs
            limit = (f"within the recorder's timeout of {self.timeout:g} s" if self.timeout is not None
                     else "within the backend's default timeout")
            raise RuntimeError(
                f"the global-scope GramRecorder's all-gather of {what} on its dedicated process "
                f"group (ranks {self.ranks}) failed on rank {dist.get_rank()}: another rank stopped, "
                f"or did not reach the same collective {limit} (every rank must run the same measured "
                "steps, with the same layers, in the same order). Pass timeout= to fail sooner. "
                f"Backend error: {exc}") from exc

    # ---------------------------------------------------------------- hand-overs
    def add_rows(self, unit, J: torch.Tensor) -> None:
        """Hand over per-sample rows (B, …) of ``unit``."""
        J = J.reshape(J.shape[0], -1)
        self._launch(unit, "rows", [J], J.shape[1])

    def add_factors(self, unit, a: torch.Tensor | None, g: torch.Tensor, *, bias: bool) -> None:
        """Hand over factors: ``a`` (B, T, d_a) or (k, B, T, d_a) for k channel groups (None: the
        weight is not selected), ``g`` likewise; ``bias``: the layer's bias rows Σ_t g_it enter too."""
        if g.dim() == 3:
            a = None if a is None else a.unsqueeze(0)
            g = g.unsqueeze(0)
        k, _, T, d_g = g.shape
        p = (k * a.shape[3] * d_g if a is not None else 0) + (k * d_g if bias else 0)
        if a is None:                 # bias only: its rows are smaller than any factor
            self._launch(unit, "rows", [g.sum(2).permute(1, 0, 2)], p)
            return
        parts = [a.transpose(0, 1), g.transpose(0, 1)]          # batch first: (B, k, T, d)
        self._launch(unit, "factors", parts, p, bias=bias)

    def _launch(self, unit, form, parts, p_rows, bias=False) -> None:
        if self.sizes is None:        # the step's first forward ran without gradients
            self.exchange_sizes(parts[0].shape[0], parts[0].device)
        bmax = max(self.sizes)
        sent, outs, works = 0, [], []
        for t in parts:
            if t.shape[0] < bmax:
                t = torch.cat([t, t.new_zeros((bmax - t.shape[0],) + tuple(t.shape[1:]))])
            t = t.contiguous()
            out = [torch.empty_like(t) for _ in range(self.world)]
            works.append(dist.all_gather(out, t, group=self.group, async_op=True))
            outs.append(out)
            sent += t.numel() * t.element_size()
        rec = self.layers.setdefault(unit.name or "<model>", _Layer())
        rec.form = form if not rec.form or rec.form == form else "mixed"
        rec.bytes += sent
        item = parts[0].element_size()
        rec.rows_bytes += bmax * p_rows * item
        if form == "factors":
            rec.factor_bytes += sent
        self._queue.append((unit, form, works, outs, bias))
        self._inflight += sent * self.world
        while self._inflight > self.max_inflight and len(self._queue) > 1:
            self._consume()

    # ---------------------------------------------------------------- global blocks
    def _target(self, unit, like):
        rec = self._rec
        dtype = rec.dtype or like.dtype
        n = self.total
        if self._targets is not None:
            t = self._targets.get(unit.name)
            if t is None:
                t = self._targets[unit.name] = torch.zeros(n, n, dtype=dtype, device=like.device)
            return t
        if self._acc is None:
            self._acc = torch.zeros(n, n, dtype=dtype, device=like.device)
        return self._acc

    def _stack(self, out) -> torch.Tensor:
        return torch.cat([o[:b] for o, b in zip(out, self.sizes)])

    def _consume(self) -> None:
        unit, form, works, outs, bias = self._queue.popleft()
        for w in works:
            self._wait(w, f"layer {unit.name or '<model>'!r}'s {form}")
        self._inflight -= sum(o[0].numel() * o[0].element_size() for o in outs) * self.world
        if form == "rows":
            J = self._stack(outs[0])
            acc = self._target(unit, J)
            J = J if J.dtype == acc.dtype else J.to(acc.dtype)
            acc.addmm_(J, J.T)
        else:
            A = self._stack(outs[0]).transpose(0, 1)            # (k, N, T, d_a)
            G = self._stack(outs[1]).transpose(0, 1)            # (k, N, T, d_g)
            acc = self._target(unit, G)
            A, G = A.to(acc.dtype), G.to(acc.dtype)
            k, n, T, d_a = A.shape
            d_g = G.shape[3]
            if factored_cost(n, T, d_a, d_g) <= materialize_cost(n, T, k * d_a * d_g):
                from .dense import factored_sum
                factored_sum(acc, A, G, self._rec.memory_budget)
            else:
                J = torch.matmul(G.transpose(2, 3), A)           # (k, N, d_g, d_a)
                J = J.transpose(0, 1).reshape(n, -1)
                acc.addmm_(J, J.T)
            if bias:
                s = G.sum(2).transpose(0, 1).reshape(n, -1)
                acc.addmm_(s, s.T)
        if self._targets is None:
            self._marks.append((unit, torch.trace(acc)))

    def finish(self, step) -> torch.Tensor | None:
        """Consume every gather; put the global Gram (divided by W², so that the recorder's
        B² or 1 scaling with B = N gives the rows of the module docstring) into ``step``.

        Returns:
            this rank's own (B_r, B_r) diagonal block before that division (the local
            unscaled Gram, for the recorder's whole-batch check), or None if nothing was added.
        """
        while self._queue:
            self._consume()
        if self.sizes is None:
            return None
        lo, hi = self.offset, self.offset + self.sizes[self.rank]
        inv = 1.0 / float(self.world) ** 2
        if self._targets is not None:
            if not self._targets:
                return None
            local = sum(t[lo:hi, lo:hi] for t in self._targets.values()).clone()
            for t in self._targets.values():
                t.mul_(inv)
            step.blocks = dict(self._targets)
            step.block_units = {u.name: u for u in self._rec._units if u.name in self._targets}
            step.acc = None
        else:
            if self._acc is None:
                return None
            local = self._acc[lo:hi, lo:hi].clone()
            step.acc = self._acc.mul_(inv)
            step.marks = [(u, t * inv) for u, t in self._marks]
        step.batch = self.total
        return local

    def report(self) -> dict:
        """Bytes this rank contributed to the Gram gathers in the last step (each all-gather
        delivers W−1 times that to every rank), per layer and in total."""
        per = {name: {"form": r.form, "bytes": r.bytes, "rows_bytes": r.rows_bytes,
                      "factor_bytes": r.factor_bytes or None}
               for name, r in self.layers.items()}
        return {"world_size": self.world, "sizes": list(self.sizes or []),
                "synced": self.synced, "bytes": sum(r.bytes for r in self.layers.values()),
                "layers": per}


def mean_over_ranks(values: Mapping[str, float], group=None) -> dict[str, float]:
    """Average scalar measures over the ranks of ``group``: one ``all_reduce`` of a float64
    tensor; the identity (as floats) when torch.distributed is not initialised.

    With ``scope="local"`` every rank measures its own Gram; a loop averages what it logs::

        m = tracker.update(recorder.result(), lr=lr)          # this rank's Measurement
        c, I = m.values["condition"]["c_k"], m.values["energy"]["I_k"]
        avg = mean_over_ranks({"c_k": c, "I_k": I})           # the same dict on every rank

    Every rank must pass the same keys (they are sorted, so the order does not matter), since it
    is one collective. A NaN makes the mean NaN: an undefined c_k (None) must be replaced by the
    caller (e.g. ``float("nan")`` and a separate count of defined steps). Averaging c_k over
    ranks is a mean of B_r-sample condition numbers, not the condition number of the global
    Gram; ``scope="global"`` gives the latter.

    Example:
        >>> mean_over_ranks({"c_k": 12.5, "I_k": 0.25})      # not distributed: the identity
        {'I_k': 0.25, 'c_k': 12.5}

    Raises:
        ValueError: a value that is not a real number.
    """
    keys = sorted(values)
    vals = []
    for k in keys:
        v = values[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(v, complex):
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"mean_over_ranks takes real numbers; received {k!r}: {v!r}") from None
        vals.append(float(v))
    if not (dist.is_available() and dist.is_initialized()):
        return dict(zip(keys, vals))
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    n = dist.get_world_size(group)
    return dict(zip(keys, (t / n).cpu().tolist()))
