"""One training run of the reproduction: SGD on a model, measured through the per-sample Gram.

Setup (as in the authors' released code): SGD with Nesterov momentum 0.9, weight decay 1e-4, base learning rate ×0.1 at
``fimcore.paper_lr_milestones(E)`` = (⌊0.5E⌋, ⌊0.75E⌋) (0-based epochs); a fresh random
permutation every epoch, sequential batches, last partial batch kept. The batch size follows a
``fimcore.StagedBatchSchedule`` (a fixed size is a one-stage schedule); a stage switch happens in
the same process with the same model and optimiser objects (momentum buffers kept).

Measures: at every iteration whose 0-based within-epoch index n satisfies
n % measure_every == 0, the forward/backward pass runs inside a
``fimcore_adapters.torch.GramRecorder`` and the B×B Gram G goes to a ``fimcore.MeasureTracker``
with weight w = the iterations it stands for (itself and the unmeasured ones that follow, up to
the next measurement or the end of the epoch), so

    c_k = λ_max(G_k) / λ_min⁺(G_k),   C̄_K = mean of measured c_k,
    (λ_min⁺: the smallest eigenvalue G_k resolves, see fimcore.rank; each record also carries
    c_limit, the largest c_k that Gram could resolve, and whether c_k came within a factor 2 of
    it, and c_k_legacy under the previous tolerance B·eps·λ_max)
    I_k = (α_k / B_k) · sqrt(Tr G_k), L_K = Σ_measured w_k · I_k.

Outputs in the run directory: ``config.json``, ``metrics.jsonl`` (one ``"measure"`` line per
measured iteration, one ``"epoch"`` line per epoch), ``checkpoint.pt`` (written atomically after
every epoch: model, optimiser, schedule, tracker, RNG states and the byte offset of
``metrics.jsonl``) and ``summary.json`` at the end. ``resume=True`` continues from the checkpoint,
first cutting ``metrics.jsonl`` back to the checkpoint's offset, so a run killed at any point
resumes to the same numbers as an uninterrupted run on CPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

import fimcore
from fimcore_adapters.torch import GramRecorder

from .config import RunConfig, statistic_names
from .data import ImageDataset, augment, load_dataset, normalise
from .models import build_model, count_parameters
from .schedules import lr_at, make_schedule, parse_batch_schedule, run_label

__all__ = ["RunConfig", "lr_at", "make_schedule", "parse_batch_schedule", "run_label", "train"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
EVAL_BATCH = 500


# --------------------------------------------------------------------------- helpers


def _json_value(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _dumps(d: dict[str, Any]) -> str:
    return json.dumps({k: _json_value(v) for k, v in d.items()}, allow_nan=False)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _grad_norm(model: torch.nn.Module) -> float:
    total = 0.0
    for p in model.parameters():
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return math.sqrt(total)


@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: ImageDataset, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and top-1 error on the test set (eval mode, BN running statistics)."""
    was_training = model.training
    model.eval()
    loss_sum, wrong, n = 0.0, 0, len(ds.test_y)
    for start in range(0, n, EVAL_BATCH):
        x = normalise(ds.test_x[start:start + EVAL_BATCH], ds.mean, ds.std).to(device)
        y = ds.test_y[start:start + EVAL_BATCH].to(device)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        wrong += int((out.argmax(1) != y).sum())
    model.train(was_training)
    return loss_sum / n, wrong / n


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, leave=False, disable=disable, dynamic_ncols=True)


def _rng_state(data_gen: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "data": data_gen.get_state(),
    }


def _set_rng_state(state: dict[str, Any], data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    data_gen.set_state(state["data"])


def _make_recorder(model: torch.nn.Module, config: RunConfig) -> GramRecorder:
    # per-layer statistics read each module's block of G: keep them only when asked for
    keep = "per_layer" in statistic_names(config.stats)
    return GramRecorder(model, loss_reduction="mean", strategy=config.gram_strategy,
                        conv_method=config.conv_method, keep_blocks=keep)


# --------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """What one run carries from epoch to epoch (and what its checkpoint holds)."""

    config: RunConfig
    out: Path
    log: Callable[[str], None]
    quiet: bool
    device: torch.device
    ds: ImageDataset
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    tracker: fimcore.MeasureTracker
    recorder: GramRecorder
    data_gen: torch.Generator
    start_epoch: int = 0
    iteration: int = 0
    elapsed: float = 0.0
    train_elapsed: float = 0.0
    epochs_log: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0
    diverged: bool = False
    board: Any = None
    num_params: int | None = None

    @property
    def paths(self) -> tuple[Path, Path, Path, Path]:
        o = self.out
        return o / CONFIG_FILE, o / METRICS_FILE, o / SUMMARY_FILE, o / CHECKPOINT_FILE


def _check_resume(config: RunConfig, out: Path, resume: bool) -> dict[str, Any] | None:
    """Refuse to overwrite a run; refuse a resume with other settings; a finished run's summary."""
    cfg_path, met_path, sum_path, ckpt_path = (out / CONFIG_FILE, out / METRICS_FILE,
                                               out / SUMMARY_FILE, out / CHECKPOINT_FILE)
    if not resume and any(p.exists() for p in (met_path, ckpt_path, sum_path)):
        raise FileExistsError(
            f"{str(out)!r} already holds a run; pass --resume to continue it or choose another --out."
        )
    if resume and cfg_path.exists():
        stored = RunConfig.from_dict(json.loads(cfg_path.read_text()))
        if stored.to_dict() != config.to_dict():
            diff = {k: (v, config.to_dict()[k]) for k, v in stored.to_dict().items()
                    if config.to_dict()[k] != v}
            raise ValueError(
                f"--resume needs the same settings as the stored run in {str(out)!r}; these differ "
                f"(stored, given): {diff}. Use another --out for a different run."
            )
    if resume and sum_path.exists():
        summary = json.loads(sum_path.read_text())
        if summary.get("finished"):
            return summary
    return None


def _build(config: RunConfig, out: Path, *, dataset: ImageDataset | None, log, quiet) -> _Run:
    """Data, seeds, model, optimiser, schedule, tracker and recorder of a fresh run."""
    device = torch.device(config.device)
    ds = dataset if dataset is not None else load_dataset(config.dataset, config.data_dir)
    if config.subset is not None:
        ds = ds.subset(config.subset, seed=0)  # the same samples for every seed

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2**32))
    random.seed(config.seed)
    data_gen = torch.Generator().manual_seed(config.seed + 1)

    model = build_model(config.model, in_channels=ds.channels, num_classes=ds.num_classes,
                        image_size=ds.image_size, depth=config.depth, norm=config.norm,
                        width=config.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=True, weight_decay=config.weight_decay)
    schedule = make_schedule(config.schedule_spec, epochs=config.epochs, stages=config.stages,
                             initial=config.batch_size, options=config.policy_options)
    extra = list(config.statistics())
    for stat in getattr(schedule, "statistics", tuple)():
        if stat.name not in {s.name for s in extra}:
            extra.append(stat)
    tracker = fimcore.MeasureTracker(statistics=(*fimcore.stats.DEFAULT, *extra),
                                     keep_history=False)
    return _Run(config=config, out=out, log=log, quiet=quiet, device=device, ds=ds, model=model,
                optimizer=optimizer, schedule=schedule, tracker=tracker,
                recorder=_make_recorder(model, config), data_gen=data_gen,
                num_params=count_parameters(model))


def _restore(run: _Run, ckpt_path: Path) -> None:
    """Continue from the last epoch checkpoint (model, optimiser, schedule, tracker, RNG)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # RNG states stay on CPU
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["schedule"])
    run.tracker.load_state_dict(ckpt["tracker"])
    _set_rng_state(ckpt["rng"], run.data_gen)
    run.start_epoch, run.iteration = ckpt["epoch"] + 1, ckpt["iteration"]
    run.elapsed, run.train_elapsed = ckpt["wall_time_s"], ckpt["train_time_s"]
    run.epochs_log, run.offset = ckpt["epochs_log"], ckpt["metrics_offset"]
    run.log(f"resuming {run.out} after epoch {run.start_epoch} (iteration {run.iteration})")


def _checkpoint(run: _Run, epoch: int, metrics_offset: int) -> None:
    _atomic_torch_save({
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(), "tracker": run.tracker.state_dict(),
        "rng": _rng_state(run.data_gen), "epoch": epoch, "iteration": run.iteration,
        "wall_time_s": run.elapsed, "train_time_s": run.train_elapsed,
        "epochs_log": run.epochs_log, "metrics_offset": metrics_offset,
    }, run.out / CHECKPOINT_FILE)


def _measure(run: _Run, metrics, *, epoch: int, n: int, n_iters: int, batch: int,
             lr: float) -> bool:
    """Feed the step's Gram to the tracker (and the policy) and write its metrics line.

    Returns False if the step diverged (non-finite Gram).
    """
    try:
        gram = run.recorder.gram()
    except FloatingPointError as exc:
        gram = torch.full((1, 1), math.nan)
        run.log(f"non-finite per-sample gradients: {exc}")
    if not bool(torch.isfinite(gram).all()):
        run.log(f"diverged at epoch {epoch}, iteration {run.iteration}: non-finite Gram")
        return False
    weight = min(run.config.measure_every, n_iters - n)
    blocks = run.recorder.blocks() if run.recorder.keep_blocks else None
    m = run.tracker.update(gram, lr=lr, weight=weight, batch_size=batch,
                           grad_dtype=run.recorder.grad_dtype, num_params=run.num_params,
                           blocks=blocks)
    line = {
        "type": "measure", "k": m.k, "iteration": run.iteration, "epoch": epoch,
        "lr": lr, "batch_size": batch, "weight": weight,
        "c_k": m.c_k, "c_k_jacobian": m.c_k_jacobian, "I_k": m.I_k,
        "trace": m.trace, "C_bar": m.C_bar, "C_bar_jacobian": m.C_bar_jacobian,
        "L": m.L, "grad_norm": _grad_norm(run.model), "lambda_max": m.lambda_max,
        "ones_gram_ones": float(gram.detach().double().sum()),
        "rank": m.rank, "zero_rows": m.zero_rows, "c_limit": m.c_limit,
        "resolution_limited": m.resolution_limited, "c_k_legacy": m.c_k_legacy,
    }
    for name, fields in m.values.items():
        if name not in ("condition", "energy"):
            line.update(fields)
    update = getattr(run.schedule, "update", None)
    if update is not None:
        decision = update(m)
        line["next_batch_size"] = run.schedule.batch_size(epoch)
        if decision is not None:
            line["decision"] = decision.reason
            run.log(f"batch size {decision.old} -> {decision.new}: {decision.reason}")
    metrics.write(_dumps(line) + "\n")
    metrics.flush()
    if run.board is not None:
        run.board.measure(line)
    return True


def _train_epoch(run: _Run, epoch: int, metrics) -> dict[str, Any] | None:
    """One epoch of training, measured as configured; its record, or None if it diverged.

    The epoch's permutation is cut into consecutive batches; the batch size is read from the
    schedule before every iteration (a policy may change it after a measured step).
    """
    config, ds, device = run.config, run.ds, run.device
    n_train = len(ds.train_y)
    lr = lr_at(epoch, base_lr=config.lr, epochs=config.epochs) * getattr(run.schedule, "lr_factor", 1.0)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    b0 = int(run.schedule.batch_size(epoch))
    perm = torch.randperm(n_train, generator=run.data_gen)
    t0 = time.perf_counter()
    loss_sum, wrong = 0.0, 0
    bar = _progress(math.ceil(n_train / b0), f"epoch {epoch + 1}/{config.epochs} b={b0}", run.quiet)
    start, n = 0, 0
    while start < n_train:
        b = int(run.schedule.batch_size(epoch))
        n_iters = n + math.ceil((n_train - start) / b)   # this epoch's iterations at this size
        idx = perm[start:start + b]
        x = normalise(ds.train_x[idx], ds.mean, ds.std)
        x = augment(x, flip=ds.flip, pad=ds.pad, generator=run.data_gen).to(device)
        y = ds.train_y[idx].to(device)
        measured = n % config.measure_every == 0
        with run.recorder(measure=measured):  # unmeasured: a plain step, no hooks
            out_logits = run.model(x)
            loss = F.cross_entropy(out_logits, y)
            loss.backward()
        loss_v = loss.detach().item()
        if not math.isfinite(loss_v):
            run.log(f"diverged at epoch {epoch}, iteration {run.iteration}: loss {loss_v}")
            run.diverged = True
        elif measured and not _measure(run, metrics, epoch=epoch, n=n, n_iters=n_iters,
                                       batch=len(idx), lr=lr):
            run.diverged = True
        if run.diverged:
            break
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss_v * len(idx)
        wrong += int((out_logits.detach().argmax(1) != y).sum())
        run.iteration += 1
        start += len(idx)
        bar.update(1)
        if n % 10 == 0 or start >= n_train:
            bar.set_postfix(loss=f"{loss_v:.3f}", err=f"{wrong / start:.3f}",
                            C=f"{_fmt(run.tracker.C_bar)}", L=f"{_fmt(run.tracker.L)}")
        n += 1
        new_lr = lr_at(epoch, base_lr=config.lr, epochs=config.epochs) * getattr(
            run.schedule, "lr_factor", 1.0)
        if new_lr != lr:                                   # a policy coupled the LR to the size
            lr = new_lr
            for group in run.optimizer.param_groups:
                group["lr"] = lr
    bar.close()
    t_train = time.perf_counter() - t0
    run.elapsed += t_train
    run.train_elapsed += t_train
    if run.diverged:
        return None
    t1 = time.perf_counter()
    test_loss, test_error = evaluate(run.model, ds, device)
    t_test = time.perf_counter() - t1
    run.elapsed += t_test
    tracker = run.tracker
    rec = {
        "type": "epoch", "epoch": epoch, "lr": lr, "batch_size": b0,
        "stage": int(run.schedule.stage(epoch)), "iterations": run.iteration,
        "train_loss": loss_sum / n_train, "train_error": wrong / n_train,
        "test_loss": test_loss, "test_error": test_error,
        "train_time_s": t_train, "test_time_s": t_test, "wall_time_s": run.elapsed,
        "C_bar": tracker.C_bar, "C_bar_jacobian": tracker.C_bar_jacobian, "L": tracker.L,
        "resolution_limited": tracker.resolution_limited,
        "C_bar_legacy": tracker.C_bar_legacy,
    }
    if hasattr(run.schedule, "update"):
        rec["batch_size_end"] = int(run.schedule.batch_size(epoch))
    return rec


def train(
    config: RunConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    quiet: bool = False,
    dataset: ImageDataset | None = None,
    log=None,
    on_epoch_end=None,
    tensorboard: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train one run and write its outputs to ``out_dir``; returns the summary dict.

    Args:
        config: the run's settings.
        out_dir: run directory (created).
        resume: continue from ``checkpoint.pt`` if present; a finished run is returned as is.
        quiet: no progress bars and no per-epoch lines.
        dataset: an already loaded dataset (skips loading; ``config.subset`` is still applied).
        log: callable taking a line of text (default: print to stderr unless quiet).
        on_epoch_end: optional callable ``(epoch, model, optimizer, record)`` run after each
            epoch's checkpoint (for tests and monitoring).
        tensorboard: a directory for TensorBoard scalars (:mod:`reference_training.board`).

    Raises:
        FileExistsError: ``out_dir`` already holds a run and ``resume`` is False.
        ValueError: a bad configuration, or ``resume`` with a different configuration.
    """
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if log is None:
        log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    finished = _check_resume(config, out, resume)
    if finished is not None:
        return finished
    run = _build(config, out, dataset=dataset, log=log, quiet=quiet)
    cfg_path, met_path, sum_path, ckpt_path = run.paths
    if resume and ckpt_path.exists():
        _restore(run, ckpt_path)
    if not cfg_path.exists() or not resume:
        _atomic_write_text(cfg_path, json.dumps(config.to_dict(), indent=2) + "\n")
    # Cut lines written after the last checkpoint (or everything, on a fresh start).
    with open(met_path, "ab") as f:
        f.truncate(run.offset)

    if tensorboard is not None:
        from .board import Board

        run.board = Board(str(tensorboard), purge_step=run.iteration if run.iteration else None)
    run.model.train()
    with open(met_path, "a") as metrics:
        for epoch in range(run.start_epoch, config.epochs):
            rec = _train_epoch(run, epoch, metrics)
            if rec is None:
                break
            metrics.write(_dumps(rec) + "\n")
            metrics.flush()
            run.epochs_log.append({k: _json_value(v) for k, v in rec.items()})
            log(f"[{out.name}] epoch {epoch + 1}/{config.epochs} b={rec['batch_size']} "
                f"lr={rec['lr']:g} train_err={rec['train_error']:.4f} "
                f"test_err={rec['test_error']:.4f} C_bar={_fmt(run.tracker.C_bar)} "
                f"L={_fmt(run.tracker.L)} ({rec['train_time_s'] + rec['test_time_s']:.1f}s)")
            _checkpoint(run, epoch, metrics.tell())
            if run.board is not None:
                run.board.epoch(rec)
            if on_epoch_end is not None:
                on_epoch_end(epoch, run.model, run.optimizer, rec)

    if run.board is not None:
        run.board.close()
    summary = _summary(run)
    _atomic_write_text(sum_path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def _summary(run: _Run) -> dict[str, Any]:
    config, tracker, epochs_log = run.config, run.tracker, run.epochs_log
    diverged = run.diverged
    last = epochs_log[-1] if epochs_log else {}
    test_errors = [e["test_error"] for e in epochs_log]
    return {
        "finished": True,
        "diverged": diverged,
        "label": run_label(config),
        "model": config.model,
        "dataset": config.dataset,
        "lr": config.lr,
        "seed": config.seed,
        "batch_sizes": [int(b) for b in run.schedule.sizes],
        "epochs": len(epochs_log),
        "epochs_planned": config.epochs,
        "iterations": run.iteration,
        "measurements": int(tracker.steps),
        "skipped_measurements": int(tracker.skipped),
        "resolution_limited": int(tracker.resolution_limited),
        "resolution_limited_fraction": _json_value(tracker.resolution_limited_fraction),
        "parameters": count_parameters(run.model),
        "C_bar": _json_value(tracker.C_bar),
        "C_bar_jacobian": _json_value(tracker.C_bar_jacobian),
        "C_bar_legacy": _json_value(tracker.C_bar_legacy),
        "L": _json_value(tracker.L),
        "test_error": None if diverged else last.get("test_error"),
        "best_test_error": min(test_errors) if test_errors and not diverged else None,
        "train_error": None if diverged else last.get("train_error"),
        "test_loss": None if diverged else last.get("test_loss"),
        "train_loss": None if diverged else last.get("train_loss"),
        "wall_time_s": run.elapsed,
        "train_time_s": run.train_elapsed,
        **({"decisions": [d._asdict() for d in run.schedule.policy.decisions]}
           if hasattr(run.schedule, "policy") else {}),
    }
