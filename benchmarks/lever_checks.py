"""Isolated A/B checks of the performance levers of the torch adapter and the core.

Each check times the old and the new form of one piece of work interleaved in one process
(medians of paired ratios new / old), so it is steadier than a whole training step on a shared
machine; ``--threads 1`` with CPU time is steadier still::

    python -m benchmarks.lever_checks conv --batch 128 --threads 2
    python -m benchmarks.lever_checks outer --batch 128 --threads 1
    python -m benchmarks.lever_checks spectrum

* ``conv``: per-sample convolution weight gradients plus their ``J Jᵀ`` on ResNet-20 / small-CNN
  layer shapes, for each per-sample method: all at once into a fresh tensor with one full product
  (old) against sample chunks (:data:`convps.SAMPLE_CHUNK_BYTES`), the recorder's workspace and
  the block-triangle product (new), and each of those alone;
* ``outer``: ``acc += J Jᵀ`` as one product against :func:`outer.add_outer` with 2 and 4 blocks;
* ``spectrum``: ``fimcore.spectrum`` of a float32 Gram, validated (a bare tensor) against the lean
  path (a checked ``GramResult``), and the bare float64 ``eigvalsh``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fimcore
from fimcore_adapters._torch import convps, outer

SHAPES = {"rn20 stage 1 (16→16, 32×32)": (16, 16, 32), "rn20 stage 2 (32→32, 16×16)": (32, 32, 16),
          "rn20 stage 3 (64→64, 8×8)": (64, 64, 8), "cnn conv2 (16→32, 16×16)": (16, 32, 16)}


def _paired(fns: dict, reps: int, clock) -> dict:
    """Median time of each callable and median ratio to the first, interleaved."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t0 = clock()
            f()
            times[k].append(clock() - t0)
    first = next(iter(times.values()))
    return {k: (statistics.median(v), statistics.median(a / b for a, b in zip(v, first)))
            for k, v in times.items()}


def check_conv(batch: int, reps: int, clock) -> list[str]:
    ws = convps.Workspace()
    lines = []
    for label, (cin, cout, hw) in SHAPES.items():
        spec = convps.ConvSpec(2, (3, 3), [1, 1], [1, 1], 1, cin, cout)
        x, go = torch.randn(batch, cin, hw, hw), torch.randn(batch, cout, hw, hw)

        def run(method, chunked, shared, split):
            outer.BLOCKS = 2 if split else 1
            chunk = convps.sample_chunk(spec, batch, hw * hw, 4) if chunked else batch
            shape = convps.per_sample_shape(method, batch, spec, 0, cout)
            J = ws.take(shape, x.dtype, x.device) if shared else x.new_empty(shape)
            convps.per_sample_into(J, method, x, go, spec, [1, 1], 0, cout, chunk)
            outer.add_outer(torch.zeros(batch, batch), J.reshape(batch, -1))

        blocks = outer.BLOCKS
        try:
            for method in convps.candidates(spec):
                r = _paired({"old": lambda: run(method, False, False, False),
                             "chunks": lambda: run(method, True, False, False),
                             "workspace": lambda: run(method, False, True, False),
                             "triangle": lambda: run(method, False, False, True),
                             "all three": lambda: run(method, True, True, True)}, reps, clock)
                lines.append(f"| {label} | {method} | {r['old'][0] * 1e3:.1f} | " +
                             " | ".join(f"{r[k][1]:.2f}" for k in ("chunks", "workspace", "triangle", "all three"))
                             + " |")
        finally:
            outer.BLOCKS = blocks
    head = ["| layer | method | old (ms) | chunks | workspace | triangle | all three (new) |",
            "|---|---|---|---|---|---|---|"]
    return head + lines


def check_outer(batch: int, reps: int, clock) -> list[str]:
    lines = ["| B | p | one product (ms) | 2 blocks | 4 blocks |", "|---|---|---|---|---|"]
    blocks = outer.BLOCKS
    try:
        for p in (2304, 9216, 36864):
            J, acc = torch.randn(batch, p), torch.zeros(batch, batch)

            def split(n):
                outer.BLOCKS = n
                outer.add_outer(acc, J)

            r = _paired({"full": lambda: acc.addmm_(J, J.T), "2": lambda: split(2), "4": lambda: split(4)},
                        reps, clock)
            lines.append(f"| {batch} | {p} | {r['full'][0] * 1e3:.2f} | {r['2'][1]:.2f} | {r['4'][1]:.2f} |")
    finally:
        outer.BLOCKS = blocks
    return lines


def check_spectrum(reps: int, clock) -> list[str]:
    lines = ["| B | validated (ms) | lean path | bare float64 eigvalsh |", "|---|---|---|---|"]
    for B in (32, 128):
        J = torch.randn(B, 4 * B)
        G = J @ J.T
        R = fimcore.GramResult(gram=G, grad_dtype=G.dtype, batch_size=B, checked=True)
        r = _paired({"full": lambda: fimcore.spectrum(G), "lean": lambda: fimcore.spectrum(R),
                     "bare": lambda: torch.linalg.eigvalsh(G.double())}, reps * 20, clock)
        lines.append(f"| {B} | {r['full'][0] * 1e3:.3f} | {r['lean'][1]:.2f} | {r['bare'][1]:.2f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lever_checks", description=__doc__.splitlines()[0])
    p.add_argument("check", choices=("conv", "outer", "spectrum"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.threads == 1 else time.perf_counter
    torch.manual_seed(0)
    lines = {"conv": lambda: check_conv(a.batch, a.reps, clock), "outer": lambda: check_outer(a.batch, a.reps, clock),
             "spectrum": lambda: check_spectrum(a.reps, clock)}[a.check]()
    print(f"{a.check}: torch threads {torch.get_num_threads()}, "
          f"{'CPU' if clock is time.process_time else 'wall'} time, medians of {a.reps} paired ratios new/old")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
