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

Two layers, in the style of optax:

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

import warnings
from typing import Any

import array_api_compat

from ._namespace import host_scalar, is_concrete, jit_for, resolve_namespace, validated_symmetric
from .measures import STEP_STATIC, check_options, step_values
from .record import Measurement
from .spectral import resolve_rtol

__all__ = ["MeasureTracker"]

ON_NONFINITE = ("raise", "skip")
#: state_dict formats this release reads (/1: before resolution limits were counted)
FORMATS = ("fimcore.MeasureTracker/1", "fimcore.MeasureTracker/2")
FORMAT = FORMATS[-1]


class MeasureTracker:
    r"""Stateful tracker of :math:`c_k`, :math:`I_k`, :math:`\bar C_K` and :math:`L_K`.

    Args:
        rtol: None (default: the resolved rank of :mod:`fimcore.rank`, decided per step
            on the diagonally scaled Gram from its accumulation and gradient dtypes) or an
            explicit tolerance relative to :math:`\lambda_{\max}` in [0, 1) (``rtol=0``:
            exact zero after clamping, the released code's convention).
        on_nonfinite: ``"raise"`` (default) raises ``ValueError`` naming the step on a
            Gram with NaN/inf; ``"skip"`` counts it in ``skipped`` and records it with
            ``finite=False``.
        keep_history: keep every :class:`Measurement` in ``history`` (and in
            ``state_dict()``).

    Raises:
        ValueError: on an unknown ``on_nonfinite`` or an ``rtol`` outside [0, 1).

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
        self, *, rtol: float | None = None, on_nonfinite: str = "raise", keep_history: bool = True
    ) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {ON_NONFINITE}; received {on_nonfinite!r}. "
                "Use 'raise' to stop on NaN/inf Grams or 'skip' to count and skip them."
            )
        if rtol is not None:
            rtol = resolve_rtol(rtol, 1, None, None)
        self.rtol = rtol
        self.on_nonfinite = on_nonfinite
        self.keep_history = bool(keep_history)
        self._reset()

    def _reset(self) -> None:
        self._steps = self._measured = self._skipped = self._nonfinite = self._limited = 0
        self._c_sum = self._c_jacobian_sum = self._c_legacy_sum = self._L = 0.0
        self._legacy_measured = 0
        self._history: list[Measurement] = []

    def update(
        self,
        gram: Any,
        *,
        lr: float,
        weight: float = 1,
        batch_size: int | None = None,
        grad_dtype: Any = None,
    ) -> Measurement:
        r"""Record one measured iteration and return its :class:`Measurement`.

        Args:
            gram: (B, B) Gram matrix :math:`G_k` of any array library.
            lr: learning rate :math:`\alpha_k` in force at this iteration (>= 0).
            weight: :math:`w_k`, training iterations this measurement stands for (> 0).
            batch_size: :math:`B_k`, the actual batch size; defaults to the Gram's size.
            grad_dtype: dtype of the per-sample gradients the Gram was built from (with the
                Gram's own dtype, it sets the rank threshold); defaults to the Gram's dtype.

        Raises:
            ValueError: on a bad Gram (not 2-D, not square, asymmetric, negative diagonal),
                ``lr`` < 0, ``weight`` <= 0, ``batch_size`` < 1, or — with
                ``on_nonfinite="raise"`` — a Gram with NaN/inf (the message names step k).
            TypeError: on a non-floating dtype or a non-array Gram.
        """
        xp = resolve_namespace(gram)
        opts = check_options(gram, xp, lr=lr, weight=weight, batch_size=batch_size,
                             rtol=self.rtol, grad_dtype=grad_dtype)
        batch = opts["batch"]
        k = self._steps + 1
        if not is_concrete(gram):
            raise TypeError(
                "MeasureTracker.update needs a concrete Gram; received a value traced by a "
                "JAX transformation. Use measure_init/measure_update inside jax.jit."
            )
        sym, finite = validated_symmetric(gram, xp, where=f"at step k={k}", allow_nonfinite=True)
        if not finite and self.on_nonfinite == "raise":
            raise ValueError(
                f"the Gram at step k={k} must be finite; received NaN or inf entries. Check "
                "the loss and gradients for overflow (lower the learning rate, use float64), "
                "or construct MeasureTracker(on_nonfinite='skip') to count and skip such steps."
            )
        compute = jit_for(step_values, xp, static=STEP_STATIC)
        step = {name: _to_host(value) for name, value in
                compute(sym, lr, symmetric=True, **opts).items()}
        lr_f, weight_f = host_scalar(lr), host_scalar(weight)
        self._steps = k
        if step["defined"]:
            self._measured += 1
            self._c_sum += step["c_k"]
            self._c_jacobian_sum += step["c_k_jacobian"]
            self._limited += int(bool(step["resolution_limited"]))
            if _finite_or_none(step["c_k_legacy"]) is not None:
                self._c_legacy_sum += step["c_k_legacy"]
                self._legacy_measured += 1
        else:
            self._skipped += 1
        if finite:
            self._L += weight_f * step["I_k"]
        else:
            self._nonfinite += 1
        record = Measurement(
            k=k,
            c_k=step["c_k"] if step["defined"] else None,
            c_k_jacobian=step["c_k_jacobian"] if step["defined"] else None,
            I_k=step["I_k"] if finite else None,
            trace=step["trace"] if finite else None,
            lambda_max=step["lambda_max"] if finite else None,
            rank=int(step["rank"]) if finite else None,
            zero_rows=int(step["zero_rows"]) if finite else None,
            c_limit=step["c_limit"] if step["defined"] else None,
            resolution_limited=bool(step["resolution_limited"]),
            c_k_legacy=_finite_or_none(step["c_k_legacy"]) if step["defined"] else None,
            defined=bool(step["defined"]),
            finite=finite,
            C_bar=self.C_bar,
            C_bar_jacobian=self.C_bar_jacobian,
            L=self._L,
            lr=lr_f,
            weight=weight_f,
            batch_size=batch,
        )
        if self.keep_history:
            self._history.append(record)
        return record

    @property
    def C_bar(self) -> float | None:
        r""":math:`\bar C_K`, mean of the defined :math:`c_k` (None before the first one)."""
        return self._c_sum / self._measured if self._measured else None

    @property
    def C_bar_jacobian(self) -> float | None:
        r"""Mean of :math:`\sqrt{c_k}` over the defined steps (None before the first one)."""
        return self._c_jacobian_sum / self._measured if self._measured else None

    @property
    def C_bar_legacy(self) -> float | None:
        r"""Mean of :math:`c_k` under the legacy tolerance :math:`B\varepsilon_{\mathrm{grad}}\lambda_{\max}`.

        Kept for one release, to compare with :attr:`C_bar` (None before the first step).
        """
        return self._c_legacy_sum / self._legacy_measured if self._legacy_measured else None

    @property
    def L(self) -> float:
        r""":math:`L_K = \sum_k w_k I_k` over the finite steps so far."""
        return self._L

    @property
    def steps(self) -> int:
        """Number of updates recorded (including skipped ones)."""
        return self._steps

    @property
    def measured(self) -> int:
        r"""Number of steps with a defined :math:`c_k` (the :math:`|\mathcal M|` of C̄_K)."""
        return self._measured

    @property
    def skipped(self) -> int:
        """Steps excluded from C̄_K: all-zero (undefined) and skipped non-finite Grams."""
        return self._skipped

    @property
    def nonfinite(self) -> int:
        """Skipped steps whose Gram held NaN or inf."""
        return self._nonfinite

    @property
    def resolution_limited(self) -> int:
        r"""Defined steps whose :math:`c_k` is within a factor 2 of what their Gram could resolve.

        Such a :math:`c_k` says more about the arithmetic than about training: accumulate the
        Gram in float64 (or train in float64) to resolve it.
        """
        return self._limited

    @property
    def resolution_limited_fraction(self) -> float | None:
        """``resolution_limited / measured`` (None before the first defined step)."""
        return self._limited / self._measured if self._measured else None

    @property
    def history(self) -> tuple[Measurement, ...]:
        """All records so far (empty with ``keep_history=False``)."""
        return tuple(self._history)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable snapshot (plain ints, floats, lists, dicts, None)."""
        return {
            "format": FORMAT,
            "rtol": self.rtol,
            "on_nonfinite": self.on_nonfinite,
            "keep_history": self.keep_history,
            "steps": self._steps,
            "measured": self._measured,
            "skipped": self._skipped,
            "nonfinite": self._nonfinite,
            "limited": self._limited,
            "c_sum": self._c_sum,
            "c_jacobian_sum": self._c_jacobian_sum,
            "c_legacy_sum": self._c_legacy_sum,
            "legacy_measured": self._legacy_measured,
            "L": self._L,
            "history": [m.to_dict() for m in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot (configuration included).

        Raises:
            ValueError: if ``state`` is not a MeasureTracker state dict.
        """
        if not isinstance(state, dict) or state.get("format") not in FORMATS:
            raise ValueError(
                "state must be a dict returned by MeasureTracker.state_dict() (format "
                f"{FORMAT!r}, or {FORMATS[0]!r} of the previous release); received "
                f"{type(state).__name__} with format "
                f"{state.get('format') if isinstance(state, dict) else None!r}."
            )
        self.__init__(rtol=state["rtol"], on_nonfinite=state["on_nonfinite"],
                      keep_history=state.get("keep_history", True))
        self._steps = int(state["steps"])
        self._measured = int(state["measured"])
        self._skipped = int(state["skipped"])
        self._nonfinite = int(state["nonfinite"])
        self._limited = int(state.get("limited", 0))  # absent in format /1
        self._c_sum = float(state["c_sum"])
        self._c_jacobian_sum = float(state["c_jacobian_sum"])
        if state["format"] == FORMATS[0]:
            # a /1 state summed c_k under the legacy tolerance (then the default): those sums are
            # the legacy ones, and C̄_K mixes both rules from here on
            warnings.warn(
                "loading a MeasureTracker state of the previous release: its c_k were truncated "
                "at the legacy tolerance B·eps·λ_max, later steps use the resolved rank, so "
                "C_bar mixes both rules (C_bar_legacy stays consistent). Start a new run for "
                "C̄_K under one rule.", UserWarning, stacklevel=2)
            self._c_legacy_sum, self._legacy_measured = self._c_sum, self._measured
        else:
            self._c_legacy_sum = float(state["c_legacy_sum"])
            self._legacy_measured = int(state["legacy_measured"])
        self._L = float(state["L"])
        self._history = [Measurement.from_dict(d) for d in state.get("history", [])]

    def __repr__(self) -> str:
        return (f"MeasureTracker(steps={self._steps}, C_bar={self.C_bar}, "
                f"C_bar_jacobian={self.C_bar_jacobian}, L={self._L}, skipped={self._skipped}, "
                f"resolution_limited={self._limited})")


def _finite_or_none(value: float) -> float | None:
    return value if value == value and value != float("inf") else None


def _to_host(value: Any) -> Any:
    """A 0-D array as a Python bool/int/float (records only)."""
    if array_api_compat.is_array_api_obj(value):
        dtype = str(value.dtype)
        number = host_scalar(value)
        if "bool" in dtype:
            return bool(number)
        if "int" in dtype:
            return int(number)
        return number
    return value

