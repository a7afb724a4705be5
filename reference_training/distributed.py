"""Data-parallel runs: ``python -m reference_training run ...`` under ``torchrun``.

A run is distributed when ``torch.distributed`` is already initialised (a caller that spawned the
processes itself) or when the launcher's environment says so (``WORLD_SIZE`` > 1, with ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` as ``torchrun`` sets them). ``WORLD_SIZE`` = 1 or
unset is the ordinary single-process run, unchanged. The process group uses gloo on CPU and nccl
on CUDA (rank r then trains on ``cuda:<LOCAL_RANK>``).

How the global batch is split. Every rank draws the same permutation and the same augmentation
from the same seeded generator, over the whole global batch of B samples (the schedule's batch
size is the global one), and keeps its own contiguous slice: with world size W, ranks
0 … (B mod W) − 1 take ⌈B/W⌉ samples and the others ⌊B/W⌋ (:func:`shard`). The inputs of the
global batch are therefore those of the single-process run. A rank that would get no sample
(B < W, e.g. a last partial batch of one sample on two ranks) is refused with a ``ValueError``.
When W divides B each rank's loss is its own batch mean and DDP's gradient average is the mean over
the global batch; otherwise rank r's loss is its mean times W·B_r/B, i.e. (W/B)·Σ_{i∈r} ℓ_i, so that DDP's
average is again (1/B)·Σ_i ∇ℓ_i exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

__all__ = ["DistContext", "GRAM_SCOPES", "context", "shard", "shard_sizes"]

GRAM_SCOPES = ("global", "local")


@dataclass
class DistContext:
    """The process group of a data-parallel run, as this rank sees it."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    owned: bool          # this module initialised the group (and destroys it at the end)

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes files, logs and progress bars."""
        return self.rank == 0

    # ----------------------------------------------------------------- collectives
    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Σ over ranks of each value (float64, one all-reduce)."""
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank."""
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def mean_over_ranks(self, values: Mapping[str, Any]) -> dict[str, float]:
        """The mean over ranks of every numeric entry (None and booleans count as NaN and 0/1).

        Every rank must pass the same keys in the same order.
        """
        keys = list(values)
        nums = []
        for k in keys:
            v = values[k]
            nums.append(float("nan") if v is None else float(v))
        sums = self.all_sum(nums)
        return {k: s / self.world_size for k, s in zip(keys, sums)}

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank."""
        import torch.distributed as dist

        for b in module.buffers():
            dist.broadcast(b.data, src=0)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            dist.destroy_process_group()

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; received {raw!r}.") from None


def context(device: str) -> DistContext | None:
    """The distributed context of this process, initialising the group from the environment.

    Returns None for a single-process run (no initialised group and ``WORLD_SIZE`` unset or 1).

    Raises:
        ValueError: inconsistent launcher variables (``RANK`` outside ``[0, WORLD_SIZE)``, missing
            ``MASTER_ADDR``/``MASTER_PORT``), or ``--device cuda`` without enough GPUs.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        if world == 1:
            return None
        local = _env_int("LOCAL_RANK", rank)
        return DistContext(rank, world, local, str(dist.get_backend()), owned=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return None
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    rank = _env_int("RANK", -1)
    local = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise ValueError(f"a distributed run needs RANK in [0, WORLD_SIZE={world}); received "
                         f"RANK={os.environ.get('RANK')!r}. Launch with torchrun --nproc_per_node N.")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ValueError(f"a distributed run (WORLD_SIZE={world}) needs {missing} in the "
                         "environment; torchrun sets them.")
    cuda = str(device).startswith("cuda")
    if cuda:
        if torch.cuda.device_count() <= local:
            raise ValueError(f"--device {device} on LOCAL_RANK {local} needs {local + 1} GPUs; this "
                             f"node has {torch.cuda.device_count()}.")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
    return DistContext(rank, world, local, backend, owned=True)


def shard_sizes(batch: int, world: int) -> list[int]:
    """Samples per rank of a global batch: ⌈B/W⌉ on the first B mod W ranks, ⌊B/W⌋ on the rest.

    Raises:
        ValueError: B < W (a rank would get no sample).

    Example:
        >>> shard_sizes(10, 4)
        [3, 3, 2, 2]
    """
    if batch < world:
        raise ValueError(f"a global batch of {batch} sample(s) cannot be split over {world} ranks "
                         f"(each rank needs at least one); use a batch size (and a training-set "
                         f"size modulo the batch size) of at least {world}, or fewer processes.")
    q, r = divmod(batch, world)
    return [q + 1 if i < r else q for i in range(world)]


def shard(batch: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous slice of a global batch of ``batch`` samples (:func:`shard_sizes`)."""
    sizes = shard_sizes(batch, world)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])
