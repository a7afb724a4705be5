"""Time: paired, interleaved timing of a method against the plain step, and the ratio statistics.

Part of the benchmark harness; the protocol is described in :mod:`benchmarks._harness`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

MIN_REP_SECONDS = 0.2
"""Shortest timed run: steps shorter than this are timed as runs of consecutive calls."""


@dataclass
class PairedTimes:
    """Interleaved wall times of a baseline step and a candidate step, in seconds.

    Attributes:
        baseline: Times of the baseline (plain) step, one per repetition, warm-up excluded.
        candidate: Times of the candidate step, paired with ``baseline`` by index.
        capped: True when the time cap stopped the measurement before ``reps`` repetitions.
        elapsed: Wall time spent, warm-up included.
        warmup: ``(baseline, candidate)`` times of the warm-up steps.
        number: Consecutive calls per timed run (the times above are per call).
    """

    baseline: list[float] = field(default_factory=list)
    candidate: list[float] = field(default_factory=list)
    capped: bool = False
    elapsed: float = 0.0
    warmup: tuple[float, float] = (float("nan"), float("nan"))
    number: int = 1

    @property
    def reps(self) -> int:
        """Number of completed repetitions."""
        return len(self.candidate)

    @property
    def ratio(self) -> float:
        """Median of the paired ratios ``candidate[i] / baseline[i]`` (nan without repetitions)."""
        return median_ratio(self.baseline, self.candidate)


def check_timing_args(reps: int, cap_seconds: float, min_rep_seconds: float) -> None:
    """Refuse timing settings no measurement can honour (shared by the paired timers)."""
    if reps < 1:
        raise ValueError(f"reps must be at least 1; received {reps}. Ask for ≥ 5 for a median.")
    if not cap_seconds > 0:
        raise ValueError(f"cap_seconds must be positive; received {cap_seconds}.")
    if not min_rep_seconds >= 0:
        raise ValueError(f"min_rep_seconds must be >= 0; received {min_rep_seconds}.")


def median_ratio(baseline: Sequence[float], candidate: Sequence[float]) -> float:
    """Median of the paired ratios ``candidate[i] / baseline[i]``.

    Pairing adjacent measurements cancels slow drifts of a shared machine's speed.

    Args:
        baseline: Baseline times.
        candidate: Candidate times, same length.

    Returns:
        The median ratio, or ``nan`` for empty inputs.

    Raises:
        ValueError: If the two sequences differ in length.

    Example:
        >>> median_ratio([1.0, 2.0, 4.0], [2.0, 3.0, 12.0])
        2.0
    """
    if len(baseline) != len(candidate):
        raise ValueError(
            f"baseline and candidate times must pair up one to one; received {len(baseline)} "
            f"and {len(candidate)} values. Pass the times of the same repetitions."
        )
    if not baseline:
        return float("nan")
    return statistics.median(c / b for b, c in zip(baseline, candidate))


def ratio_quartiles(baseline: Sequence[float], candidate: Sequence[float]) -> tuple[float, float]:
    """Lower and upper quartiles of the paired ratios: the run-to-run spread a table reports.

    Example:
        >>> ratio_quartiles([1.0, 1.0, 1.0, 1.0, 1.0], [1.1, 1.2, 1.3, 1.4, 1.5])
        (1.2, 1.4)
    """
    ratios = sorted(c / b for b, c in zip(baseline, candidate))
    if len(ratios) < 2:
        return (ratios[0], ratios[0]) if ratios else (math.nan, math.nan)
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return round(q1, 12), round(q3, 12)


def target_mark(q1: float, q3: float, target: float) -> str:
    """``✓``/``✗`` against a ratio target only when the whole spread is on one side of it.

    ``✓`` when the upper quartile of the paired ratios is ≤ ``target``, ``✗`` when the lower
    quartile is above it, ``≈`` (within the run-to-run spread: neither met nor missed) otherwise.

    Example:
        >>> target_mark(1.02, 1.10, 1.5), target_mark(1.6, 1.7, 1.5), target_mark(1.45, 1.55, 1.5)
        ('✓', '✗', '≈')
    """
    if math.isnan(q1) or math.isnan(q3):
        return "–"
    return "✓" if q3 <= target else ("✗" if q1 > target else "≈")


SPREAD_NOTE = ("In square brackets: the interquartile range of the paired ratios. A time target is "
               "marked ✓ or ✗ only when that whole range is on one side of it, ≈ otherwise (within the "
               "run-to-run spread).")
"""The sentence every timing table prints about its spread and its marks."""


def fmt_spread(q1: float, q3: float) -> str:
    """``[1.02–1.10]``: the interquartile range of the paired ratios, printed beside a ratio."""
    return "" if math.isnan(q1) else f" [{q1:.2f}–{q3:.2f}]"


def _timed_run(fn: Callable[[], Any], number: int, clock: Callable[[], float]) -> float:
    """Mean time per call of ``number`` consecutive calls."""
    t0 = clock()
    for _ in range(number):
        fn()
    return (clock() - t0) / number


def warm_then_time(
    baseline: Callable[[], Any],
    candidate: Callable[[], Any],
    *,
    reps: int,
    cap_seconds: float,
    min_rep_seconds: float = 0.0,
) -> dict:
    """Calls each step once untimed (compilation or tracing), then :func:`interleaved_times`.

    Returns a JSON-friendly dict: ``ratio``, its quartiles ``q1`` and ``q3``
    (:func:`ratio_quartiles`), the upper-median ``plain`` and ``step`` times (per call), ``reps``,
    ``number`` (calls per timed run), ``capped`` and ``warmup_s`` (seconds spent in the untimed
    first calls).
    """
    t0 = time.perf_counter()
    baseline()
    candidate()
    warmup_s = time.perf_counter() - t0
    t = interleaved_times(baseline, candidate, reps=reps, cap_seconds=cap_seconds,
                          min_rep_seconds=min_rep_seconds)
    q1, q3 = ratio_quartiles(t.baseline, t.candidate)
    return {"ratio": t.ratio, "q1": q1, "q3": q3,
            "plain": _upper_median(t.baseline), "step": _upper_median(t.candidate),
            "reps": t.reps, "number": t.number, "capped": t.capped, "warmup_s": warmup_s}


def _upper_median(xs: Sequence[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def interleaved_times(
    baseline: Callable[[], Any],
    candidate: Callable[[], Any],
    *,
    reps: int,
    cap_seconds: float,
    warmup: int = 1,
    min_rep_seconds: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> PairedTimes:
    """Times ``baseline`` and ``candidate`` alternately under a time cap.

    Runs ``warmup`` untimed pairs, then up to ``reps`` pairs ``baseline(); candidate()``. A step
    much shorter than ``min_rep_seconds`` (a few-millisecond MLP step) is timed as a run of
    ``number`` consecutive calls, ``number`` chosen from the last warm-up pair so that the longer
    of the two runs lasts about ``min_rep_seconds`` (a 1 ms step beside a 300 ms one is not
    repeated: that would repeat the long one too); the recorded time is the run's mean per call,
    so a single scheduler hiccup cannot decide a repetition's ratio. Before
    each repetition the elapsed time plus the remaining repetitions (at the median cost of the
    pairs so far; before the first one, at half the warm-up pair's cost, since a first call may
    pay one-off costs) is compared with ``cap_seconds``; if they cannot fit, it stops and sets
    ``capped``. A step that never returns
    is not interrupted here: run the whole measurement in :class:`IsolatedRunner` with a timeout.

    Args:
        baseline: The plain step.
        candidate: The step under test.
        reps: Repetitions wanted (≥ 1).
        cap_seconds: Time budget of the whole measurement, warm-up included (> 0).
        warmup: Untimed pairs before the repetitions.
        min_rep_seconds: Shortest wanted duration of one timed run (0: one call per run).
        clock: Monotonic clock in seconds.

    Returns:
        The paired times, per call (possibly fewer than ``reps`` when capped); ``number`` is
        the calls per timed run.

    Raises:
        ValueError: If ``reps < 1`` or ``cap_seconds <= 0``.

    Example:
        >>> t = interleaved_times(lambda: None, lambda: None, reps=3, cap_seconds=10.0)
        >>> t.reps, t.capped
        (3, False)
    """
    check_timing_args(reps, cap_seconds, min_rep_seconds)
    out = PairedTimes()
    start = clock()
    warm_pair = 0.0
    longest = float("inf")
    for i in range(warmup):
        tb, tc = _timed_run(baseline, 1, clock), _timed_run(candidate, 1, clock)
        if i == 0:
            out.warmup = (tb, tc)
        warm_pair = tb + tc
        longest = max(tb, tc)
    if min_rep_seconds > 0 and 0 < longest < min_rep_seconds:
        out.number = max(1, int(min_rep_seconds / longest))
        warm_pair *= out.number
    n = out.number
    while out.reps < reps:
        # all remaining pairs must fit at their median cost so far; before the first repetition,
        # at half the warm-up pair's cost (a first call may pay for caches, plans, lazy imports)
        if out.reps:
            pairs = [b + c for b, c in zip(out.baseline, out.candidate)]
            needed = statistics.median(pairs) * n * (reps - out.reps)
        else:
            needed = warm_pair / 2 * reps
        if clock() - start + needed > cap_seconds:
            out.capped = True
            break
        out.baseline.append(_timed_run(baseline, n, clock))
        out.candidate.append(_timed_run(candidate, n, clock))
    out.elapsed = clock() - start
    return out
