"""Sampled-label Fisher rows of the framework benchmarks (``--fisher empirical,sampled``).

The sampled-label ("true", Monte-Carlo) Fisher Gram has rows ∇_θ ℓ(h_i, ŷ_i) with ŷ_i drawn from
the model's predictive distribution instead of the data label y_i. Per step it costs one more
backward of the model output h per draw (K = 1 here). What the benchmarks report is that extra
cost: three steps are timed **interleaved in one process** — plain, fimcore empirical, fimcore
sampled (K = 1), plain, … — after one untimed call of each (compilation or tracing), and each
row gives the median over the repetitions of its paired ratio to the plain step of the same
repetition and, for the sampled row, to the empirical step of the same repetition, with the
interquartile range of those ratios. Both fimcore steps take the eigenvalues of their Gram
(``fimcore.spectrum``), as the other fimcore rows of the benchmarks do.

Nothing here imports a deep-learning framework: the benchmarks pass plain callables.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from benchmarks import _harness as H

FISHER_KINDS = ("empirical", "sampled")
"""Values of ``--fisher``: the default tables (``empirical``) and the sampled-label rows."""

STEPS = ("plain", "empirical", "sampled")
"""The interleaved steps, in the order each repetition runs them."""

LABELS = {"empirical": "fimcore empirical", "sampled": "fimcore sampled (K=1)"}
"""Method column of the two fimcore rows."""

HEADERS = ["model", "B", "method", "plain step (ms)", "step with G (ms)", "ratio to plain",
           "ratio to empirical", "reps"]
"""Columns of the sampled-label table (:func:`rows`)."""


def parse_fisher(text: str) -> tuple[str, ...]:
    """``"empirical,sampled"`` → ``("empirical", "sampled")`` (the ``--fisher`` option's type).

    Raises:
        argparse.ArgumentTypeError: an empty list or a kind other than those of
            :data:`FISHER_KINDS`.

    Example:
        >>> parse_fisher("sampled, empirical")
        ('sampled', 'empirical')
    """
    kinds = tuple(dict.fromkeys(s.strip() for s in str(text).split(",") if s.strip()))
    bad = [k for k in kinds if k not in FISHER_KINDS]
    if not kinds or bad:
        raise argparse.ArgumentTypeError(
            f"--fisher takes a comma-separated list of {', '.join(FISHER_KINDS)}; received {text!r}. "
            "Pass e.g. --fisher empirical,sampled.")
    return kinds


def add_fisher_option(parser: argparse.ArgumentParser) -> None:
    """Adds ``--fisher`` (default ``empirical``: the benchmark's usual tables, unchanged)."""
    parser.add_argument(
        "--fisher", type=parse_fisher, default=("empirical",), metavar="KINDS",
        help="comma-separated: 'empirical' (default) runs the usual tables; 'sampled' adds rows "
             "timing the plain, empirical-fimcore and sampled-label (K=1) fimcore steps interleaved; "
             "'sampled' alone writes only those rows (default output <framework>_sampled.md)")


@dataclass
class GroupTimes:
    """Interleaved per-call wall times of several steps, in seconds, paired by index.

    Attributes:
        times: ``{step name: [time of repetition 0, 1, …]}``, warm-up excluded.
        capped: True when the cap stopped the measurement before ``reps`` repetitions.
        elapsed: Wall time spent, warm-up included.
        number: Consecutive calls per timed run (the times are per call).
    """

    times: dict[str, list[float]] = field(default_factory=dict)
    capped: bool = False
    elapsed: float = 0.0
    number: int = 1

    @property
    def reps(self) -> int:
        """Completed repetitions."""
        return min((len(v) for v in self.times.values()), default=0)


def interleaved_group(steps: dict[str, Callable[[], Any]], *, reps: int, cap_seconds: float,
                      warmup: int = 1, min_rep_seconds: float = 0.0,
                      clock: Callable[[], float] = time.perf_counter) -> GroupTimes:
    """Times the ``steps`` round-robin (in dict order) under a time cap.

    The protocol of :func:`benchmarks._harness.interleaved_times` with more than two steps:
    ``warmup`` untimed rounds; steps shorter than ``min_rep_seconds`` are timed as runs of
    ``number`` consecutive calls, ``number`` chosen so that the longest step's run of the last
    warm-up round lasts about ``min_rep_seconds``; before each repetition the elapsed time plus
    the remaining rounds (at the median round cost so far, or half the warm-up round's cost
    before the first) must fit in ``cap_seconds``, else it stops and sets ``capped``.

    Raises:
        ValueError: no steps, ``reps < 1``, ``cap_seconds <= 0`` or ``min_rep_seconds < 0``.

    Example:
        >>> t = interleaved_group({"a": lambda: None, "b": lambda: None}, reps=3, cap_seconds=10.0)
        >>> t.reps, t.capped, sorted(t.times)
        (3, False, ['a', 'b'])
    """
    if not steps:
        raise ValueError("steps must name at least one callable; received an empty dict.")
    H.timing.check_timing_args(reps, cap_seconds, min_rep_seconds)

    def run(fn: Callable[[], Any], n: int) -> float:
        t0 = clock()
        for _ in range(n):
            fn()
        return (clock() - t0) / n

    out = GroupTimes(times={name: [] for name in steps})
    start = clock()
    warm = [0.0] * len(steps)
    for _ in range(warmup):
        warm = [run(fn, 1) for fn in steps.values()]
    longest = max(warm) if warmup else math.inf
    if min_rep_seconds > 0 and 0 < longest < min_rep_seconds:
        out.number = max(1, int(min_rep_seconds / longest))
    n = out.number
    while out.reps < reps:
        if out.reps:
            rounds = [sum(v[i] for v in out.times.values()) for i in range(out.reps)]
            needed = statistics.median(rounds) * n * (reps - out.reps)
        else:
            needed = sum(warm) * n / 2 * reps
        if clock() - start + needed > cap_seconds:
            out.capped = True
            break
        for name, fn in steps.items():
            out.times[name].append(run(fn, n))
    out.elapsed = clock() - start
    return out


def time_steps(plain: Callable[[], Any], empirical: Callable[[], Any], sampled: Callable[[], Any], *,
               reps: int, cap_seconds: float) -> dict:
    """One untimed call of each step (compilation, tracing), then :func:`interleaved_group`.

    Returns a picklable dict: ``times`` (per step, per repetition, seconds per call), ``capped``,
    ``number``, ``warmup_s`` (seconds of the untimed first calls).
    """
    steps = {"plain": plain, "empirical": empirical, "sampled": sampled}
    t0 = time.perf_counter()
    for fn in steps.values():
        fn()
    warmup_s = time.perf_counter() - t0
    t = interleaved_group(steps, reps=reps, cap_seconds=cap_seconds, min_rep_seconds=H.MIN_REP_SECONDS)
    return {"times": t.times, "capped": t.capped, "number": t.number, "warmup_s": warmup_s}


def _ratio_cell(baseline: Sequence[float], candidate: Sequence[float]) -> str:
    if not candidate:
        return "–"
    q1, q3 = H.ratio_quartiles(baseline, candidate)
    return H.fmt_ratio(H.median_ratio(baseline, candidate)) + H.fmt_spread(q1, q3)


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def rows(model_label: str, batch_size: int, value: dict) -> list[list]:
    """The empirical and sampled rows of one (model, B) from a :func:`time_steps` result.

    Example:
        >>> v = {"times": {"plain": [1.0, 1.0, 1.0], "empirical": [1.2, 1.3, 1.1],
        ...                "sampled": [2.4, 2.6, 2.2]}, "capped": False}
        >>> for r in rows("MLP", 32, v): print(r[2:])
        ['fimcore empirical', '1000', '1200', '1.20× [1.15–1.25]', '–', '3']
        ['fimcore sampled (K=1)', '1000', '2400', '2.40× [2.30–2.50]', '2.00× [2.00–2.00]', '3']
    """
    t = value["times"]
    plain, emp, samp = t["plain"], t["empirical"], t["sampled"]
    reps = f"{len(plain)}{' (cap)' if value.get('capped') else ''}"
    return [
        [model_label, batch_size, LABELS["empirical"], H.fmt_ms(_median(plain)), H.fmt_ms(_median(emp)),
         _ratio_cell(plain, emp), "–", reps],
        [model_label, batch_size, LABELS["sampled"], H.fmt_ms(_median(plain)), H.fmt_ms(_median(samp)),
         _ratio_cell(plain, samp), _ratio_cell(emp, samp), reps],
    ]


def failed_rows(model_label: str, batch_size: int, status: str) -> list[list]:
    """Rows for a (model, B) whose child failed: ``status`` in the ratio cells."""
    return [[model_label, batch_size, LABELS[k], "–", "–", status, "–", "–"] for k in ("empirical", "sampled")]


def sampled_vs_empirical(value: dict) -> float:
    """Median over repetitions of (sampled step) / (empirical step): the figure a summary quotes."""
    return H.median_ratio(value["times"]["empirical"], value["times"]["sampled"])


def run_grid(runner: H.IsolatedRunner, target: str, *, model_labels: dict, models: Sequence[str],
             batch_sizes: Sequence[int], timeout: float, job_kwargs: dict | None = None,
             log: Callable[[str], None] = lambda s: print(s, flush=True)) -> tuple[list, list]:
    """Runs ``target(model=…, batch_size=…, **job_kwargs)`` (a :func:`time_steps` result) per
    (model, B), each in its own child; returns ``(table rows, notes on failed children)``."""
    table, notes = [], []
    for model in models:
        for b in batch_sizes:
            r = runner.run(target, dict(model=model, batch_size=b, **(job_kwargs or {})), timeout=timeout)
            if r.status != "ok":
                notes.append(f"{model} B={b} sampled rows: {r.status} {(r.error or '')[-300:]}")
                table += failed_rows(model_labels[model], b, r.status)
            else:
                table += rows(model_labels[model], b, r.value)
                if r.value.get("capped"):
                    notes.append(f"{model} B={b}: the time cap stopped the repetitions early "
                                 f"({len(r.value['times']['plain'])} done)")
            for row in table[-2:]:
                log(" | ".join(str(c) for c in row))
    return table, notes


def section(table: list, *, details: str = "") -> str:
    """The Markdown section of the sampled-label rows (heading, protocol, table)."""
    text = ("Plain step, fimcore empirical-Fisher step and fimcore sampled-label step (K = 1 label "
            "drawn per sample from the model's softmax; the optimizer still gets the data-label "
            "gradient) timed interleaved in one child process per (model, B), after one untimed call "
            "of each; both fimcore steps take the eigenvalues of their Gram. Ratio to plain / to "
            "empirical: median over the repetitions of the paired ratio to the plain / the empirical "
            "step of the same repetition; in square brackets the interquartile range of those paired "
            f"ratios. Steps shorter than {H.MIN_REP_SECONDS} s are timed in runs of consecutive calls "
            "lasting about that long (paired per-call means). Synthetic inputs; float32 models. "
            + details)
    return "\n\n".join(["## Sampled-label Fisher (K = 1) beside the empirical one", text.strip(),
                        H.markdown_table(HEADERS, table)])


def insert_section(text: str, table: list, notes: Sequence[str], *, details: str = "") -> str:
    """``text`` (a benchmark's usual report) with the sampled-label section, and its notes, placed
    before the report's first ``## Machine`` heading (appended when there is none).

    Example:
        >>> out = insert_section("# T\\n\\n## Machine\\n\\nx", [], ["n"])
        >>> out.index("## Sampled-label") < out.index("- n") < out.index("## Machine")
        True
    """
    block = section(table, details=details) + "".join(f"\n\n- {n}" if i == 0 else f"\n- {n}"
                                                      for i, n in enumerate(notes))
    head, sep, tail = text.partition("\n## Machine")
    if not sep:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    return head.rstrip("\n") + "\n\n" + block + "\n\n" + sep.lstrip("\n") + tail


def standalone_report(title: str, *, command: str, table: list, notes: Sequence[str], machine: dict,
                      versions: dict, details: str = "", preamble: Sequence[str] = ()) -> str:
    """A report holding only the sampled-label rows: command, section, machine, versions, notes."""
    return "\n\n".join([
        f"# {title}",
        f"Command (from the repository root): `{command}`",
        *preamble,
        section(table, details=details),
        "## Machine\n\n" + H.key_value_table(machine),
        "## Versions\n\n" + H.key_value_table(versions),
        *(["## Notes\n\n" + "\n".join(f"- {n}" for n in notes)] if notes else []),
    ])
