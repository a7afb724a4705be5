"""Command line: ``python -m reference_training {run,grid,report,demo} ...``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _float_list(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _str_list(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _add_common(p: argparse.ArgumentParser, *, grid: bool) -> None:
    from .data import DATASET_NAMES

    if not grid:
        p.add_argument("--model", default="resnet20",
                       help="resnet20 | resnet32 | resnet56 | liao-resnet | liao-densenet")
    p.add_argument("--dataset", default="mnist5k" if not grid else "cifar10",
                   choices=DATASET_NAMES)
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--epochs", type=int, default=320 if grid else 10)
    p.add_argument("--measure-every", type=int, default=50,
                   help="measure iterations whose 0-based index in the epoch is a multiple of N")
    p.add_argument("--stages", type=int, default=5, help="stages of a dynamic batch schedule")
    p.add_argument("--subset", type=int, default=None,
                   help="use N training and at most N test samples (the same random choice for every seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, default=None, help="depth of liao-resnet/densenet (110)")
    p.add_argument("--width", type=int, default=None, help="first-stage channels (16)")
    p.add_argument("--norm", default="batch", choices=("batch", "group"))
    p.add_argument("--gram-strategy", default="auto", help="GramRecorder strategy")
    p.add_argument("--conv-method", default="grouped", choices=("grouped", "unfold", "auto"),
                   help="per-sample conv gradients; 'auto' times candidates per process, so a "
                        "resumed run may then differ in the last bits")
    p.add_argument("--stats", default=None,
                   help="extra statistics per measured step in metrics.jsonl: a comma list of "
                        "fimcore.stats names or record fields (noise_scale/B_simple, "
                        "batch_tests/norm_test/inner_product_test/orthogonality_test, "
                        "spectrum_shape/effective_rank/stable_rank, fisher_spectrum/m_lambda/"
                        "s_lambda/lambda_max_F/outliers, per_layer), or 'all'")
    p.add_argument("--policy-options", default=None,
                   help="for --batch-schedule auto:<rule>: key=value,... (min, max, multiple_of, "
                        "patience, max_growth, allow_shrink, lr_coupling, and the rule's options)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reference_training",
        description="Liao et al. (TPAMI 2020) reproduction: training measured by C̄_K and L_K.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train one model and record C̄_K, L_K and errors")
    _add_common(run, grid=False)
    run.add_argument("--lr", type=float, default=0.1, help="base learning rate")
    run.add_argument("--batch-size", type=int, default=None,
                     help="fixed batch size (128), or the first size of --batch-schedule auto:<rule>")
    run.add_argument("--batch-schedule", default=None,
                     help="dynamic sampling: sA-to-B, sA-to-B-MS, a list 16,32,64,128,256, or "
                          "auto:<rule> (noise_scale, norm_test, plane) set by the measures")
    run.add_argument("--tensorboard", default=None, metavar="DIR",
                     help="also write TensorBoard scalars to DIR (needs the tensorboard extra)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint")
    run.add_argument("--gram-scope", default=None, choices=("global", "local"),
                     help="under torchrun: measure the Gram of the global batch (global, the "
                          "default) or each rank's own Gram, averaging the measures (local)")

    grid = sub.add_parser("grid", help="the batch-size × LR grid plus dynamic-sampling runs")
    _add_common(grid, grid=True)
    grid.add_argument("--models", type=_str_list, default=["liao-densenet"])
    grid.add_argument("--batch-sizes", type=_int_list, default=[8, 16, 32, 64, 128, 256])
    grid.add_argument("--lrs", type=_float_list, default=[0.025, 0.05, 0.1, 0.2, 0.4])
    grid.add_argument("--dynamic", type=_str_list, default=["s32-to-128", "s32-to-128-MS"],
                      help="dynamic-sampling schedules ('' for none)")
    grid.add_argument("--dynamic-lrs", type=_float_list, default=[0.1])
    grid.add_argument("--seeds", type=_int_list, default=[0])
    grid.add_argument("--jobs", type=int, default=1, help="runs side by side (--executor local)")
    grid.add_argument("--nproc", type=int, default=1,
                      help="processes per run: N > 1 launches each run under torchrun "
                           "(torch.distributed.run --standalone --nproc_per_node N)")
    grid.add_argument("--gram-scope", default=None, choices=("global", "local"),
                      help="with --nproc > 1: the Gram each run measures (default global)")
    grid.add_argument("--executor", default="local", choices=("local", "slurm"),
                      help="local: a process pool here; slurm: a Slurm job array via submitit")
    grid.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"),
                      help="submitit backend of --executor slurm (local/debug: no cluster needed)")
    grid.add_argument("--retry-failed", action="store_true",
                      help="resubmit runs whose earlier Slurm job failed")
    grid.add_argument("--wait", action="store_true", help="with --executor slurm: wait for the jobs")
    grid.add_argument("--slurm-partition", default=None)
    grid.add_argument("--slurm-time", type=int, default=24 * 60, help="minutes per run")
    grid.add_argument("--slurm-cpus", type=int, default=None, help="CPUs per run")
    grid.add_argument("--slurm-gpus", type=int, default=None, help="GPUs per run")
    grid.add_argument("--slurm-mem", type=int, default=None, help="GB of memory per run")
    grid.add_argument("--slurm-parallelism", type=int, default=None,
                      help="array tasks running at once")
    grid.add_argument("--out", default="runs/grid")
    grid.add_argument("--dry-run", action="store_true", help="list the runs only")

    rep = sub.add_parser("report", help="figures and tables from a folder of runs")
    rep.add_argument("runs_dir")
    rep.add_argument("--out", default=None, help="output folder (default RUNS_DIR/report)")
    rep.add_argument("--title", default=None)

    demo = sub.add_parser("demo", help="MNIST-5k: fixed batch 64 vs s16-to-64, 10 epochs")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--epochs", type=int, default=10)
    demo.add_argument("--lr", type=float, default=0.05)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--measure-every", type=int, default=1)
    demo.add_argument("--subset", type=int, default=None)
    demo.add_argument("--width", type=int, default=None)
    demo.add_argument("--threads", type=int, default=None)
    demo.add_argument("--quiet", action="store_true")
    return parser


def _config_from_args(args) -> "RunConfig":
    from .config import RunConfig

    batch_size = args.batch_size
    auto = (args.batch_schedule or "").lower().startswith("auto:")
    if args.batch_schedule is not None and batch_size is not None and not auto:
        raise ValueError("give either --batch-size or --batch-schedule (a --batch-size with "
                         "--batch-schedule is the first size of auto:<rule> only).")
    if (args.batch_schedule is None or auto) and batch_size is None:
        batch_size = 128
    return RunConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
        lr=args.lr, batch_size=batch_size, batch_schedule=args.batch_schedule,
        stages=args.stages, measure_every=args.measure_every, seed=args.seed,
        subset=args.subset, device=args.device, depth=args.depth, width=args.width,
        norm=args.norm, gram_strategy=args.gram_strategy, conv_method=args.conv_method,
        policy_options=args.policy_options, stats=args.stats,
    )


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)


def _rank() -> int:
    """This process's rank: of the process group a caller initialised, else torchrun's RANK."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK") or 0)


def _cmd_run(args) -> int:
    from .train import run_label, train

    _set_threads(args.threads)
    config = _config_from_args(args)
    config.validate()
    out = args.out or f"runs/{config.model}-{config.dataset}-{run_label(config)}-lr{config.lr:g}-seed{config.seed}"
    summary = train(config, out, resume=args.resume, quiet=args.quiet, tensorboard=args.tensorboard,
                    gram_scope=args.gram_scope)
    if _rank() != 0:
        return 0                      # data-parallel: only rank 0 prints the summary line
    print(json.dumps({k: summary[k] for k in ("label", "diverged", "epochs", "test_error",
                                              "train_error", "C_bar", "C_bar_jacobian", "L",
                                              "wall_time_s")}))
    return 0


def _cmd_grid(args) -> int:
    from .grid import plan_grid, run_grid

    runs = plan_grid(
        args.out, models=args.models, dataset=args.dataset, batch_sizes=args.batch_sizes,
        lrs=args.lrs, dynamic=args.dynamic, dynamic_lrs=args.dynamic_lrs, seeds=args.seeds,
        data_dir=args.data_dir, epochs=args.epochs, measure_every=args.measure_every,
        stages=args.stages, subset=args.subset, device=args.device, depth=args.depth,
        width=args.width, norm=args.norm, gram_strategy=args.gram_strategy,
        conv_method=args.conv_method, policy_options=args.policy_options, stats=args.stats,
    )
    if args.dry_run:
        for r in runs:
            print(f"{'finished' if r.finished else 'todo    '} {r.out_dir}")
        return 0
    slurm = {k: v for k, v in {
        "timeout_min": args.slurm_time, "slurm_partition": args.slurm_partition,
        "cpus_per_task": args.slurm_cpus, "gpus_per_node": args.slurm_gpus,
        "mem_gb": args.slurm_mem, "slurm_array_parallelism": args.slurm_parallelism,
    }.items() if v is not None}
    if args.cluster != "slurm":   # submitit's local/debug executors take no Slurm parameters
        slurm = {"timeout_min": args.slurm_time}
    counts = run_grid(runs, jobs=args.jobs, threads=args.threads, executor=args.executor,
                      cluster=args.cluster, slurm=slurm, retry_failed=args.retry_failed,
                      wait=args.wait or args.cluster != "slurm", root=Path(args.out),
                      nproc=args.nproc, gram_scope=args.gram_scope)
    print(json.dumps(counts))
    return 1 if counts.get("failed") else 0


def _cmd_report(args) -> int:
    from .report import make_report

    out = make_report(args.runs_dir, args.out, title=args.title)
    print(f"report written to {out}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    _set_threads(args.threads)
    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    handlers = {"run": _cmd_run, "grid": _cmd_grid, "report": _cmd_report, "demo": _cmd_demo}
    try:
        return handlers[args.command](args)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
