"""``GramRecorder``: the exact per-sample Gram matrix from the user's own forward and backward."""

from __future__ import annotations

import math

import torch
from torch import nn

from .cost import STRATEGIES
from .select import select_parameters
from .uses import UseTracker
from .report import Report
from .units import build_units

__all__ = ["GramRecorder"]

_REDUCTIONS = ("mean", "sum")
CONV_METHODS = ("auto", "grouped", "unfold", "channels_last")


class _Step:
    """Everything recorded during one ``with recorder:`` block."""

    def __init__(self):
        self.batch: int | None = None
        self.acc: torch.Tensor | None = None
        self.marks: list = []          # (unit, cumulative trace as a device scalar)
        self.backward_started = False
        self.pending: dict = {}        # id(param) -> [J sum (B, numel), received, expected, param]
        self.grad_dtype: torch.dtype | None = None
        self.stack: list = []          # units whose forward is running
        self.multi: set | None = None  # ids of units with a parameter used more than once


class GramRecorder:
    """Record the exact B×B Gram matrix ``G = J Jᵀ`` of per-sample gradients during a normal step.

    Row i of J is B × sample i's contribution to the gradient of the batch loss L (for
    ``loss_reduction="mean"``; with ``"sum"`` no rescaling): the gradient of sample i's own loss
    ℓ_i when no layer couples samples, and under BatchNorm in train mode the per-sample
    contribution read off the ordinary batch backward. Hence ``1ᵀ G 1 = B²‖∇L‖²`` always
    (``‖∇L‖²`` for ``"sum"``). Nothing of size B×P is formed: each layer adds its share of G in
    the backward pass, by the factored form ``Σ_{t,s}(a_it·a_js)(g_it·g_js)`` or by that layer's
    per-sample gradients J_l (``J_l J_lᵀ``), whichever the cost model finds cheaper.

    Use one recorder for a whole training loop::

        recorder = GramRecorder(model)
        for x, y in loader:
            opt.zero_grad()
            with recorder:                      # or: with recorder(measure=k % 10 == 0):
                loss = loss_fn(model(x), y)
                loss.backward()
            G = recorder.gram()                 # (B, B) on the model's device
            opt.step()

    ``.grad`` after the block equals that of a plain step (layers whose per-sample gradients are
    formed anyway write their sum as the batch gradient, so autograd does not compute it twice).

    Args:
        model: the network (batch dimension first in every covered layer's input).
        loss_reduction: ``"mean"`` (the loss averages over the batch: G is scaled by B²) or
            ``"sum"``.
        params: None (all trainable parameters) or an iterable of parameter names, module names,
            ``nn.Module`` or ``nn.Parameter`` objects selecting the columns of J.
        strategy: ``"auto"`` (cost model), ``"factored"``, ``"materialize"`` (forced on every
            layer that has both forms), ``"generic"`` (every unit through ``torch.func``; slow,
            for checking), or a dict ``{module name: strategy}`` with ``"auto"`` elsewhere.
        dtype: None (accumulate G in the per-sample gradients' dtype) or e.g. ``torch.float64``.
            Accuracy: in float64 G agrees with a per-sample loop to ~1e-15 relative; for a
            float32 model with float32 accumulation, ``|G_ij − G*_ij| ≤ 1e-4·sqrt(G*_ii G*_jj)``
            against the float64 value G* on small networks (tested bound); the PyTorch benchmark
            tables (``benchmarks/RESULTS.md``) report ‖G − G*‖_F / ‖G*‖_F from 1.2e-7 (MLP) to
            6.6e-4 (BatchNorm ResNets).
        memory_budget: None or bytes: the largest per-layer work buffer; bigger layers are split
            into chunks of output channels (or samples, for the factored form).
        conv_method: how per-sample convolution weight gradients are formed: ``"auto"`` (time the
            candidates once per layer shape and cache), ``"grouped"`` (one convolution backward
            with groups = B), ``"unfold"`` (strided-view unfold + batched GEMM) or
            ``"channels_last"`` (patches of a channels-last copy + batched GEMM; layers without
            channel groups, others use ``"unfold"``).
        check_uses: ``"first"`` (default) watches, during the first measured step, every torch
            call for a selected parameter used with gradients outside the forward of the module
            that covers it (tied weights applied through a function, a penalty term in the loss),
            which would otherwise be missing from G, and raises; ``"always"`` repeats this on every
            step (for models whose parameter use changes between steps; costs a few µs per op).

    Raises:
        ValueError: no trainable parameter selected, an unknown ``params`` entry, a bad option,
            or a module owning parameters beside parameterised submodules.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> rec = GramRecorder(model)
        >>> with rec:
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        >>> G = rec.gram()
        >>> G.shape
        torch.Size([5, 5])
        >>> flat = torch.cat([p.grad.flatten() for p in model.parameters()])
        >>> bool(torch.allclose(G.sum(), 25 * flat.dot(flat)))
        True
    """

    def __init__(self, model: nn.Module, *, loss_reduction: str = "mean", params=None,
                 strategy="auto", dtype: torch.dtype | None = None, memory_budget: int | None = None,
                 conv_method: str = "auto", check_uses: str = "first"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; received {type(model).__name__}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_REDUCTIONS}; received {loss_reduction!r}. "
                             "Pass the reduction your loss uses over the batch.")
        if isinstance(strategy, dict):
            bad = {k: v for k, v in strategy.items() if v not in STRATEGIES}
            if bad:
                raise ValueError(f"strategy values must be in {STRATEGIES}; received {bad}")
            self._strategy_map, default = dict(strategy), "auto"
        elif strategy in STRATEGIES:
            self._strategy_map, default = {}, strategy
        else:
            raise ValueError(f"strategy must be one of {STRATEGIES} or a dict of them; received {strategy!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a floating torch.dtype; received {dtype!r}")
        if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget <= 0):
            raise ValueError(f"memory_budget must be None or a positive number of bytes; received {memory_budget!r}")
        if check_uses not in ("first", "always"):
            raise ValueError(f"check_uses must be 'first' or 'always'; received {check_uses!r}")
        if conv_method not in CONV_METHODS:
            raise ValueError(f"conv_method must be one of {CONV_METHODS}; received {conv_method!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.dtype = dtype
        self.memory_budget = memory_budget
        self.conv_method = conv_method
        self.check_uses = check_uses
        self._uses_checked = False
        self.strategy = strategy
        self.enabled = True
        selected = select_parameters(model, params)
        self._param_names = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self._param_names.setdefault(id(p), n)
        self._units = build_units(model, set(selected), default, self._strategy_map)
        unknown = set(self._strategy_map) - {u.name for u in self._units}
        if unknown:
            raise ValueError(f"strategy names modules that hold no selected parameter: {sorted(unknown)}; "
                             f"covered modules are {[u.name for u in self._units]}")
        self._param_units: dict[int, list] = {}
        for u in self._units:
            for _, p in u.params:
                if id(p) in u.selected:
                    self._param_units.setdefault(id(p), []).append(u)
        self._step: _Step | None = None
        self._last: _Step | None = None
        self._handles: list = []
        self._mode: UseTracker | None = None
        self._active = False
        self._measured = False

    # ------------------------------------------------------------------ context
    def __call__(self, measure: bool = True) -> "GramRecorder":
        """Set whether the next ``with`` block measures (``False`` costs nothing); return self."""
        self.enabled = bool(measure)
        return self

    def __enter__(self) -> "GramRecorder":
        if self._active:
            raise RuntimeError("this GramRecorder is already active; `with recorder:` blocks cannot nest")
        self._measured = False
        if not self.enabled:
            return self
        self._step = _Step()
        self._active = True
        try:
            for u in self._units:
                u.calls = 0
                u.bw_calls = 0
                self._handles.extend(u.install(self))
            if self.check_uses == "always" or not self._uses_checked:
                self._mode = UseTracker(self)
                self._mode.__enter__()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._active:
            return False
        step = self._step
        self._cleanup()
        if exc_type is None:
            self._finish(step)
        return False

    def _cleanup(self) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(None, None, None)
        finally:
            self._mode = None
            handles, self._handles = self._handles, []
            for h in reversed(handles):
                h.remove()
            self._active = False

    def _finish(self, step: _Step) -> None:
        for entry in list(step.pending.values()):
            self._flush_pending(step, entry)
        step.pending.clear()
        step.stack.clear()
        for u in self._units:
            u.record.calls = u.calls
            if u.calls == 0:
                u.set_path("not run", "module not called in the last step")
        self._last = step
        self._measured = step.backward_started
        if self._measured:
            self._uses_checked = True

    # ------------------------------------------------------------------ results
    @property
    def measured(self) -> bool:
        """True if the last ``with`` block recorded a backward pass (so ``gram()`` is available)."""
        return self._measured

    @property
    def grad_dtype(self) -> torch.dtype | None:
        """dtype of the per-sample gradients of the last step (sets the core's default rtol)."""
        return None if self._last is None else self._last.grad_dtype

    @property
    def batch_size(self) -> int | None:
        """B of the last recorded step."""
        return None if self._last is None else self._last.batch

    def gram(self) -> torch.Tensor:
        """The (B, B) Gram matrix ``G = J Jᵀ`` of the last step, on the model's device.

        Raises:
            RuntimeError: no backward pass was recorded in the last ``with`` block (or it ran with
                ``enabled=False``), or ``gram()`` is called inside the block.
            FloatingPointError: a layer produced non-finite per-sample gradients (it is named).
        """
        if self._active:
            raise RuntimeError("gram() was called inside the `with recorder:` block; call it after the block ends")
        step = self._last
        if step is None or not self._measured:
            why = ("the last block ran with measuring disabled (enabled=False)" if not self.enabled
                   else "no loss.backward() ran inside the last `with recorder:` block")
            raise RuntimeError(f"no Gram matrix was recorded: {why}. Run forward and loss.backward() "
                               "inside `with recorder:` and call gram() after it")
        if step.acc is None:
            raise RuntimeError("the backward pass reached no selected parameter: the loss does not depend "
                               "on the parameters the recorder covers")
        # finite trace ⇔ every ‖J_i‖² finite ⇒ every |G_ij| ≤ sqrt(G_ii G_jj) finite (one scalar
        # read instead of a B×B isfinite pass)
        if not math.isfinite(float(torch.trace(step.acc))):
            finite = torch.isfinite(torch.stack([t for _, t in step.marks])).tolist()
            unit = step.marks[finite.index(False)][0]
            raise FloatingPointError(
                f"non-finite per-sample gradients in layer {unit.name or '<model>'!r} "
                f"({type(unit.module).__name__}) at this step; the Gram matrix is undefined. Check the "
                "loss and learning rate, or skip this step's measurement")
        return step.acc * self._scale(step)

    def _scale(self, step: _Step) -> float:
        return float(step.batch) ** 2 if self.loss_reduction == "mean" else 1.0

    def report(self) -> Report:
        """Per-layer path taken in the last step and why (a list of :class:`LayerRecord`)."""
        rep = Report()
        step = self._last
        shares = {}
        if step is not None and step.marks:
            vals = torch.stack([t for _, t in step.marks]).double().cpu().tolist()
            prev = 0.0
            for (u, _), v in zip(step.marks, vals):
                shares[id(u)] = shares.get(id(u), 0.0) + (v - prev) * self._scale(step)
                prev = v
        for u in self._units:
            u.record.trace = shares.get(id(u)) if u.calls else None
            rep.append(u.record)
        return rep

    # ------------------------------------------------------------------ used by the units
    def _forward(self, unit, batch: int, dtype: torch.dtype | None = None) -> None:
        """A unit's forward begins: check the step's state and the batch size."""
        step = self._step
        if not self._active or step is None:
            return
        if step.backward_started:
            raise RuntimeError(
                f"module {unit.name or '<model>'!r} ran a forward after a backward inside one "
                "`with recorder:` block; use one block per step (forward, loss, one backward)")
        if step.batch is None:
            step.batch = int(batch)
        elif int(batch) != step.batch:
            first = next((u.name for u in self._units if u.calls), "?")
            raise ValueError(
                f"the batch dimension (dim 0) must be the same in every covered layer; layer "
                f"{first!r} saw B = {step.batch} but {unit.name or '<model>'!r} saw {batch}. The "
                "recorder needs batch-first inputs (set batch_first=True where a module offers it)")
        if dtype is not None and step.grad_dtype is None:
            step.grad_dtype = dtype
        if torch.is_grad_enabled():          # a forward under no_grad has no backward to record
            unit.calls += 1
        step.stack.append(unit)

    def _forward_done(self, unit) -> None:
        step = self._step
        if step is not None and step.stack and step.stack[-1] is unit:
            step.stack.pop()

    def _backward(self, unit) -> _Step:
        """A unit's backward begins: check we are inside the block and that this is one backward."""
        step = self._step
        if not self._active or step is None:
            raise RuntimeError(
                f"a backward pass reached layer {unit.name or '<model>'!r} after its `with recorder:` "
                "block had ended; call loss.backward() inside the block")
        unit.bw_calls += 1
        if unit.bw_calls > unit.calls:
            raise RuntimeError(
                f"a second backward pass reached layer {unit.name or '<model>'!r} inside one "
                "`with recorder:` block; use one backward per block (per measured step)")
        step.backward_started = True
        return step

    def _multi_use(self, unit) -> bool:
        """True if a selected parameter of ``unit`` is used more than once in this step."""
        step = self._step
        if step.multi is None:            # the forward is complete once a backward runs
            step.multi = set()
            for u in self._units:
                for _, p in u.params:
                    if id(p) in u.selected and sum(v.calls for v in self._param_units[id(p)]) > 1:
                        step.multi.add(id(u))
        return id(unit) in step.multi

    def _acc(self, like: torch.Tensor) -> torch.Tensor:
        step = self._step
        if step.acc is None:
            dt = self.dtype or like.dtype
            step.acc = torch.zeros(step.batch, step.batch, dtype=dt, device=like.device)
            if step.grad_dtype is None:
                step.grad_dtype = like.dtype
        return step.acc

    def _add_rows(self, unit, blocks) -> None:
        """Add ``Σ_k J_k J_kᵀ`` for per-sample blocks J_k of shape (B, n_k) (one or more parameters).

        ``blocks`` is a list of ``(parameter, J)``; for a parameter used more than once in the step
        J is accumulated until every use has reported, and its Gram is formed then.
        """
        step = self._step
        multi = self._multi_use(unit)
        for p, J in blocks:
            if J is None:
                continue
            if multi and sum(u.calls for u in self._param_units[id(p)]) > 1:
                self._pend(step, p, J)
                continue
            acc = self._acc(J)
            J = J.reshape(J.shape[0], -1)
            if J.dtype != acc.dtype:
                J = J.to(acc.dtype)
            acc.addmm_(J, J.T)
        self._mark(unit)

    def _add_gram(self, unit, K: torch.Tensor) -> None:
        """Add a ready (B, B) contribution."""
        acc = self._acc(K)
        acc.add_(K.to(acc.dtype) if K.dtype != acc.dtype else K)
        self._mark(unit)

    def _mark(self, unit) -> None:
        step = self._step
        if step.acc is not None:
            step.marks.append((unit, torch.trace(step.acc)))

    def _pend(self, step: _Step, p, J: torch.Tensor) -> None:
        J = J.reshape(J.shape[0], -1)
        entry = step.pending.get(id(p))
        expected = sum(u.calls for u in self._param_units[id(p)])
        if entry is None:
            entry = step.pending[id(p)] = [J.clone(), 0, expected, p]
        else:
            entry[0].add_(J)
        entry[1] += 1
        if entry[1] >= entry[2]:
            self._flush_pending(step, entry)
            del step.pending[id(p)]

    def _flush_pending(self, step: _Step, entry) -> None:
        J, _, _, p = entry
        acc = self._acc(J)
        J = J if J.dtype == acc.dtype else J.to(acc.dtype)
        acc.addmm_(J, J.T)
        owner = self._param_units[id(p)][0]
        self._mark(owner)
