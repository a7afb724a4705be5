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

Data-parallel (under ``torchrun``, or in processes whose ``torch.distributed`` group is already
initialised; :mod:`reference_training.distributed`): the schedule's batch size is the global batch,
split over the ranks from one shared permutation and augmentation; the model is wrapped in DDP;
the Gram is that of the global batch (``gram_scope="global"``, the default) or each rank's own
(``"local"``, measures averaged over ranks); evaluation is sharded over the ranks and reduced; only
rank 0 writes files, and the checkpoint carries every rank's RNG state (and local trackers), so a
resume is exact as well. A single process runs exactly as before.
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
from .distributed import GRAM_SCOPES, DistContext, context, shard
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
def evaluate(model: torch.nn.Module, ds: ImageDataset, device: torch.device,
             dist: DistContext | None = None) -> tuple[float, float]:
    """Mean cross-entropy and top-1 error on the test set (eval mode, BN running statistics).

    Data-parallel: every rank takes rank 0's buffers (BN running statistics), evaluates the chunks
    j of ``EVAL_BATCH`` test images with j mod W = its rank, and the sums of loss and errors are
    all-reduced, so every rank returns the same values (the loss sum in another order than a
    single process: equal up to float64 rounding; the error count exactly).
    """
    was_training = model.training
    model.eval()
    loss_sum, wrong, n = 0.0, 0, len(ds.test_y)
    if dist is not None:
        dist.broadcast_buffers(model)
    for j, start in enumerate(range(0, n, EVAL_BATCH)):
        if dist is not None and j % dist.world_size != dist.rank:
            continue
        x = normalise(ds.test_x[start:start + EVAL_BATCH], ds.mean, ds.std).to(device)
        y = ds.test_y[start:start + EVAL_BATCH].to(device)
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        wrong += int((out.argmax(1) != y).sum())
    model.train(was_training)
    if dist is not None:
        loss_sum, wrong_f = dist.all_sum([loss_sum, wrong])
        wrong = int(round(wrong_f))
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


def _make_recorder(model: torch.nn.Module, config: RunConfig, *, ddp: Any = None,
                   scope: str = "local") -> GramRecorder:
    # per-layer statistics read each module's block of G: keep them only when asked for
    keep = "per_layer" in statistic_names(config.stats)
    kw = dict(loss_reduction="mean", strategy=config.gram_strategy,
              conv_method=config.conv_method, keep_blocks=keep)
    if ddp is None or scope == "local":
        return GramRecorder(model, **kw)   # data-parallel "local": this rank's rows only
    try:
        return GramRecorder(ddp, scope="global", **kw)
    except TypeError as exc:
        raise ValueError("--gram-scope global needs GramRecorder(ddp_model, scope='global') from "
                         "fimcore_adapters.torch, which this installation lacks "
                         f"({exc}); use --gram-scope local.") from exc


class _NullFile:
    """What ranks other than 0 write metrics lines to."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return 0

    def __enter__(self) -> "_NullFile":
        return self

    def __exit__(self, *exc) -> bool:
        return False


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
    dist: DistContext | None = None   # data-parallel: this rank's process group
    ddp: Any = None                   # the DistributedDataParallel wrapper of ``model``
    scope: str = "global"             # the Gram a data-parallel run measures

    @property
    def net(self) -> torch.nn.Module:
        """What the training step calls: the DDP wrapper, or the model itself."""
        return self.ddp if self.ddp is not None else self.model

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


def _build(config: RunConfig, out: Path, *, dataset: ImageDataset | None, log, quiet,
           dist: DistContext | None = None, scope: str = "global") -> _Run:
    """Data, seeds, model, optimiser, schedule, tracker and recorder of a fresh run.

    Data-parallel, every rank seeds the same way (so all ranks draw the same permutation and
    augmentation, see :mod:`reference_training.distributed`) and the model is wrapped in
    ``DistributedDataParallel``.
    """
    device = torch.device(config.device)
    if dist is not None and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
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
    ddp = None
    if dist is not None:
        if scope == "local" and hasattr(schedule, "update"):
            raise ValueError(f"--batch-schedule {config.schedule_spec!r} is steered by the measures, "
                             "which must be one Gram seen by every rank: use --gram-scope global "
                             "under torchrun (local scope measures one Gram per rank).")
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    return _Run(config=config, out=out, log=log, quiet=quiet, device=device, ds=ds, model=model,
                optimizer=optimizer, schedule=schedule, tracker=tracker,
                recorder=_make_recorder(model, config, ddp=ddp, scope=scope), data_gen=data_gen,
                num_params=count_parameters(model), dist=dist, ddp=ddp, scope=scope)


def _restore(run: _Run, ckpt_path: Path) -> None:
    """Continue from the last epoch checkpoint (model, optimiser, schedule, tracker, RNG)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # RNG states stay on CPU
    stored = ckpt.get("distributed")
    here = None if run.dist is None else {"world_size": run.dist.world_size,
                                           "gram_scope": run.scope}
    there = None if stored is None else {k: stored[k] for k in ("world_size", "gram_scope")}
    if here != there:
        def what(d):
            return ("a single process" if d is None else
                    f"{d['world_size']} processes, --gram-scope {d['gram_scope']}")
        raise ValueError(f"the checkpoint in {str(run.out)!r} was written by {what(there)}; this "
                         f"resume runs {what(here)}. Resume with the same launch (an exact resume "
                         "needs every rank's RNG state) or choose another --out.")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["schedule"])
    if stored is not None and stored.get("tracker_per_rank") is not None:
        run.tracker.load_state_dict(stored["tracker_per_rank"][run.dist.rank])
    else:
        run.tracker.load_state_dict(ckpt["tracker"])
    if stored is not None:
        _set_rng_state(stored["rng_per_rank"][run.dist.rank], run.data_gen)
    else:
        _set_rng_state(ckpt["rng"], run.data_gen)
    run.start_epoch, run.iteration = ckpt["epoch"] + 1, ckpt["iteration"]
    run.elapsed, run.train_elapsed = ckpt["wall_time_s"], ckpt["train_time_s"]
    run.epochs_log, run.offset = ckpt["epochs_log"], ckpt["metrics_offset"]
    run.log(f"resuming {run.out} after epoch {run.start_epoch} (iteration {run.iteration})")


def _checkpoint(run: _Run, epoch: int, metrics_offset: int) -> None:
    """Write the checkpoint (data-parallel: rank 0 writes it, with every rank's RNG state and,
    for the local scope, every rank's tracker; model and optimiser are the same on all ranks)."""
    rng = _rng_state(run.data_gen)
    extra = {}
    if run.dist is not None:
        rngs = run.dist.gather_objects(rng)
        trackers = (run.dist.gather_objects(run.tracker.state_dict())
                    if run.scope == "local" else None)
        if not run.dist.is_writer:
            return
        extra = {"distributed": {"world_size": run.dist.world_size, "gram_scope": run.scope,
                                 "rng_per_rank": rngs, "tracker_per_rank": trackers}}
    _atomic_torch_save({
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(), "tracker": run.tracker.state_dict(),
        "rng": rng, "epoch": epoch, "iteration": run.iteration,
        "wall_time_s": run.elapsed, "train_time_s": run.train_elapsed,
        "epochs_log": run.epochs_log, "metrics_offset": metrics_offset, **extra,
    }, run.out / CHECKPOINT_FILE)


#: fields of a measure line that are the same on every rank (not averaged under the local scope)
_SHARED_FIELDS = ("type", "k", "iteration", "epoch", "lr", "batch_size", "weight", "grad_norm")


def _mean_line(run: _Run, line: dict[str, Any]) -> dict[str, Any]:
    """Local scope: every numeric field of the measure line averaged over ranks (booleans give the
    fraction of ranks); fields that are not numbers on every rank keep rank 0's value."""
    lines = run.dist.gather_objects(line)
    out = dict(line)
    for key, v0 in line.items():
        if key in _SHARED_FIELDS:
            continue
        vals = [ln.get(key) for ln in lines]
        nums = [v for v in vals if isinstance(v, (int, float, bool, np.floating, np.integer))]
        if len(nums) == len(vals) and nums:
            vs = [float(_json_value(v)) for v in nums]
            out[key] = math.fsum(vs) / len(vs)
        elif all(v is None or isinstance(v, (int, float, np.floating, np.integer)) for v in vals):
            finite = [float(_json_value(v)) for v in vals if v is not None]
            out[key] = math.fsum(finite) / len(finite) if finite else None
    return out


def _tracker_values(run: _Run) -> dict[str, Any]:
    """C̄_K, L_K and their companions; under the local scope the mean over ranks."""
    t = run.tracker
    vals = {"C_bar": t.C_bar, "C_bar_jacobian": t.C_bar_jacobian, "L": t.L,
            "resolution_limited": t.resolution_limited, "C_bar_legacy": t.C_bar_legacy,
            "measurements": t.steps, "skipped_measurements": t.skipped,
            "resolution_limited_fraction": t.resolution_limited_fraction}
    if run.dist is None or run.scope != "local":
        return vals
    lines = run.dist.gather_objects({k: _json_value(v) for k, v in vals.items()})
    out = {}
    for k in vals:
        finite = [float(ln[k]) for ln in lines if ln[k] is not None]
        out[k] = math.fsum(finite) / len(finite) if finite else None
    return out


def _measure(run: _Run, metrics, *, epoch: int, n: int, n_iters: int, batch: int,
             lr: float, gram_batch: int | None = None, gram_scale: float = 1.0) -> bool:
    """Feed the step's Gram to the tracker (and the policy) and write its metrics line.

    Data-parallel: ``batch`` is the global batch; ``gram_batch`` the rows of this rank's Gram (the
    local shard under the local scope) and ``gram_scale`` the factor turning its rows into
    per-sample loss gradients (≠ 1 only for an uneven split, whose loss is not the shard mean).
    All ranks call it together (its collectives agree on divergence and average the local lines).

    Returns False if the step diverged (non-finite Gram).
    """
    try:
        gram = run.recorder.gram()
    except FloatingPointError as exc:
        gram = torch.full((1, 1), math.nan)
        run.log(f"non-finite per-sample gradients: {exc}")
    if gram_scale != 1.0:
        gram = gram * gram_scale
    finite = bool(torch.isfinite(gram).all())
    if run.dist is not None:
        finite = not run.dist.any(not finite)
    if not finite:
        run.log(f"diverged at epoch {epoch}, iteration {run.iteration}: non-finite Gram")
        return False
    weight = min(run.config.measure_every, n_iters - n)
    blocks = run.recorder.blocks() if run.recorder.keep_blocks else None
    m = run.tracker.update(gram, lr=lr, weight=weight,
                           batch_size=batch if gram_batch is None else gram_batch,
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
    if run.dist is not None and run.scope == "local":
        line["gram_batch_size"] = gram_batch
        line = _mean_line(run, line)
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
        x = augment(x, flip=ds.flip, pad=ds.pad, generator=run.data_gen)
        y = ds.train_y[idx]
        if run.dist is not None:
            # the global batch's inputs as one process draws them; this rank keeps its slice
            part = shard(len(idx), run.dist.rank, run.dist.world_size)
            x, y = x[part], y[part]
        x, y = x.to(device), y.to(device)
        uneven = run.dist is not None and len(y) * run.dist.world_size != len(idx)
        measured = n % config.measure_every == 0
        with run.recorder(measure=measured):  # unmeasured: a plain step, no hooks
            out_logits = run.net(x)
            loss = F.cross_entropy(out_logits, y)
            if uneven:    # DDP averages over ranks: (W·B_r/B)·mean_r = (W/B)·Σ_shard ℓ_i
                loss = loss * (run.dist.world_size * len(y) / len(idx))
            loss.backward()
        loss_v = loss.detach().item()
        if run.dist is not None:
            # the global batch's mean loss and errors; a non-finite loss on any rank stops all
            local_sum = float(F.cross_entropy(out_logits.detach(), y, reduction="sum"))
            local_wrong = int((out_logits.detach().argmax(1) != y).sum())
            tot, tot_wrong, bad = run.dist.all_sum(
                [local_sum if math.isfinite(local_sum) else 0.0, local_wrong,
                 0.0 if math.isfinite(loss_v) and math.isfinite(local_sum) else 1.0])
            loss_v = tot / len(idx) if bad == 0 else math.nan
        if not math.isfinite(loss_v):
            run.log(f"diverged at epoch {epoch}, iteration {run.iteration}: loss {loss_v}")
            run.diverged = True
        elif measured and run.dist is None and not _measure(
                run, metrics, epoch=epoch, n=n, n_iters=n_iters, batch=len(idx), lr=lr):
            run.diverged = True
        elif measured and run.dist is not None and not _measure(
                run, metrics, epoch=epoch, n=n, n_iters=n_iters, batch=len(idx), lr=lr,
                gram_batch=len(y) if run.scope == "local" else len(idx),
                # a "mean" recorder's rows are B_r·∂loss_r/∂θ_i = (B_r·W/B)·∇ℓ_i when uneven
                gram_scale=(len(idx) / (len(y) * run.dist.world_size)) ** 2
                if uneven and run.scope == "local" else 1.0):
            run.diverged = True
        if run.diverged:
            break
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss_v * len(idx)
        if run.dist is not None:
            wrong += int(round(tot_wrong))
        else:
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
    test_loss, test_error = evaluate(run.model, ds, device, run.dist)
    t_test = time.perf_counter() - t1
    run.elapsed += t_test
    tracker = run.tracker
    if run.dist is not None and run.scope == "local":
        tracker = _Values(_tracker_values(run))
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


class _Values:
    """Attribute access to a dict of tracker values (the local scope's means over ranks)."""

    def __init__(self, d: dict[str, Any]):
        self.__dict__.update(d)
        self.steps, self.skipped = d["measurements"], d["skipped_measurements"]


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
    gram_scope: str | None = None,
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
        gram_scope: data-parallel runs only (``torchrun``, see
            :mod:`reference_training.distributed`): ``"global"`` (default) measures the Gram of
            the global batch, the same on every rank, so C̄_K and L_K are those of the
            single-process run with that batch size; ``"local"`` measures each rank's own
            Gram (B/W rows) and writes the mean over ranks of every measured value. Ignored by
            a single process.

    Data-parallel, only rank 0 writes files (``config.json``, ``metrics.jsonl``, checkpoints,
    ``summary.json``, TensorBoard) and logs; every rank reads the checkpoint on resume and every
    rank returns the summary.

    Raises:
        FileExistsError: ``out_dir`` already holds a run and ``resume`` is False.
        ValueError: a bad configuration, or ``resume`` with a different configuration.
    """
    config.validate()
    if gram_scope is not None and gram_scope not in GRAM_SCOPES:
        raise ValueError(f"gram_scope must be one of {GRAM_SCOPES}; received {gram_scope!r}.")
    dist = context(config.device)
    try:
        return _train(config, Path(out_dir), resume=resume, quiet=quiet, dataset=dataset,
                      log=log, on_epoch_end=on_epoch_end, tensorboard=tensorboard,
                      dist=dist, scope=gram_scope or "global")
    finally:
        if dist is not None:
            dist.close()


def _train(config: RunConfig, out: Path, *, resume, quiet, dataset, log, on_epoch_end,
           tensorboard, dist: DistContext | None, scope: str) -> dict[str, Any]:
    writer = dist is None or dist.is_writer
    out.mkdir(parents=True, exist_ok=True)
    if not writer:
        log, quiet, tensorboard = (lambda s: None), True, None
    if log is None:
        log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    finished = _check_resume(config, out, resume)
    if dist is not None:
        dist.barrier()          # every rank has looked at the folder before rank 0 writes to it
    if finished is not None:
        return finished
    run = _build(config, out, dataset=dataset, log=log, quiet=quiet, dist=dist, scope=scope)
    cfg_path, met_path, sum_path, ckpt_path = run.paths
    if resume and ckpt_path.exists():
        _restore(run, ckpt_path)
    if writer:
        if not cfg_path.exists() or not resume:
            _atomic_write_text(cfg_path, json.dumps(config.to_dict(), indent=2) + "\n")
        # Cut lines written after the last checkpoint (or everything, on a fresh start).
        with open(met_path, "ab") as f:
            f.truncate(run.offset)

    if tensorboard is not None:
        from .board import Board

        run.board = Board(str(tensorboard), purge_step=run.iteration if run.iteration else None)
    run.model.train()
    with (open(met_path, "a") if writer else _NullFile()) as metrics:
        for epoch in range(run.start_epoch, config.epochs):
            rec = _train_epoch(run, epoch, metrics)
            if rec is None:
                break
            metrics.write(_dumps(rec) + "\n")
            metrics.flush()
            run.epochs_log.append({k: _json_value(v) for k, v in rec.items()})
            log(f"[{out.name}] epoch {epoch + 1}/{config.epochs} b={rec['batch_size']} "
                f"lr={rec['lr']:g} train_err={rec['train_error']:.4f} "
                f"test_err={rec['test_error']:.4f} C_bar={_fmt(rec['C_bar'])} "
                f"L={_fmt(rec['L'])} ({rec['train_time_s'] + rec['test_time_s']:.1f}s)")
            _checkpoint(run, epoch, metrics.tell())
            if run.board is not None:
                run.board.epoch(rec)
            if on_epoch_end is not None:
                on_epoch_end(epoch, run.model, run.optimizer, rec)

    if run.board is not None:
        run.board.close()
    summary = _summary(run)
    if writer:
        _atomic_write_text(sum_path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def _summary(run: _Run) -> dict[str, Any]:
    config, tracker, epochs_log = run.config, run.tracker, run.epochs_log
    if run.dist is not None and run.scope == "local":
        tracker = _Values(_tracker_values(run))
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
        **({"distributed": {"world_size": run.dist.world_size, "gram_scope": run.scope,
                            "backend": run.dist.backend}} if run.dist is not None else {}),
    }
