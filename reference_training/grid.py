"""The beacon grid (batch sizes × base LRs) and the dynamic-sampling runs, over seeds.

Every run lives in ``OUT/<model>-<dataset>/<label>_lr<lr>_seed<seed>/`` and is executed as its own
``python -m reference_training run ... --resume`` subprocess, so a grid can be interrupted and
started again with the same command: finished runs (``summary.json`` present) are skipped,
partial ones resume from their last checkpoint, and a diverged run is recorded as such in its
summary instead of stopping the grid. ``--jobs`` runs several subprocesses side by side (use
``--threads`` so that jobs × threads does not exceed the cores). ``--nproc N`` (N > 1) starts each
run as ``python -m torch.distributed.run --standalone --nproc_per_node N -m reference_training run
...``: a data-parallel run on one node (a free rendezvous port per run, so runs of a local pool do
not collide), measured with ``--gram-scope`` (global by default); jobs × N × threads processes and
threads then share the cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .schedules import run_label
from .train import SUMMARY_FILE

__all__ = ["GridRun", "PAPER_BATCH_SIZES", "PAPER_LRS", "plan_grid", "run_grid"]

PAPER_BATCH_SIZES = (8, 16, 32, 64, 128, 256)
PAPER_LRS = (0.025, 0.05, 0.1, 0.2, 0.4)
PAPER_DYNAMIC = ("s32-to-128", "s32-to-128-MS")


@dataclass
class GridRun:
    config: RunConfig
    out_dir: Path

    @property
    def finished(self) -> bool:
        p = self.out_dir / SUMMARY_FILE
        if not p.exists():
            return False
        try:
            return bool(json.loads(p.read_text()).get("finished"))
        except (OSError, ValueError):
            return False


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def plan_grid(
    out: str | os.PathLike,
    *,
    models=("liao-densenet",),
    dataset: str = "cifar10",
    batch_sizes=PAPER_BATCH_SIZES,
    lrs=PAPER_LRS,
    dynamic=PAPER_DYNAMIC,
    dynamic_lrs=(0.1,),
    seeds=(0,),
    **common,
) -> list[GridRun]:
    """List the runs of a grid (nothing is executed).

    Args:
        out: root folder of the grid.
        models: model names (``build_model``).
        dataset: dataset name.
        batch_sizes, lrs: the fixed-batch grid (every pair is one run per seed).
        dynamic: dynamic-sampling schedule names (``sA-to-B``, ``sA-to-B-MS``, or
            ``auto:<rule>@<first size>`` for a closed-loop policy; without ``@`` it starts at the
            smallest of ``batch_sizes``), each run at every LR of ``dynamic_lrs`` and every seed.
        seeds: repeats.
        **common: other ``RunConfig`` fields shared by all runs (epochs, subset, measure_every, ...);
            ``policy_options`` goes to the ``auto:<rule>`` runs only.
    """
    runs: list[GridRun] = []
    root = Path(out)
    for model in models:
        for seed in seeds:
            settings = [(dict(batch_size=int(b)), float(lr)) for lr in lrs for b in batch_sizes]
            settings += [(_dynamic(str(s), batch_sizes), float(lr)) for lr in dynamic_lrs
                         for s in dynamic]
            for batch, lr in settings:
                fields = dict(common)
                if not str(batch.get("batch_schedule", "")).lower().startswith("auto:"):
                    fields.pop("policy_options", None)   # they steer the auto:<rule> runs only
                cfg = RunConfig(model=model, dataset=dataset, lr=lr, seed=int(seed), **batch,
                                **fields)
                cfg.validate()
                name = f"{run_label(cfg)}_lr{_fmt_lr(lr)}_seed{seed}"
                runs.append(GridRun(cfg, root / f"{model}-{dataset}" / name))
    return runs


def _dynamic(spec: str, batch_sizes) -> dict:
    """RunConfig fields of one ``dynamic`` entry (``auto:<rule>@<size>`` carries its first size)."""
    if spec.lower().startswith("auto:"):
        schedule, _, first = spec.partition("@")
        return dict(batch_schedule=schedule,
                    batch_size=int(first) if first else int(min(batch_sizes)))
    return dict(batch_schedule=spec)


def _command(run: GridRun, threads: int | None, nproc: int = 1,
             gram_scope: str | None = None) -> list[str]:
    c = run.config
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, "-m", "reference_training", "run", "--resume", "--quiet",
           "--out", str(run.out_dir), "--model", c.model, "--dataset", c.dataset,
           "--epochs", str(c.epochs), "--lr", repr(c.lr), "--seed", str(c.seed),
           "--measure-every", str(c.measure_every), "--stages", str(c.stages),
           "--device", c.device, "--norm", c.norm, "--gram-strategy", c.gram_strategy,
           "--conv-method", c.conv_method]
    if c.batch_schedule:
        cmd += ["--batch-schedule", c.batch_schedule]
    if not c.batch_schedule or c.batch_schedule.lower().startswith("auto:"):
        cmd += ["--batch-size", str(c.batch_size)]
    for flag, value in (("--data-dir", c.data_dir), ("--subset", c.subset),
                        ("--policy-options", c.policy_options), ("--stats", c.stats),
                        ("--depth", c.depth), ("--width", c.width), ("--threads", threads)):
        if value is not None:
            cmd += [flag, str(value)]
    if nproc > 1 and gram_scope is not None:
        cmd += ["--gram-scope", gram_scope]
    return cmd


def run_grid(runs: list[GridRun], *, jobs: int = 1, threads: int | None = None,
             log=print, executor: str = "local", cluster: str = "slurm",
             slurm: dict | None = None, retry_failed: bool = False,
             wait: bool = False, root: Path | None = None, nproc: int = 1,
             gram_scope: str | None = None) -> dict[str, int]:
    """Execute the runs that are not finished; returns counts of what happened.

    ``executor="local"`` runs ``jobs`` subprocesses side by side here; ``executor="slurm"``
    submits the unfinished runs as one Slurm job array through submitit (``cluster="local"`` or
    ``"debug"`` run the same path without a cluster; see :mod:`reference_training.executors`).
    ``nproc`` > 1 launches every run under ``torch.distributed.run`` with that many processes
    (one node; on GPUs give a Slurm run as many, ``slurm={"gpus_per_node": nproc}``).
    """
    if not (isinstance(nproc, int) and nproc >= 1):
        raise ValueError(f"nproc must be an int >= 1 (processes per run); received {nproc!r}.")
    if gram_scope not in (None, "global", "local"):
        raise ValueError(f"gram_scope must be None, 'global' or 'local'; received {gram_scope!r}.")

    def command(r: GridRun) -> list[str]:
        return _command(r, threads, nproc, gram_scope)
    if executor == "slurm":
        from .executors import submit_slurm

        if root is None:
            root = runs[0].out_dir.parent.parent if runs else Path(".")
        return submit_slurm(runs, command, root, cluster=cluster,
                            options=slurm, retry_failed=retry_failed, wait=wait, log=log)
    if executor != "local":
        raise ValueError(f"executor must be 'local' or 'slurm'; received {executor!r}.")
    todo = [r for r in runs if not r.finished]
    counts = {"planned": len(runs), "skipped": len(runs) - len(todo), "done": 0, "failed": 0,
              "diverged": 0}
    log(f"grid: {len(runs)} runs, {counts['skipped']} already finished, {len(todo)} to do")

    def execute(run: GridRun) -> tuple[GridRun, int, float]:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(run.out_dir / "run.log", "a") as logf:
            rc = subprocess.call(command(run), stdout=logf, stderr=subprocess.STDOUT)
        return run, rc, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for run, rc, dt in pool.map(execute, todo):
            name = f"{run.out_dir.parent.name}/{run.out_dir.name}"
            if rc != 0 or not run.finished:
                counts["failed"] += 1
                log(f"  FAILED {name} (exit {rc}; see {run.out_dir / 'run.log'})")
                continue
            summary = json.loads((run.out_dir / SUMMARY_FILE).read_text())
            counts["done"] += 1
            if summary.get("diverged"):
                counts["diverged"] += 1
                log(f"  diverged {name} ({dt:.0f}s)")
            else:
                log(f"  done {name}: test_error={summary['test_error']:.4f} "
                    f"C_bar={summary['C_bar']:.4g} L={summary['L']:.4g} ({dt:.0f}s)")
    return counts
