"""TensorBoard scalars of a run (``reference_training run --tensorboard DIR``).

Every measured iteration writes its numeric fields (c_k, C̄_K, I_k, L_K, the batch size in force
and every extra statistic) under ``measure/<field>`` at global step = training iteration; every
epoch writes ``epoch/<field>`` (losses, errors, times) at step = epoch. Uses
``torch.utils.tensorboard``, which needs the ``tensorboard`` package (extra ``tensorboard``).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Board"]

_SKIP = {"type", "k", "iteration", "epoch", "decision"}


class Board:
    """A ``SummaryWriter`` that knows the run's record layout.

    Raises:
        ImportError: ``tensorboard`` is not installed (the message says how to install it).
    """

    def __init__(self, log_dir: str, *, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch.utils.tensorboard imports the tensorboard package
            raise ImportError(
                "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
                "-c constraints.txt") from exc
        # purge_step drops events a killed run wrote after its last checkpoint
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def _scalars(self, prefix: str, record: dict[str, Any], step: int) -> None:
        for key, value in record.items():
            if key in _SKIP or isinstance(value, (bool, dict, list, str)) or value is None:
                continue
            value = float(value)
            if math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def measure(self, line: dict[str, Any]) -> None:
        self._scalars("measure", line, int(line["iteration"]))

    def epoch(self, record: dict[str, Any]) -> None:
        self._scalars("epoch", record, int(record["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
