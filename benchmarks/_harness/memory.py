"""Memory: page-fault counts, peak resident set of a step, the malloc threshold.

Part of the benchmark harness; the protocol is described in :mod:`benchmarks._harness`.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
from dataclasses import dataclass
from typing import Any, Callable

MMAP_THRESHOLD_BYTES = 65536
"""Value of ``MALLOC_MMAP_THRESHOLD_`` used for memory measurements (see :mod:`benchmarks._harness`)."""

_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


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
