"""Cost of fimcore.spectrum and fimcore.truncated_condition_number by Gram size.

Run as ``python -m benchmarks.bench_spectrum`` (from the repository root). For
B ∈ {32, 128, 512, 2048}, NumPy and PyTorch, float32 and float64 Grams, it times

* ``eigvalsh``: the library's own symmetric eigensolver on the Gram cast to float64,
  the floor any implementation pays;
* ``spectrum``: :func:`fimcore.spectrum` (validation: finite, symmetric, diagonal; cast
  to float64, symmetrise, eigvalsh, sort, clamp);
* ``cond``: :func:`fimcore.truncated_condition_number` with its default rule (the rank read
  off the diagonally scaled Gram C: a Cholesky test of full rank when λ_min(G) allows it,
  else the eigenvalues of C with the Weyl-separation shortcut, and the projection onto the
  resolved subspace only when neither decides);
* ``legacy``: the same call with the previous default tolerance, ``rtol = B·eps`` relative to
  λ_max (one ``eigvalsh`` and a comparison).

Two Grams per size: ``full``, J Jᵀ of a Gaussian J of shape (B, 2B) (the common, full-rank
case), and ``deficient``, of shape (B, B/2) (rank B/2: the projection route).

``--stats`` times instead every function of :mod:`fimcore.stats` on one B = ``--stats-size``
(default 128) float64 Gram (NumPy), beside the float64 ``eigvalsh`` of the same Gram, and a
``MeasureTracker.update`` with every statistic against one with the default two; written to
``benchmarks/results/spectrum_stats.md``. Each statistic must stay below the eigen-solve.

Each figure is the median wall time of ``--repeats`` calls after one warm-up call, the
three functions interleaved per repetition. Nothing is asserted: the table is printed and
written to ``benchmarks/results/spectrum.md`` with the machine and the versions
(``--append`` adds it below the tables already there).

``--threads N`` pins the BLAS/OpenMP pools and torch to N threads (the script re-executes
itself with ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``/``MKL_NUM_THREADS`` set, since the
pools are sized when NumPy loads). On a shared machine an idle-spinning OpenBLAS pool slows a
small ``eigvalsh`` down by far more than the work it adds, so the load average at the start is
recorded with each table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import fimcore

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "spectrum.md"
SIZES = (32, 128, 512, 2048)


def repeats_for(size: int, base: int) -> int:
    """Fewer repetitions for the largest Grams (one float64 eigvalsh at B=2048 takes ~1 s)."""
    return max(3, base if size <= 128 else base // 2 if size <= 512 else base // 4)


KINDS = {"full": 2.0, "deficient": 0.5}  # columns of J per row


def make_gram(size: int, dtype: str, kind: str = "full", seed: int = 0) -> np.ndarray:
    """J Jᵀ of a Gaussian J of shape (B, KINDS[kind]·B), in ``dtype``."""
    cols = max(1, int(KINDS[kind] * size))
    J = np.random.default_rng(seed).standard_normal((size, cols)) / np.sqrt(cols)
    J = J.astype(dtype)
    return J @ J.T


def backends() -> dict[str, tuple[Callable[[np.ndarray], Any], Callable[[Any], Any]]]:
    """name -> (convert a NumPy Gram, raw float64 eigvalsh of it)."""
    out: dict[str, tuple[Callable[[np.ndarray], Any], Callable[[Any], Any]]] = {
        "numpy": (lambda g: g, lambda g: np.linalg.eigvalsh(g.astype(np.float64))),
    }
    try:
        import torch
    except ImportError:
        print("torch not installed: numpy only", file=sys.stderr)
    else:
        out["torch"] = (torch.from_numpy, lambda g: torch.linalg.eigvalsh(g.double()))
    return out


def time_call(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(sizes: tuple[int, ...], base_repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, (convert, raw) in backends().items():
        for dtype, kind in ((d, k) for k in KINDS for d in ("float32", "float64")):
            for size in sizes:
                gram = convert(make_gram(size, dtype, kind))
                old = fimcore.default_rtol(size, getattr(np, dtype))
                calls = {
                    "eigvalsh": lambda g=gram: raw(g),
                    "spectrum": lambda g=gram: fimcore.spectrum(g),
                    "cond": lambda g=gram: fimcore.truncated_condition_number(g),
                    "legacy": lambda g=gram, r=old: fimcore.truncated_condition_number(g, rtol=r),
                }
                for fn in calls.values():
                    fn()  # warm-up
                wall: dict[str, list[float]] = {key: [] for key in calls}
                cpu: dict[str, list[float]] = {key: [] for key in calls}
                n = repeats_for(size, base_repeats)
                for _ in range(n):
                    for key, fn in calls.items():
                        w, c = time_call(fn)
                        wall[key].append(w)
                        cpu[key].append(c)
                row = {"backend": name, "dtype": dtype, "kind": kind, "B": size, "repeats": n}
                row.update({key: statistics.median(v) for key, v in wall.items()})
                row.update({f"{key}_cpu": statistics.median(v) for key, v in cpu.items()})
                rows.append(row)
                print(f"  {name:6s} {dtype} {kind} B={size:5d}: "
                      + ", ".join(f"{k} {row[k] * 1e3:.3f} ms (CPU {row[k + '_cpu'] * 1e3:.3f})"
                                  for k in calls), file=sys.stderr)
    return rows


def stats_calls(gram: np.ndarray) -> dict[str, Callable[[], Any]]:
    """name -> call of one fimcore.stats function (and tracker updates) on ``gram``."""
    from fimcore import stats as S

    P = 10 * gram.shape[0] ** 2
    every = fimcore.MeasureTracker(statistics=(*S.DEFAULT, *S.statistics_from_names("all")))
    default = fimcore.MeasureTracker()
    return {
        "eigvalsh (float64)": lambda: np.linalg.eigvalsh(gram),
        "noise_scale": lambda: S.noise_scale(gram),
        "norm_test": lambda: S.norm_test(gram),
        "inner_product_test": lambda: S.inner_product_test(gram),
        "orthogonality_test": lambda: S.orthogonality_test(gram),
        "effective_rank": lambda: S.effective_rank(gram),
        "stable_rank": lambda: S.stable_rank(gram),
        "fisher_spectrum_stats": lambda: S.fisher_spectrum_stats(gram, P),
        "tracker.update, default statistics": lambda: default.update(gram, lr=0.1),
        "tracker.update, every statistic": lambda: every.update(gram, lr=0.1, num_params=P),
    }


def measure_stats(size: int, repeats: int) -> list[tuple[str, float, float]]:
    """(name, median CPU s, median wall s) per call, interleaved, after one warm-up."""
    calls = stats_calls(make_gram(size, "float64"))
    for fn in calls.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            w, c = time_call(fn)
            wall[key].append(w)
            cpu[key].append(c)
    return [(k, statistics.median(cpu[k]), statistics.median(wall[k])) for k in calls]


def _provenance(load: tuple[float, float, float], command: list[str]) -> list[str]:
    """The machine, versions, threads, date and the command (with its niceness) of a table."""
    nice = os.nice(0) if hasattr(os, "nice") else 0
    prefix = [f"nice -n {nice}"] if nice else []
    return [
        f"- Machine: {cpu_model()}, {os.cpu_count()} logical cores (shared; load average at "
        f"start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f})",
        f"- Versions: {versions()}",
        f"- Threads: {threads()}",
        f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{' '.join([*prefix, 'python -m benchmarks.bench_spectrum', *command])}`",
    ]


def render_stats(rows, size: int, repeats: int, load, command) -> str:
    base = rows[0][1]
    lines = [
        f"# Cost of the fimcore.stats functions on a B = {size} Gram",
        "",
        "Median CPU (wall) time per call in ms, after one warm-up, calls interleaved per "
        f"repetition ({repeats} repetitions); NumPy float64 Gram J Jᵀ of a Gaussian J (B, 2B). "
        "`ratio` is CPU time over the float64 `eigvalsh` of the same Gram (each function validates "
        "the Gram and takes its own eigen-solve where it needs one).",
        "",
        *_provenance(load, command),
        "",
        "| call | CPU (wall) ms | ratio to eigvalsh |",
        "|---|---:|---:|",
    ]
    for name, c, w in rows:
        lines.append(f"| {name} | {c * 1e3:.3f} ({w * 1e3:.3f}) | {c / base if base > 0 else float('nan'):.2f} |")
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> str:
    names = ["numpy", "torch", "array-api-compat"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join([f"Python {platform.python_version()}", *found, f"fimcore {fimcore.__version__}"])


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads(count: int, argv: list[str]) -> None:
    """Re-execute with the thread pools sized to ``count`` unless already done."""
    if all(os.environ.get(var) == str(count) for var in THREAD_VARS):
        return
    env = dict(os.environ, **{var: str(count) for var in THREAD_VARS})
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_spectrum", *argv], env)


def threads() -> str:
    parts = []
    if "torch" in sys.modules:
        parts.append(f"torch threads {sys.modules['torch'].get_num_threads()}")
    for var in THREAD_VARS:
        if var in os.environ:
            parts.append(f"{var}={os.environ[var]}")
    return ", ".join(parts) or "library defaults"


def render(rows: list[dict[str, Any]], load: tuple[float, float, float], command: list[str]) -> str:
    def ms(value: float) -> str:
        v = value * 1e3
        return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"

    lines = [
        "# Cost of `spectrum` and `truncated_condition_number`",
        "",
        "Median time in ms per call (after one warm-up; the three calls interleaved per",
        "repetition): CPU time of the process and, in brackets, wall time. With one thread",
        "the CPU time is what the call costs; the wall time adds waiting for the shared CPU.",
        "`eigvalsh` is the library's own solver on the Gram cast to float64 (the",
        "floor); `spectrum` adds fimcore's validation (finite, symmetric, diagonal), the",
        "float64 cast, symmetrisation, sort and clamp; `cond` is `truncated_condition_number`",
        "with its default rule (rank on the diagonally scaled Gram C: a Cholesky test of full",
        "rank when λ_min(G) allows it, else the eigenvalues of C with the Weyl-separation",
        "shortcut, the projection onto the resolved subspace only when neither decides);",
        "`legacy` is the same call with the previous default tolerance `rtol = B·eps` relative",
        "to λ_max. Gram `full`: J Jᵀ of a Gaussian J of shape (B, 2B); `deficient`: (B, B/2),",
        "rank B/2 (the eigenvalues of C; the rank gap is far wider than the separation needs).",
        "Stored in the dtype shown; eigenvalues always in float64.",
        "",
        *_provenance(load, command),
        "",
        "| backend | Gram dtype | Gram | B | eigvalsh CPU (wall) ms | spectrum CPU (wall) ms "
        "| cond CPU (wall) ms | legacy CPU (wall) ms | cond / legacy (CPU) | repeats |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{ms(r[k + '_cpu'])} ({ms(r[k])})"
                 for k in ("eigvalsh", "spectrum", "cond", "legacy")]
        ratio = r["cond_cpu"] / r["legacy_cpu"] if r["legacy_cpu"] > 0 else float("nan")
        lines.append(
            f"| {r['backend']} | {r['dtype']} | {r['kind']} | {r['B']} | {' | '.join(cells)} "
            f"| {ratio:.2f} | {r['repeats']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=21, help="repetitions at B <= 128")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS,
                        help="Markdown file to write ('-' to only print)")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    parser.add_argument("--stats", action="store_true",
                        help="time the fimcore.stats functions on one Gram instead (spectrum_stats.md)")
    parser.add_argument("--stats-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None,
                        help="pin BLAS/OpenMP pools and torch to this many threads")
    raw_argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw_argv)
    if args.threads is not None:
        pin_threads(args.threads, raw_argv)
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    load = os.getloadavg()
    command = [a for a in raw_argv]
    if args.stats:
        out = args.out if args.out != RESULTS else RESULTS.with_name("spectrum_stats.md")
        table = render_stats(measure_stats(args.stats_size, args.repeats), args.stats_size,
                             args.repeats, load, command)
        print(table)
        if str(out) != "-":
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(table)
            print(f"written to {out}", file=sys.stderr)
        return
    table = render(measure(tuple(args.sizes), args.repeats), load, command)
    print(table)
    if str(args.out) != "-":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.append and args.out.exists():
            table = args.out.read_text() + "\n" + table.replace("# Cost of", "## Cost of", 1)
        args.out.write_text(table)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
