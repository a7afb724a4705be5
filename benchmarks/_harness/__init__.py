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

The harness is split by concept: :mod:`.timing` (paired interleaved timing and ratio statistics),
:mod:`.memory` (peak resident set of a step, page faults, the malloc threshold),
:mod:`.isolation` (one job per child process with a timeout), :mod:`.report` (machine and
versions, Markdown tables, number formats) and :mod:`.grid` (the (model, B, method) step grid
and the report of a framework run). Every name is re-exported here, so
``from benchmarks import _harness as H`` gives all of them.
"""

from __future__ import annotations

from .grid import exactness_rows, for_each_config, framework_report, grid_headers, run_timing_grid
from .isolation import IsolatedResult, IsolatedRunner, resolve
from .memory import (MMAP_THRESHOLD_BYTES, FaultCounter, StepMemory, reset_peak_rss,
                     set_malloc_mmap_threshold, step_memory)
from .report import (command_line, fmt_ms, fmt_ratio, key_value_table, load_average, machine_info,
                     markdown_table, package_versions, write_report)
from .timing import (MIN_REP_SECONDS, SPREAD_NOTE, PairedTimes, fmt_spread, interleaved_times,
                     median_ratio, ratio_quartiles, target_mark, warm_then_time)
# private helpers, importable from here as before the split
from .isolation import _child_main  # noqa: F401
from .memory import _M_MMAP_THRESHOLD, _status_kb  # noqa: F401
from .report import _meminfo_kb  # noqa: F401
from .timing import _timed_run, _upper_median  # noqa: F401

__all__ = [
    "FaultCounter", "IsolatedResult", "IsolatedRunner", "MIN_REP_SECONDS", "MMAP_THRESHOLD_BYTES",
    "PairedTimes", "SPREAD_NOTE", "StepMemory", "command_line", "exactness_rows", "fmt_ms",
    "fmt_ratio", "fmt_spread", "for_each_config", "framework_report", "grid_headers", "interleaved_times",
    "key_value_table", "load_average", "machine_info", "markdown_table", "median_ratio",
    "package_versions", "ratio_quartiles", "reset_peak_rss", "resolve", "run_timing_grid",
    "set_malloc_mmap_threshold", "step_memory", "target_mark", "warm_then_time", "write_report",
]
