"""Time a training step with the PyTorch adapter's Gram against the plain step, layer by layer.

For each model and batch size: the median over interleaved repetitions of (step with
``GramRecorder`` + ``gram()``) / (plain step), and a per-layer table of the time the recorder spends
in each layer's rule during the backward (per-sample terms, Gram update, and the batch weight
gradient, which for Linear/Conv replaces autograd's own), with the path each layer took. Prints
the tables and writes them to ``--out`` (Markdown). On a shared machine wall-clock ratios at 2
threads swing by ±0.3; ``--threads 1 --cpu-time`` gives steadier ratios.

Run (about 3 minutes for the defaults on 2 cores)::

    .venv/bin/python -m benchmarks.profile_torch_layers --models resnet20-bn resnet20-gn mlp cnn \
        --batch 128 32 --reps 7 [--threads 1 --cpu-time] [--out profile.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from fimcore_adapters.torch import GramRecorder


def build(name: str) -> tuple[nn.Module, tuple]:
    """Model and per-sample input shape."""
    if name in ("resnet20-bn", "resnet20-gn"):
        from reference_training.models import resnet20
        return resnet20(norm="batch" if name.endswith("bn") else "group"), (3, 32, 32)
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                             nn.Linear(256, 10)), (784,)
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 10)), (3, 32, 32)
    raise ValueError(f"unknown model {name!r}")


def _wrap_units(rec: GramRecorder, totals: dict, clock=time.perf_counter) -> None:
    """Accumulate wall time of every unit's backward rule into ``totals[name]``."""
    for u in rec._units:
        for attr in ("backward", "_grad", "_factored_hook"):
            fn = getattr(u, attr, None)
            if fn is None:
                continue

            def timed(*a, _fn=fn, _name=u.name, **k):
                t = clock()
                try:
                    return _fn(*a, **k)
                finally:
                    totals[_name] += clock() - t

            setattr(u, attr, timed)


def run(name: str, batch: int, reps: int, strategy: str = "auto", clock=time.perf_counter) -> dict:
    torch.manual_seed(0)
    model, shape = build(name)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    rec = GramRecorder(model, strategy=strategy)
    totals: dict = defaultdict(float)

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def measured():
        model.zero_grad(set_to_none=True)
        with rec:
            F.cross_entropy(model(x), y).backward()
        rec.gram()

    for _ in range(2):
        plain()
        measured()
    _wrap_units(rec, totals, clock)
    t_plain, t_meas = [], []
    for _ in range(reps):
        t = clock(); plain(); t_plain.append(clock() - t)
        t = clock(); measured(); t_meas.append(clock() - t)
    ratios = [m / p for m, p in zip(t_meas, t_plain)]
    report = {r.name: r for r in rec.report()}
    layers = sorted(((v / reps, k) for k, v in totals.items()), reverse=True)
    return {"model": name, "B": batch, "plain_ms": 1e3 * statistics.median(t_plain),
            "gram_ms": 1e3 * statistics.median(t_meas),
            "ratio_of_medians": statistics.median(t_meas) / statistics.median(t_plain),
            "median_ratio": statistics.median(ratios), "layers": layers, "report": report}


def table(results: list[dict], top: int) -> str:
    lines = ["| model | B | plain step (ms) | with Gram (ms) | median ratio |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['B']} | {r['plain_ms']:.1f} | {r['gram_ms']:.1f} | "
                     f"{r['median_ratio']:.2f}× |")
    for r in results:
        lines += ["", f"### {r['model']}, B = {r['B']}: recorder time per layer (top {top})", "",
                  "| layer | module | path | ms per step | share of plain step |", "|---|---|---|---|---|"]
        for t, name in r["layers"][:top]:
            rec = r["report"].get(name)
            lines.append(f"| {name} | {rec.module if rec else ''} | {rec.path if rec else ''} | "
                         f"{1e3 * t:.2f} | {100 * 1e3 * t / r['plain_ms']:.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20-bn", "resnet20-gn", "mlp", "cnn"])
    ap.add_argument("--batch", nargs="+", type=int, default=[128, 32])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the tables to this Markdown file")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process CPU clock (steadier on a shared machine; use --threads 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for b in args.batch:
        for m in args.models:
            r = run(m, b, args.reps, args.strategy,
                    clock=time.process_time if args.cpu_time else time.perf_counter)
            print(f"{m:12s} B={b:4d} plain {r['plain_ms']:7.1f} ms  with Gram {r['gram_ms']:7.1f} ms  "
                  f"median ratio {r['median_ratio']:.2f}", flush=True)
            results.append(r)
    text = table(results, args.top)
    print(text)
    if args.out:
        from . import _harness as H

        H.write_report(args.out, "\n".join([
            f"# GramRecorder per-layer profile (torch {torch.__version__}, {args.threads} threads, "
            f"median of {args.reps} interleaved repetitions)", "", f"Command: `{H.command_line()}`", "",
            "Per layer: wall time of the recorder's work in that layer's backward (per-sample terms, "
            "Gram update, and for Linear/Conv the batch weight gradient that replaces autograd's).",
            "", text, "", "## Machine", "", H.key_value_table(H.machine_info())]))


if __name__ == "__main__":
    main()
