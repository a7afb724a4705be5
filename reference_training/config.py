"""``RunConfig``: everything that determines one run of the reproduction (``config.json``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .schedules import parse_batch_schedule

__all__ = ["RunConfig", "STATS", "statistic_names"]

def _catalogue() -> dict[str, str]:
    """Every name ``--stats`` accepts → the statistic recording it (all of ``fimcore.stats``)."""
    from fimcore import stats as S
    from fimcore.stats.base import ALWAYS, registered_fields

    fields = {f: s for f, s in registered_fields().items() if s not in ALWAYS}
    return {**{s: s for s in fields.values()}, **fields}


#: names accepted by ``--stats`` → the statistic recording them: every statistic of
#: ``fimcore.stats`` by its name or by one of its record fields (plus ``all``)
STATS = _catalogue()


def statistic_names(stats: str | None) -> list[str]:
    """The statistics a ``--stats`` list names, deduplicated, in a fixed order.

    Raises:
        ValueError: an unknown name.

    Example:
        >>> statistic_names("norm_test,noise_scale,stable_rank")
        ['noise_scale', 'batch_tests', 'spectrum_shape']
        >>> statistic_names("all")
        ['noise_scale', 'batch_tests', 'spectrum_shape', 'fisher_spectrum', 'per_layer']
    """
    from fimcore.stats import statistics_from_names

    names = [n.strip() for n in (stats or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in STATS and n != "all"]
    if unknown:
        raise ValueError(f"--stats takes names from {sorted(STATS) + ['all']}; received unknown {unknown}.")
    return [s.name for s in statistics_from_names(names)]


@dataclass
class RunConfig:
    """Everything that determines a run (written to ``config.json``).

    ``batch_schedule`` ("s32", "s32-to-128", "s32-to-128-MS", a comma list "32,45,64,91,128")
    wins over ``batch_size`` when given; ``"auto:<rule>"`` (a closed-loop policy) starts at
    ``batch_size`` and takes ``policy_options``. ``stats`` names extra statistics recorded at
    every measured step (comma list, see :data:`STATS`).
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
    policy_options: str | None = None
    stats: str | None = None

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
        kind, _ = parse_batch_schedule(self.schedule_spec)
        if kind == "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_schedule {self.batch_schedule!r} starts from batch_size, which "
                             f"must be an int >= 1; got {self.batch_size!r}.")
        if kind != "auto" and self.policy_options:
            raise ValueError("policy_options apply to batch_schedule 'auto:<rule>' only; got "
                             f"{self.policy_options!r} with {self.schedule_spec!r}.")
        statistic_names(self.stats)

    def statistics(self) -> tuple:
        """The extra statistics ``stats`` names (instances, in a fixed order)."""
        from fimcore.stats import statistics_from_names

        return statistics_from_names(statistic_names(self.stats))

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
