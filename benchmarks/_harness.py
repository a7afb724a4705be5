"""Timing and memory utilities shared by the framework benchmarks.

Nothing here imports a deep-learning framework: a benchmark passes plain callables (one training
step each) and gets back wall times, peak memory and Markdown text.

The measurement protocol:

* **Time.** A configuration (model, batch size B, method) is timed against the plain training step
  in one process, interleaved — plain, method, plain, method, … — after one warm-up of each; the
  figure is the median over the repetitions of the paired ratio ``t_method / t_plain``. Every
  configuration has a time cap, checked between repetitions: when the remaining repetitions cannot
  fit, the configuration stops and is reported as skipped (cap). A single step that may itself
  exceed the cap is handled by running the configuration in a child process with a timeout
  (:class:`IsolatedRunner`).
* **Memory.** One fresh process per configuration with ``MALLOC_MMAP_THRESHOLD_=65536`` (large
  freed blocks go back to the OS, so the resident set tracks live memory), two warm-up steps, then
  the peak resident set over three steps (``VmHWM``, reset by writing ``5`` to
  ``/proc/self/clear_refs``) minus the resident set just before them: the extra memory of a step.

Children are forked from a fork server (:mod:`multiprocessing`, ``"forkserver"``) that imported
the heavy modules once, so a fresh process per configuration costs milliseconds instead of the
seconds of a framework import; memory children set the malloc threshold with ``mallopt``, which is
what glibc does with the environment variable at start-up (ResNet-20, B = 32: plain, BackPACK and
fimcore steps measured 49.2/131.2/59.4 MB this way and 49.2/131.0/58.9 MB in fresh interpreters
started with the variable). ``start_method="spawn"`` gives a fresh interpreter per child instead
(the environment variable is then also set), e.g. for frameworks that must not be forked even
before first use.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import importlib
import importlib.metadata
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

MMAP_THRESHOLD_BYTES = 65536
"""Value of ``MALLOC_MMAP_THRESHOLD_`` used for memory measurements (see the module docstring)."""

MIN_REP_SECONDS = 0.2
"""Shortest timed run: steps shorter than this are timed as runs of consecutive calls."""

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------


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
    if reps < 1:
        raise ValueError(f"reps must be at least 1; received {reps}. Ask for ≥ 5 for a median.")
    if not cap_seconds > 0:
        raise ValueError(f"cap_seconds must be positive; received {cap_seconds}.")
    if not min_rep_seconds >= 0:
        raise ValueError(f"min_rep_seconds must be >= 0; received {min_rep_seconds}.")
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


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


class FaultCounter:
    """Wraps a step and records the process's minor page faults during each call.

    A minor fault is a page the kernel maps in on first touch: a step whose large temporaries
    are returned to the operating system when freed (glibc does so for blocks above its mmap
    and trim thresholds) pays for them again on every call, and how often that happens varies
    with the heap's history. The per-call counts let a report say when a ratio moved with them.
    Where ``resource`` is missing (Windows) nothing is recorded and :meth:`median` is None.

    Example:
        >>> step = FaultCounter(lambda: None)
        >>> step(); step()
        >>> len(step.faults)
        2
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.faults: list[int] = []
        try:
            import resource
        except ImportError:           # pragma: no cover - Windows
            self._usage = None
        else:
            self._usage = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def __call__(self) -> Any:
        if self._usage is None:       # pragma: no cover - Windows
            return self.fn()
        before = self._usage()
        try:
            return self.fn()
        finally:
            self.faults.append(self._usage() - before)

    def median(self, skip: int = 2) -> float | None:
        """Median faults per call, leaving out the first ``skip`` calls (warm-up, first allocations)."""
        xs = self.faults[skip:] or self.faults
        return float(statistics.median(xs)) if xs else None


@dataclass
class StepMemory:
    """Resident-set figures of a measured step, in MB (10⁶ bytes).

    Attributes:
        extra_mb: Peak resident set over the measured steps minus the resident set before them.
        rss_before_mb: Resident set just before the measured steps.
        peak_mb: Peak resident set (``VmHWM``) over the measured steps.
    """

    extra_mb: float
    rss_before_mb: float
    peak_mb: float


def set_malloc_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Sets glibc's mmap threshold, as ``MALLOC_MMAP_THRESHOLD_`` does at start-up.

    Returns:
        True if glibc accepted it, False where there is no glibc ``mallopt``.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False


def _status_kb(name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name} line; memory needs Linux procfs.")


def reset_peak_rss() -> None:
    """Resets this process's peak resident set (``VmHWM``) to the current resident set."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def step_memory(step: Callable[[], Any], *, warmup: int = 2, steps: int = 3) -> StepMemory:
    """Extra resident memory of ``step``: peak over ``steps`` calls minus the set before them.

    Call it in a fresh process with the mmap threshold set (:func:`set_malloc_mmap_threshold`,
    done for you by ``IsolatedRunner.run(..., memory=True)``), or freed blocks kept by malloc
    hide the step's own peak.

    Args:
        step: One training step.
        warmup: Unmeasured calls first (buffers, caches, lazy initialisation).
        steps: Measured calls.

    Returns:
        The step's memory figures.
    """
    for _ in range(warmup):
        step()
    gc.collect()
    before = _status_kb("VmRSS")
    reset_peak_rss()
    for _ in range(steps):
        step()
    peak = _status_kb("VmHWM")
    return StepMemory(extra_mb=(peak - before) * 1024 / 1e6, rss_before_mb=before * 1024 / 1e6,
                      peak_mb=peak * 1024 / 1e6)


# ---------------------------------------------------------------------------------------------
# Child processes with a timeout
# ---------------------------------------------------------------------------------------------


@dataclass
class IsolatedResult:
    """Outcome of a job run in a child process.

    Attributes:
        status: ``"ok"``, ``"timeout"`` (killed at the deadline) or ``"error"``.
        value: What the job returned (``status == "ok"``).
        error: Traceback text or exit description otherwise.
        seconds: Wall time from start to result, kill or exit.
    """

    status: str
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


def resolve(target: str) -> Callable[..., Any]:
    """Returns the function named by ``"package.module:function"``."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"target must look like 'package.module:function'; received {target!r}.")
    return getattr(importlib.import_module(module), name)


def _child_main(conn: multiprocessing.connection.Connection, target: str, kwargs: dict,
                memory: bool) -> None:
    try:
        if memory:
            set_malloc_mmap_threshold()
        conn.send(("ok", resolve(target)(**kwargs)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc(limit=8)))
    finally:
        conn.close()


class IsolatedRunner:
    """Runs one job per fresh child process, with a timeout.

    Args:
        preload: Modules the fork server imports once, before forking any child (forkserver
            only). Name the framework and the benchmark module so children start in milliseconds.
        start_method: ``"forkserver"`` (default) or ``"spawn"`` (a fresh interpreter per child).

    Example:
        >>> runner = IsolatedRunner(start_method="spawn")
        >>> runner.run("builtins:dict", {"a": 1}, timeout=60).value
        {'a': 1}
    """

    def __init__(self, *, preload: Iterable[str] = (), start_method: str = "forkserver") -> None:
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn'; received {start_method!r}.")
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(list(preload))
        self.start_method = start_method

    def _start(self, proc: multiprocessing.process.BaseProcess, memory: bool) -> None:
        if not (memory and self.start_method == "spawn"):
            proc.start()
            return
        saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_BYTES)
        try:
            proc.start()
        finally:
            if saved is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved

    def run(self, target: str, kwargs: dict | None = None, *, timeout: float,
            memory: bool = False) -> IsolatedResult:
        """Runs ``target(**kwargs)`` in a child and waits at most ``timeout`` seconds.

        Args:
            target: ``"package.module:function"``, importable in the child; it must return a
                picklable value.
            kwargs: Picklable keyword arguments.
            timeout: Seconds before the child is killed and ``status`` is ``"timeout"``.
            memory: Set the malloc mmap threshold in the child (for :func:`step_memory`).

        Returns:
            The outcome; the child is always gone when this returns.
        """
        t0 = time.perf_counter()
        for attempt in (1, 2):
            recv, send = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(target=_child_main, daemon=True,
                                     args=(send, target, dict(kwargs or {}), memory))
            try:
                self._start(proc, memory)
                break
            except (EOFError, OSError):
                # a fork server that died (killed from outside) is relaunched on the next start
                recv.close()
                send.close()
                if attempt == 2:
                    raise
        send.close()
        try:
            if not recv.poll(timeout):
                proc.kill()
                proc.join()
                return IsolatedResult("timeout", error=f"killed after {timeout:.0f} s",
                                      seconds=time.perf_counter() - t0)
            try:
                status, payload = recv.recv()
            except EOFError:
                proc.join()
                why = " (the fork server is gone)" if proc.exitcode == 255 else ""
                return IsolatedResult("error", error=f"child exited with code {proc.exitcode} "
                                      f"without a result{why}", seconds=time.perf_counter() - t0)
            proc.join()
            seconds = time.perf_counter() - t0
            if status == "ok":
                return IsolatedResult("ok", value=payload, seconds=seconds)
            return IsolatedResult("error", error=payload, seconds=seconds)
        finally:
            recv.close()
            if proc.is_alive():
                proc.kill()
                proc.join()


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    """CPU model, cores, memory, OS, Python, load average and UTC date of this machine."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        mem = f"{_meminfo_kb('MemTotal') / 1024 ** 2:.1f} GiB"
    except (OSError, RuntimeError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "memory": mem,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "load average (1/5/15 min) at start": load_average(),
        "date (UTC)": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (a busy shared machine shows here)."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _meminfo_kb(name: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/meminfo has no {name} line.")


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed distribution versions (``"not installed"`` when absent), without importing them."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; ``|`` inside cells is escaped.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, "x|y"]]))
        | a | b |
        | --- | --- |
        | 1 | x\\|y |
    """
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def key_value_table(items: dict[str, str]) -> str:
    """A two-column Markdown table (item, value) of ``items``."""
    return markdown_table(["item", "value"], items.items())


def command_line() -> str:
    """The command that started this process, as one would type it from the repository root."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    args = " ".join(sys.argv[1:])
    if spec is not None and spec.name:
        name = spec.name.removesuffix(".__main__")
        return f"python -m {name} {args}".strip()
    return f"python {' '.join(sys.argv)}".strip()


def write_report(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` (parents created) and returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return p


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    """``1.42×``; ``–`` for None or nan."""
    if x is None or x != x:
        return "–"
    if x >= 100:
        return f"{x:.0f}×"
    if x >= 10:
        return f"{x:.1f}×"
    return f"{x:.{digits}f}×"


def fmt_ms(seconds: float | None) -> str:
    """Milliseconds with sensible precision; ``–`` for None or nan."""
    if seconds is None or seconds != seconds:
        return "–"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


# ------------------------------------------------------------------ per-framework step tables


def grid_headers(ratio_header: str) -> list[str]:
    """Columns of the JAX/TensorFlow step tables (:func:`run_timing_grid` rows)."""
    return ["model", "B", "method", "plain step (ms)", "step with G (ms)", ratio_header, "reps",
            "plain extra MB", "method extra MB"]


def run_timing_grid(runner: "IsolatedRunner", module: str, *, model_labels: dict, method_labels: dict,
                    models: Sequence[str], methods: Sequence[str], batch_sizes: Sequence[int],
                    reps: int, cap_seconds: float, memory: bool, target: float,
                    targeted: Callable[[str], bool] = lambda method: True, target_batch: int = 128,
                    timing_slack: float = 300.0, memory_timeout: float = 600.0,
                    log: Callable[[str], None] = lambda s: print(s, flush=True)) -> tuple[list, list]:
    """Memory and interleaved timing of every (model, B, method), each in its own child.

    ``module`` must define ``memory_job(model, batch_size, method)`` returning
    ``{"extra_mb": …}`` and ``timing_job(model, batch_size, method, reps, cap_seconds)``
    returning ``{"plain", "step", "ratio", "reps", "capped"}``. Memory is measured for the plain
    step and every method except the ``*-noeig`` ones (same memory as their method); ratios of
    ``targeted`` methods at ``target_batch`` are marked against ``target`` by :func:`target_mark`
    (✓/✗ only when the interquartile range printed beside the ratio is on one side of it).

    Returns:
        ``(rows, notes)``: table rows in :func:`grid_headers` order, and a note per failed child.
    """
    rows, notes = [], []
    for model in models:
        for b in batch_sizes:
            mem: dict = {}
            if memory:
                for method in ("plain", *(m for m in methods if not m.endswith("-noeig"))):
                    r = runner.run(f"{module}:memory_job", dict(model=model, batch_size=b, method=method),
                                   timeout=memory_timeout, memory=True)
                    mem[method] = r.value["extra_mb"] if r.status == "ok" else None
                    if r.status != "ok":
                        notes.append(f"memory {model} B={b} {method}: {r.status} {(r.error or '')[-200:]}")
            for method in methods:
                r = runner.run(f"{module}:timing_job",
                               dict(model=model, batch_size=b, method=method, reps=reps,
                                    cap_seconds=cap_seconds), timeout=cap_seconds + timing_slack)
                if r.status != "ok":
                    notes.append(f"{model} B={b} {method}: {r.status} {(r.error or '')[-300:]}")
                    rows.append([model_labels[model], b, method_labels[method], *["–"] * 6])
                    continue
                v = r.value
                spread = fmt_spread(v.get("q1", math.nan), v.get("q3", math.nan))
                mark = (" " + target_mark(v.get("q1", math.nan), v.get("q3", math.nan), target)
                        if b == target_batch and targeted(method) else "")
                m = mem.get(method)
                rows.append([model_labels[model], b, method_labels[method], fmt_ms(v["plain"]),
                             fmt_ms(v["step"]), fmt_ratio(v["ratio"]) + spread + mark,
                             f"{v['reps']}{' (cap)' if v['capped'] else ''}",
                             "–" if mem.get("plain") is None else f"{mem['plain']:.0f}",
                             "–" if m is None else f"{m:.0f}"])
                log(" | ".join(str(c) for c in rows[-1]))
    return rows, notes


def exactness_rows(runner: "IsolatedRunner", module: str, model_labels: dict, models: Sequence[str],
                   batch_size: int = 8, timeout: float = 900.0) -> list:
    """``[label, B, relative difference]`` per model from ``module``'s ``exactness_job`` children."""
    out = []
    for model in models:
        r = runner.run(f"{module}:exactness_job", dict(model=model, batch_size=batch_size), timeout=timeout)
        out.append([model_labels[model], str(batch_size), f"{r.value:.1e}" if r.status == "ok" else r.status])
    return out


def framework_report(title: str, *, quick: bool, paragraphs: Sequence[str], headers: Sequence[str],
                     rows: list, exact_caption: str, exact: list, packages: Sequence[str],
                     notes: Sequence[str]) -> str:
    """The Markdown report of a JAX/TensorFlow benchmark run: command, method paragraphs, the
    step table, the float64 exactness table, machine, versions and notes."""
    return "\n\n".join([
        f"# {title}",
        f"Command: `{command_line()}`" + (" (quick mode)" if quick else ""),
        *paragraphs,
        markdown_table(headers, rows),
        exact_caption,
        markdown_table(["model", "B", "relative difference"], exact),
        "## Machine\n\n" + key_value_table(machine_info()),
        "## Versions\n\n" + key_value_table(package_versions(packages)),
        *(["## Notes\n\n" + "\n".join(f"- {n}" for n in notes)] if notes else []),
    ])
