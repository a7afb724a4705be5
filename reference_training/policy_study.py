"""The batch-size policy study: closed-loop rules against fixed and staged schedules on MNIST-5k.

One command, resumable (finished runs are skipped, partial ones resume from their checkpoint)::

    python -m reference_training.policy_study --out runs/policy

It trains the reduced reproduction's setting (ResNet-20 with 8-16-32 channels, 2,000 MNIST-5k
training digits, 5 epochs, SGD Nesterov at LR 0.1 with the LR steps of the reproduction) with
every step measured, over seeds 0, 1 and 2, under six batch schedules: fixed s16, fixed s64, the
paper's staged s16-to-64 (five equal stages) and each ``fimcore.policy`` rule started at 16 and
capped at 64 (``auto:noise_scale``, ``auto:norm_test``, ``auto:plane``, default rule options).
Every run gets the same epoch budget, so a schedule that grows the batch makes fewer updates.
The report (``OUT/report``) has the table (test error mean ± std, wall time, updates, final batch
size, Welch p-values against fixed s16), the batch-size trajectories and the (C̄_K, L_K) plane.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from .grid import plan_grid, run_grid
from .report import Run, _mean_std, _plane_figure, _welch, load_runs

__all__ = ["SCHEDULES", "plan", "write_report", "main"]

#: the six schedules (grid spellings)
SCHEDULES = ("s16", "s64", "s16-to-64", "auto:noise_scale@16", "auto:norm_test@16", "auto:plane@16")
BASELINE = "s16"


def plan(out, *, seeds=(0, 1, 2), epochs: int = 5, subset: int | None = 2000, width: int | None = 8,
         lr: float = 0.1, measure_every: int = 1, data_dir: str | None = None,
         dataset: str = "mnist5k", stages: int = 5):
    """The study's runs (a list of ``GridRun``); nothing is executed."""
    return plan_grid(out, models=("resnet20",), dataset=dataset, batch_sizes=(16, 64), lrs=(lr,),
                     dynamic=SCHEDULES[2:], dynamic_lrs=(lr,), seeds=seeds, epochs=epochs,
                     subset=subset, width=width, measure_every=measure_every, data_dir=data_dir,
                     policy_options="max=64", stages=stages)


def _rows(runs: list[Run]) -> list[dict]:
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.label, []).append(r)
    base = [r for r in by.get(BASELINE, []) if r.ok]
    rows = []
    for label in sorted(by, key=lambda k: (not k.startswith("s16") or "auto" in k, "auto" in k, k)):
        ok = [r for r in by[label] if r.ok]
        if not ok:
            rows.append(dict(label=label, n=0, diverged=len(by[label])))
            continue
        err = [r.summary["test_error"] * 100 for r in ok]
        wall = [r.summary["wall_time_s"] for r in ok]
        rows.append(dict(
            label=label, n=len(ok), diverged=len(by[label]) - len(ok),
            error=_mean_std(err), wall=_mean_std(wall),
            updates=_mean_std([float(r.summary["iterations"]) for r in ok]),
            final_batch=_mean_std([float(r.summary["batch_sizes"][-1]) for r in ok]),
            changes=_mean_std([float(len(r.summary.get("decisions", []))) for r in ok]),
            C_bar=_mean_std([r.summary["C_bar"] for r in ok]), L=_mean_std([r.summary["L"] for r in ok]),
            p_error=None if label == BASELINE else _welch([r.summary["test_error"] for r in ok],
                                                          [r.summary["test_error"] for r in base]),
            p_wall=None if label == BASELINE else _welch(wall, [r.summary["wall_time_s"] for r in base]),
        ))
    return rows


def _pm(v, digits=2):
    m, s = v
    return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{m:.{digits}f}"


def _p(p):
    return "–" if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.2g}"


def _without_short_last_batches(measures: list[dict]) -> list[dict]:
    """The measures without each epoch's final, shorter remainder batch (N mod B samples).

    The batch size a schedule or policy *chose* is what the figure shows; the remainder batch
    is smaller by the data's size, not by a decision.
    """
    kept = []
    for i, m in enumerate(measures):
        last_of_epoch = i + 1 == len(measures) or measures[i + 1]["epoch"] != m["epoch"]
        if last_of_epoch and i > 0 and measures[i - 1]["epoch"] == m["epoch"] \
                and m["batch_size"] < measures[i - 1]["batch_size"]:
            continue
        kept.append(m)
    return kept


def _batch_figure(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r.label for r in runs})
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        for j, r in enumerate(x for x in runs if x.label == label and x.measures):
            kept = _without_short_last_batches(r.measures)
            it = np.array([m["iteration"] for m in kept])
            b = np.array([m["batch_size"] for m in kept])
            ax.step(it, b, where="post", color=colours[i % len(colours)], alpha=0.8,
                    label=label if j == 0 else None, lw=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("batch size")
    ax.set_yscale("log", base=2)
    ax.set_title("Batch size over training (every seed; short last batch of each epoch not drawn)",
                 fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs_dir: str | Path, out: str | Path | None = None) -> Path:
    """``report.md``, ``runs.json``, ``batch_sizes.png`` and ``plane.png`` for the study's runs."""
    runs = load_runs(runs_dir)
    if not runs:
        raise FileNotFoundError(f"no finished runs below {runs_dir}; run the study first")
    out = Path(out) if out is not None else Path(runs_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(runs)
    s0 = runs[0].summary
    lines = [f"# Batch-size policies: {s0['model']} on MNIST-5k, {s0['epochs_planned']} epochs", "",
             f"Welch t-tests (two-sided, `scipy.stats.ttest_ind(equal_var=False)`) against fixed "
             f"{BASELINE}; wall time is the run's whole time on a shared 2-core CPU.", "",
             "| schedule | seeds | test error (%) | wall time (s) | updates | final batch | size "
             "changes | C̄_K | L_K | p (error vs s16) | p (time vs s16) | diverged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["n"]:
            lines.append(f"| {r['label']} | 0 | – | – | – | – | – | – | – | – | – | {r['diverged']} |")
            continue
        lines.append(f"| {r['label']} | {r['n']} | {_pm(r['error'])} | {_pm(r['wall'], 1)} | "
                     f"{r['updates'][0]:.0f} | {r['final_batch'][0]:.0f} | {r['changes'][0]:.1f} | "
                     f"{r['C_bar'][0]:.4g} | {r['L'][0]:.4g} | {_p(r['p_error'])} | {_p(r['p_wall'])} | "
                     f"{r['diverged']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "runs.json").write_text(json.dumps(
        [{k: v for k, v in r.items()} for r in rows], indent=1, default=float) + "\n")
    _batch_figure(runs, out / "batch_sizes.png")
    _plane_figure(runs, out / "plane.png", "Batch-size policies on the (C̄_K, L_K) plane", "normalised")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reference_training.policy_study", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/policy")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--subset", type=int, default=2000)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if not args.report_only:
        runs = plan(args.out, seeds=tuple(int(s) for s in args.seeds.split(",")), epochs=args.epochs,
                    subset=args.subset, width=args.width, lr=args.lr, data_dir=args.data_dir)
        counts = run_grid(runs, jobs=args.jobs, threads=args.threads, root=Path(args.out))
        print(json.dumps(counts))
        if counts.get("failed"):
            return 1
    print(f"report written to {write_report(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
