"""``RunConfig``: everything that determines one run of the reproduction (``config.json``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .schedules import parse_batch_schedule

__all__ = ["RunConfig"]


@dataclass
class RunConfig:
    """Everything that determines a run (written to ``config.json``).

    Exactly one of ``batch_size`` and ``batch_schedule`` is used: ``batch_schedule`` ("s32",
    "s32-to-128", "s32-to-128-MS" or a comma list "32,45,64,91,128") wins when given.
    Fields added in later releases have defaults, so older ``config.json`` files still load.
    """

    model: str = "resnet20"
    dataset: str = "mnist5k"
    data_dir: str | None = None
    epochs: int = 10
    lr: float = 0.1
    batch_size: int | None = 128
    batch_schedule: str | None = None
    stages: int = 5
    measure_every: int = 50
    seed: int = 0
    subset: int | None = None
    device: str = "cpu"
    depth: int | None = None
    width: int | None = None
    norm: str = "batch"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gram_strategy: str = "auto"
    # A fixed method keeps runs bitwise reproducible: "auto" times the candidates in each
    # process, and the measured step's batch gradient is the sum of the per-sample ones.
    conv_method: str = "grouped"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that cannot work."""
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ValueError(f"epochs must be an int >= 1, got {self.epochs!r}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite float, got {self.lr!r}.")
        if not (isinstance(self.measure_every, int) and self.measure_every >= 1):
            raise ValueError(
                f"measure_every must be an int >= 1 (1 = every iteration), got {self.measure_every!r}."
            )
        if self.batch_schedule is None and not (
            isinstance(self.batch_size, int) and self.batch_size >= 1
        ):
            raise ValueError(
                f"batch_size must be an int >= 1 when no batch_schedule is given, got {self.batch_size!r}."
            )
        parse_batch_schedule(self.schedule_spec)

    @property
    def schedule_spec(self) -> str:
        """The batch schedule's name: ``batch_schedule``, or ``s<batch_size>``."""
        return self.batch_schedule if self.batch_schedule else f"s{self.batch_size}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
