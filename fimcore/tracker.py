r"""Running measures of training: :math:`\bar C_K` and :math:`L_K`.

Source: Liao et al., IEEE TPAMI 2020, arXiv 1810.06767. Over the measured iterations
:math:`\mathcal M` up to iteration K (K counts training iterations),

.. math::

    \bar C_K = \frac{1}{|\mathcal M|}\sum_{k\in\mathcal M} c_k, \qquad
    L_K = \sum_{k\in\mathcal M} w_k\, I_k, \qquad
    I_k = \frac{\alpha_k}{B_k}\sqrt{\operatorname{Tr} G_k},

with :math:`c_k = \lambda_{\max}(G_k)/\lambda_{\min}^{+}(G_k)` and :math:`w_k` the number of
training iterations measurement k stands for (itself and the unmeasured ones that follow
it), so measuring every n-th step still estimates the full sum. ``C_bar_jacobian`` is the
mean of :math:`\sqrt{c_k}` (the released code's convention); a mean of square roots is not
the square root of a mean, so both are kept.

The statistics kept are a tuple (:mod:`fimcore.stats`; by default
``(Condition(), Energy())``), each a pure ``init``/``update`` pair over its own state. Two
layers, in the style of optax:

* a pure pair :func:`measure_init` / :func:`measure_update` (:mod:`fimcore.measures`)
  over the NamedTuple :class:`MeasureState`. It never raises on values and never branches on them in Python,
  so it works under ``jax.jit``; a non-finite Gram or an undefined :math:`c_k`
  (all-zero Gram) is flagged in the state (``finite``, ``defined``) and counted;
* the stateful :class:`MeasureTracker` on top, which raises (naming the step) or skips
  as configured, keeps a JSON-friendly history of :class:`Measurement` records and
  checkpoints through ``state_dict()`` / ``load_state_dict()``.

An all-zero Gram has no :math:`\lambda_{\min}^{+}`: its :math:`c_k` is undefined
(``None`` in records, NaN with ``defined=False`` in the pure state), it is counted in
``skipped`` and excluded from :math:`\bar C_K`, and its :math:`I_k = 0` still enters
:math:`L_K`. A non-finite Gram, when skipped, is counted in ``skipped`` and adds nothing.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ._namespace import (
    checked_symmetric,
    host_scalar,
    is_concrete,
    jit_for,
    resolve_namespace,
    validated_symmetric,
)
from .measures import STEP_STATIC, check_options, resolve_statistics, update_statistics
from .record import Measurement
from .results import GramResult
from .stats.base import statistic_from_config, to_host

__all__ = ["MeasureTracker", "PendingMeasurement"]

ON_NONFINITE = ("raise", "skip")
#: state_dict formats this release reads (/1: 0.1.0; /2: before statistics were composable)
FORMATS = ("fimcore.MeasureTracker/1", "fimcore.MeasureTracker/2", "fimcore.MeasureTracker/3")
FORMAT = FORMATS[-1]


class MeasureTracker:
    r"""Stateful tracker of :math:`c_k`, :math:`I_k`, :math:`\bar C_K`, :math:`L_K` (and more statistics).

    Args:
        rtol: None (default: the resolved rank of :mod:`fimcore.rank`, decided per step
            on the diagonally scaled Gram from its accumulation and gradient dtypes) or an
            explicit tolerance relative to :math:`\lambda_{\max}` in [0, 1) (``rtol=0``:
            exact zero after clamping, the released code's convention). Shorthand for
            ``statistics=(Condition(rtol=rtol), Energy())``.
        statistics: the statistics to keep (:mod:`fimcore.stats`), default
            ``(Condition(), Energy())``; further ones add their fields to every record.
        on_nonfinite: ``"raise"`` (default) raises ``ValueError`` naming the step on a
            Gram with NaN/inf; ``"skip"`` counts it in ``skipped`` and records it with
            ``finite=False``.
        keep_history: keep every :class:`Measurement` in ``history`` (and in
            ``state_dict()``).
        asynchronous: compute each step's statistics (the eigen-solves) on one worker
            thread while the caller's next training step runs. :meth:`update` then validates
            its arguments and the Gram, hands the symmetric float64 Gram to the worker and
            returns a :class:`PendingMeasurement`; the measurement is resolved when it is read
            (any attribute of the returned record, or any property, ``history``,
            ``state_dict()``, :meth:`wait`) and at the next :meth:`update`, which waits for the
            previous step first (at most one step in flight). The numbers are those of the
            synchronous tracker: the same operations on the same inputs, in the same order. An
            error raised while computing a step (e.g. ``on_nonfinite="raise"`` under
            ``jax_debug_nans``) is raised where the step is resolved.

    Raises:
        ValueError: on an unknown ``on_nonfinite``, an ``rtol`` outside [0, 1), or both
            ``rtol`` and ``statistics``.

    Example:
        >>> import numpy as np
        >>> from fimcore import MeasureTracker
        >>> tracker = MeasureTracker()
        >>> m = tracker.update(np.diag([4.0, 1.0]), lr=0.1, weight=2)
        >>> m.k, m.c_k, m.c_k_jacobian, round(m.I_k, 12)
        (1, 4.0, 2.0, 0.111803398875)
        >>> m = tracker.update(np.zeros((2, 2)), lr=0.1)
        >>> m.c_k is None, tracker.skipped, tracker.C_bar, round(tracker.L, 12)
        (True, 1, 4.0, 0.22360679775)
    """

    def __init__(
        self, *, rtol: float | None = None, statistics: Any = None, on_nonfinite: str = "raise",
        keep_history: bool = True, asynchronous: bool = False,
    ) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {ON_NONFINITE}; received {on_nonfinite!r}. "
                "Use 'raise' to stop on NaN/inf Grams or 'skip' to count and skip them."
            )
        self.statistics = resolve_statistics(statistics, rtol)
        self.on_nonfinite = on_nonfinite
        self.keep_history = bool(keep_history)
        self.asynchronous = bool(asynchronous)
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = getattr(self, "_executor", None)
        self._reset()

    @property
    def rtol(self) -> float | None:
        """The explicit tolerance of the condition statistic (None: the resolved rank)."""
        cond = self._by_name.get("condition")
        return None if cond is None else cond.rtol

    def wait(self) -> None:
        """Resolve the step in flight (``asynchronous=True``); re-raise an error it raised.

        A no-op for a synchronous tracker or when nothing is pending.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _reset(self) -> None:
        self.wait()
        self._by_name = {s.name: s for s in self.statistics}
        self._steps = self._nonfinite = 0
        self._states = tuple(s.init() for s in self.statistics)
        self._last: dict[str, dict[str, Any]] = {s.name: s.record(st)
                                                 for s, st in zip(self.statistics, self._states)}
        self._history: list[Measurement] = []

    def update(
        self,
        gram: Any,
        *,
        lr: float,
        weight: float = 1,
        batch_size: int | None = None,
        grad_dtype: Any = None,
        num_params: int | None = None,
        blocks: dict | None = None,
    ) -> Measurement:
        r"""Record one measured iteration and return its :class:`Measurement`.

        Args:
            gram: (B, B) Gram matrix :math:`G_k` of any array library, or a
                :class:`fimcore.GramResult` (its ``grad_dtype``, ``batch_size``,
                ``num_params`` and ``blocks`` are used unless given here).
            lr: learning rate :math:`\alpha_k` in force at this iteration (>= 0).
            weight: :math:`w_k`, training iterations this measurement stands for (> 0).
            batch_size: :math:`B_k`, the actual batch size; defaults to the Gram's size.
            grad_dtype: dtype of the per-sample gradients the Gram was built from (with the
                Gram's own dtype, it sets the rank threshold); defaults to the Gram's dtype.
            num_params: P, parameters the Gram covers (for statistics that need it).
            blocks: per-layer Grams summing to G (for per-layer statistics).

        Raises:
            ValueError: on a bad Gram (not 2-D, not square, asymmetric, negative diagonal),
                ``lr`` < 0, ``weight`` <= 0, ``batch_size`` < 1, or — with
                ``on_nonfinite="raise"`` — a Gram with NaN/inf (the message names step k).
            TypeError: on a non-floating dtype or a non-array Gram.
        """
        self.wait()
        checked = False
        if isinstance(gram, GramResult):
            grad_dtype = gram.grad_dtype if grad_dtype is None else grad_dtype
            batch_size = gram.batch_size if batch_size is None else batch_size
            num_params = gram.num_params if num_params is None else num_params
            blocks = gram.blocks if blocks is None else blocks
            checked = gram.checked
            gram = gram.gram
        xp = resolve_namespace(gram)
        opts = check_options(gram, xp, lr=lr, weight=weight, batch_size=batch_size,
                             grad_dtype=grad_dtype, num_params=num_params)
        k = self._steps + 1
        if not is_concrete(gram):
            raise TypeError(
                "MeasureTracker.update needs a concrete Gram; received a value traced by a "
                "JAX transformation. Use measure_init/measure_update inside jax.jit."
            )
        if checked:   # built by an adapter: symmetric, non-negative diagonal; Tr G tells finiteness
            sym, finite = checked_symmetric(gram, xp)
        else:
            sym, finite = validated_symmetric(gram, xp, where=f"at step k={k}",
                                              allow_nonfinite=True)
        if not finite and self.on_nonfinite == "raise":
            raise ValueError(
                f"the Gram at step k={k} must be finite; received NaN or inf entries. Check "
                "the loss and gradients for overflow (lower the learning rate, use float64), "
                "or construct MeasureTracker(on_nonfinite='skip') to count and skip such steps."
            )
        args = (k, xp, sym, finite, lr, weight, blocks, opts)
        if not self.asynchronous:
            return self._compute(*args)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="fimcore-MeasureTracker")
        self._pending = self._executor.submit(self._compute, *args)
        return PendingMeasurement(self._pending)

    def _compute(self, k, xp, sym, finite, lr, weight, blocks, opts) -> Measurement:
        """The statistics of step k from its symmetric Gram (the caller's thread or the worker)."""
        compute = jit_for(update_statistics, xp, static=STEP_STATIC)
        states, _ = compute(self._states, sym, lr, weight, blocks, statistics=self.statistics,
                            symmetric=True, **opts)
        self._states = tuple(to_host(s) for s in states)
        self._steps = k
        self._nonfinite += 0 if finite else 1
        self._last = {s.name: s.record(st) for s, st in zip(self.statistics, self._states)}
        record = Measurement(k=k, lr=host_scalar(lr), weight=host_scalar(weight),
                             batch_size=opts["batch"], finite=finite,
                             values={name: dict(v) for name, v in self._last.items()})
        if self.keep_history:
            self._history.append(record)
        return record

    def _field(self, statistic: str, field: str) -> Any:
        self.wait()
        return self._last.get(statistic, {}).get(field)

    def _state(self, statistic: str) -> Any:
        self.wait()
        for s, st in zip(self.statistics, self._states):
            if s.name == statistic:
                return st
        return None

    @property
    def C_bar(self) -> float | None:
        r""":math:`\bar C_K`, mean of the defined :math:`c_k` (None before the first one)."""
        return self._field("condition", "C_bar")

    @property
    def C_bar_jacobian(self) -> float | None:
        r"""Mean of :math:`\sqrt{c_k}` over the defined steps (None before the first one)."""
        return self._field("condition", "C_bar_jacobian")

    @property
    def C_bar_legacy(self) -> float | None:
        r"""Mean of :math:`c_k` under the legacy tolerance :math:`B\varepsilon_{\mathrm{grad}}\lambda_{\max}`.

        Kept for one release, to compare with :attr:`C_bar` (None before the first step).
        """
        return self._field("condition", "C_bar_legacy")

    @property
    def L(self) -> float:
        r""":math:`L_K = \sum_k w_k I_k` over the finite steps so far."""
        return self._field("energy", "L")

    @property
    def steps(self) -> int:
        """Number of updates recorded (including skipped ones)."""
        self.wait()
        return self._steps

    @property
    def measured(self) -> int:
        r"""Number of steps with a defined :math:`c_k` (the :math:`|\mathcal M|` of C̄_K)."""
        state = self._state("condition")
        return 0 if state is None else int(state.measured)

    @property
    def skipped(self) -> int:
        """Steps excluded from C̄_K: all-zero (undefined) and skipped non-finite Grams."""
        state = self._state("condition")
        return 0 if state is None else int(state.skipped)

    @property
    def nonfinite(self) -> int:
        """Skipped steps whose Gram held NaN or inf."""
        self.wait()
        return self._nonfinite

    @property
    def resolution_limited(self) -> int:
        r"""Defined steps whose :math:`c_k` is within a factor 2 of what their Gram could resolve.

        Such a :math:`c_k` says more about the arithmetic than about training: accumulate the
        Gram in float64 (or train in float64) to resolve it.
        """
        state = self._state("condition")
        return 0 if state is None else int(state.limited)

    @property
    def resolution_limited_fraction(self) -> float | None:
        """``resolution_limited / measured`` (None before the first defined step)."""
        return self.resolution_limited / self.measured if self.measured else None

    @property
    def history(self) -> tuple[Measurement, ...]:
        """All records so far (empty with ``keep_history=False``)."""
        self.wait()
        return tuple(self._history)

    @property
    def last(self) -> dict[str, dict[str, Any]]:
        """The last record's fields keyed by statistic (the running values before any step)."""
        self.wait()
        return {name: dict(v) for name, v in self._last.items()}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable snapshot (plain ints, floats, lists, dicts, None)."""
        self.wait()
        return {
            "format": FORMAT,
            "on_nonfinite": self.on_nonfinite,
            "keep_history": self.keep_history,
            "steps": self._steps,
            "nonfinite": self._nonfinite,
            "statistics": [{"name": s.name, "config": s.config(), "state": _json_state(st)}
                           for s, st in zip(self.statistics, self._states)],
            "history": [m.to_dict() for m in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot (configuration included).

        Snapshots of earlier releases (formats ``/1`` and ``/2``) load too.

        Raises:
            ValueError: if ``state`` is not a MeasureTracker state dict, or names a statistic
                that is not registered.
        """
        self.wait()
        if not isinstance(state, dict) or state.get("format") not in FORMATS:
            raise ValueError(
                "state must be a dict returned by MeasureTracker.state_dict() (format "
                f"{FORMAT!r}, or {FORMATS[:-1]} of earlier releases); received "
                f"{type(state).__name__} with format "
                f"{state.get('format') if isinstance(state, dict) else None!r}."
            )
        if state["format"] == FORMAT:
            stats = [statistic_from_config(d["name"], d["config"]) for d in state["statistics"]]
            self.__init__(statistics=stats, on_nonfinite=state["on_nonfinite"],
                          keep_history=state["keep_history"], asynchronous=self.asynchronous)
            self._states = tuple(_state_of_json(s.init(), d["state"])
                                 for s, d in zip(self.statistics, state["statistics"]))
        else:
            self.__init__(rtol=state["rtol"], on_nonfinite=state["on_nonfinite"],
                          keep_history=state.get("keep_history", True),
                          asynchronous=self.asynchronous)
            self._states = _states_of_flat(self.statistics, state)
        self._steps = int(state["steps"])
        self._nonfinite = int(state["nonfinite"])
        self._last = {s.name: s.record(st) for s, st in zip(self.statistics, self._states)}
        self._history = [Measurement.from_dict(d) for d in state.get("history", [])]

    def __repr__(self) -> str:
        self.wait()
        return (f"MeasureTracker(steps={self._steps}, C_bar={self.C_bar}, "
                f"C_bar_jacobian={self.C_bar_jacobian}, L={self.L}, skipped={self.skipped}, "
                f"resolution_limited={self.resolution_limited})")


class PendingMeasurement:
    """The :class:`Measurement` of a step an asynchronous :class:`MeasureTracker` is computing.

    Reading any field (``m.c_k``, ``m.k``, ``m.to_dict()``...) waits for the step and reads it
    from the resolved record; :meth:`result` returns that record.
    """

    __slots__ = ("_future",)

    def __init__(self, future: Future) -> None:
        self._future = future

    def result(self) -> Measurement:
        """The resolved :class:`Measurement` (waits for the worker; re-raises its error)."""
        return self._future.result()

    def done(self) -> bool:
        """Whether the step has been computed (or failed)."""
        return self._future.done()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.result(), name)

    def __repr__(self) -> str:
        return f"PendingMeasurement({self.result()!r})" if self.done() else "PendingMeasurement(<pending>)"


def _json_state(state: Any) -> Any:
    """A host state (NamedTuple or dict) for strict JSON: NaN and inf become None."""
    if isinstance(state, tuple) and hasattr(state, "_asdict"):
        state = state._asdict()
    if isinstance(state, dict):
        return {k: _json_state(v) for k, v in state.items()}
    return None if isinstance(state, float) and not math.isfinite(state) else state


def _state_of_json(fresh: Any, data: Any) -> Any:
    """Inverse of :func:`_json_state` for a statistic whose initial state is ``fresh``.

    A NamedTuple's float fields stored as None are NaN again; a dict state (keyed by layer, say)
    comes back with its None leaves as NaN.
    """
    if isinstance(fresh, tuple) and hasattr(fresh, "_asdict"):
        values = {}
        for name, default in fresh._asdict().items():
            v = data[name]
            values[name] = float("nan") if v is None and isinstance(default, float) else v
        return type(fresh)(**values)
    if isinstance(data, dict):
        return {k: _state_of_json(None, v) for k, v in data.items()}
    return float("nan") if data is None else data


def _states_of_flat(statistics: tuple, state: dict[str, Any]) -> tuple:
    """The (Condition, Energy) states of a flat /1 or /2 snapshot.

    A /1 snapshot summed c_k under the legacy tolerance (then the default): those sums are also
    the legacy ones, and C̄_K mixes both rules from here on (a warning says so).
    """
    legacy_sum, legacy_measured = state.get("c_legacy_sum"), state.get("legacy_measured")
    if state["format"] == FORMATS[0]:
        warnings.warn(
            "loading a MeasureTracker state of the previous release: its c_k were truncated "
            "at the legacy tolerance B·eps·λ_max, later steps use the resolved rank, so "
            "C_bar mixes both rules (C_bar_legacy stays consistent). Start a new run for "
            "C̄_K under one rule.", UserWarning, stacklevel=3)
        legacy_sum, legacy_measured = state["c_sum"], state["measured"]
    out = []
    for stat in statistics:
        fresh = stat.init()
        if stat.name == "condition":
            fresh = fresh._replace(measured=int(state["measured"]), skipped=int(state["skipped"]),
                                   limited=int(state.get("limited", 0)),
                                   c_sum=float(state["c_sum"]),
                                   c_jacobian_sum=float(state["c_jacobian_sum"]),
                                   c_legacy_sum=float(legacy_sum),
                                   legacy_measured=int(legacy_measured))
        elif stat.name == "energy":
            fresh = fresh._replace(L=float(state["L"]))
        out.append(fresh)
    return tuple(out)
