"""Assemble ``benchmarks/RESULTS.md`` from the per-benchmark tables in ``benchmarks/results/``.

Each benchmark script writes its own table (with the machine, versions and the command that made
it) to ``benchmarks/results/<name>.md``; this script puts them together in one file, in a fixed
order, so the repository has a single page of results.

Run from the repository root::

    python -m benchmarks.collect_results
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("torch", "before_after", "torch_sampled", "torch_large", "torch_large_densenet_b128", "jax", "jax_sampled", "tensorflow",
         "tensorflow_sampled", "spectrum")
HEADER = """# Benchmark results

Every table below was produced by the command printed with it, on the machine it names.
Ratios are a training step that also yields the per-sample Gram G = J Jᵀ (and its eigenvalues,
except in the rows marked "G without its eigenvalues") divided by the plain training step of the same
framework, measured interleaved in one process. `torch_large_densenet_b128` re-measures the DenseNet-110
B = 128 rows that `torch_large` reports as skipped (its first step, before a cheaper conv-method probe,
exceeded the cap).
Speed and memory are measured here and never asserted in tests.

"""


def collect(results_dir: Path = HERE / "results") -> str:
    """Return the combined Markdown of every ``*.md`` table in ``results_dir``.

    Tables named in ``ORDER`` come first, in that order; any others follow alphabetically.
    Each table's own headings are demoted by one level under a section per file.
    """
    files = sorted(results_dir.glob("*.md"))
    if not files:
        raise FileNotFoundError(
            f"no result tables in {results_dir}: run a benchmark first, "
            "e.g. python -m benchmarks.bench_spectrum"
        )
    rank = {name: i for i, name in enumerate(ORDER)}
    files.sort(key=lambda p: (rank.get(p.stem, len(ORDER)), p.stem))
    parts = [HEADER, "Contents: " + ", ".join(f"[{p.stem}](results/{p.name})" for p in files) + "\n"]
    for path in files:
        text = path.read_text(encoding="utf-8").strip()
        demoted = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
        parts.append(f"\n---\n\n{demoted}\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    args.output.write_text(collect(), encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
