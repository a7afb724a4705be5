"""The per-framework step grid: every (model, B, method) timed and measured in its own child, and the Markdown report of a run.

Part of the benchmark harness; the protocol is described in :mod:`benchmarks._harness`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from .timing import fmt_spread, target_mark
from .isolation import IsolatedRunner
from .report import command_line, fmt_ms, fmt_ratio, key_value_table, machine_info, markdown_table, package_versions

def for_each_config(models: Sequence[str], batch_sizes: Sequence[int],
                    methods_for: Callable[[str], Sequence[str]], *,
                    per_cell: Callable[[str, int], Any],
                    per_config: Callable[[str, int, str, Any], Any]) -> list:
    """The grid loop of every framework benchmark: for each model, for each batch size B,
    ``state = per_cell(model, B)`` once (what all methods of that cell share: the plain step's
    memory, a float64 reference Gram), then ``per_config(model, B, method, state)`` for each of
    ``methods_for(model)`` in order. Returns the ``per_config`` results in that order.
    """
    out = []
    for model in models:
        for b in batch_sizes:
            state = per_cell(model, b)
            for method in methods_for(model):
                out.append(per_config(model, b, method, state))
    return out


def grid_headers(ratio_header: str) -> list[str]:
    """Columns of the JAX/TensorFlow step tables (:func:`run_timing_grid` rows)."""
    return ["model", "B", "method", "plain step (ms)", "step with G (ms)", ratio_header, "reps",
            "plain extra MB", "method extra MB"]


def run_timing_grid(runner: "IsolatedRunner", module: str, *, model_labels: dict, method_labels: dict,
                    models: Sequence[str], methods: Sequence[str], batch_sizes: Sequence[int],
                    reps: int, cap_seconds: float, memory: bool, target: float,
                    targeted: Callable[[str], bool] = lambda method: True, target_batch: int | None = 128,
                    timing_slack: float = 300.0, memory_timeout: float = 600.0,
                    log: Callable[[str], None] = lambda s: print(s, flush=True)) -> tuple[list, list]:
    """Memory and interleaved timing of every (model, B, method), each in its own child.

    ``module`` must define ``memory_job(model, batch_size, method)`` returning
    ``{"extra_mb": …}`` and ``timing_job(model, batch_size, method, reps, cap_seconds)``
    returning ``{"plain", "step", "ratio", "reps", "capped"}``. Memory is measured for the plain
    step and every method except the ``*-noeig`` ones (same memory as their method); ratios of
    ``targeted`` methods at ``target_batch`` (every B when None) are marked against ``target`` by
    :func:`target_mark`
    (✓/✗ only when the interquartile range printed beside the ratio is on one side of it).

    Returns:
        ``(rows, notes)``: table rows in :func:`grid_headers` order, and a note per failed child.
    """
    rows, notes = [], []

    def measure_memory(model, b):
        mem: dict = {}
        if memory:
            for method in ("plain", *(m for m in methods if not m.endswith("-noeig"))):
                r = runner.run(f"{module}:memory_job", dict(model=model, batch_size=b, method=method),
                               timeout=memory_timeout, memory=True)
                mem[method] = r.value["extra_mb"] if r.status == "ok" else None
                if r.status != "ok":
                    notes.append(f"memory {model} B={b} {method}: {r.status} {(r.error or '')[-200:]}")
        return mem

    def time_method(model, b, method, mem):
        r = runner.run(f"{module}:timing_job",
                       dict(model=model, batch_size=b, method=method, reps=reps,
                            cap_seconds=cap_seconds), timeout=cap_seconds + timing_slack)
        if r.status != "ok":
            notes.append(f"{model} B={b} {method}: {r.status} {(r.error or '')[-300:]}")
            rows.append([model_labels[model], b, method_labels[method], *["–"] * 6])
            return
        v = r.value
        spread = fmt_spread(v.get("q1", math.nan), v.get("q3", math.nan))
        mark = (" " + target_mark(v.get("q1", math.nan), v.get("q3", math.nan), target)
                if target_batch in (None, b) and targeted(method) else "")
        m = mem.get(method)
        rows.append([model_labels[model], b, method_labels[method], fmt_ms(v["plain"]),
                     fmt_ms(v["step"]), fmt_ratio(v["ratio"]) + spread + mark,
                     f"{v['reps']}{' (cap)' if v['capped'] else ''}",
                     "–" if mem.get("plain") is None else f"{mem['plain']:.0f}",
                     "–" if m is None else f"{m:.0f}"])
        log(" | ".join(str(c) for c in rows[-1]))

    for_each_config(models, batch_sizes, lambda model: methods, per_cell=measure_memory,
                    per_config=time_method)
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
