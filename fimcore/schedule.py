r"""Dynamic sampling: a batch size that grows over stages of training.

Source: Liao et al., IEEE TPAMI 2020, arXiv 1810.06767 (dynamic sampling; "s32-to-128"
grows the batch from 32 to 128 over five stages of equal length). The schedule is fixed in
advance and host-side: ints in, ints out (a new batch size changes array shapes, so it is
never traced).

* :meth:`StagedBatchSchedule.from_range` spaces ``stages`` sizes from ``start`` to ``end``
  geometrically, :math:`b_i = \operatorname{round}(s\,(e/s)^{i/(S-1)})` (32→128 over five
  stages gives 32, 45, 64, 91, 128), or linearly.
* Stages split the epochs as equally as possible; earlier stages take the remainder
  (10 epochs over 3 stages: 4, 3, 3).
* :meth:`StagedBatchSchedule.multi_stage` repeats the ramp inside each learning-rate phase
  (the "-MS" variant, read this way as a hypothesis: README, *Reference reproduction*).
* :func:`paper_lr_milestones` gives the paper's LR drops: epochs
  :math:`\lfloor E/2\rfloor` and :math:`\lfloor 3E/4\rfloor` (0-based, the new LR applies
  from the start of that epoch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._namespace import check_positive_int

__all__ = ["StagedBatchSchedule", "paper_lr_milestones"]

SPACINGS = ("geometric", "linear")


def paper_lr_milestones(total_epochs: int) -> tuple[int, int]:
    r"""The paper's learning-rate milestones :math:`(\lfloor 0.5E\rfloor, \lfloor 0.75E\rfloor)`.

    Epochs count from 0; the learning rate drops (×0.1 in the paper) at the start of each
    milestone epoch. 320 epochs give (160, 240). For E < 3 the two coincide or are 0.

    Raises:
        TypeError, ValueError: unless ``total_epochs`` is a positive int.

    Example:
        >>> paper_lr_milestones(320)
        (160, 240)
        >>> paper_lr_milestones(10)
        (5, 7)
    """
    total = check_positive_int(total_epochs, name="total_epochs")
    return (total // 2, (3 * total) // 4)


def _equal_lengths(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def _ramp(start: int, end: int, stages: int, spacing: str) -> list[int]:
    if stages == 1:
        if start != end:
            raise ValueError(
                f"a ramp of stages=1 has a single size, so start must equal end; received "
                f"start={start}, end={end}. Use stages >= 2 or StagedBatchSchedule([size], ...)."
            )
        return [start]
    sizes = []
    for i in range(stages):
        t = i / (stages - 1)
        value = start * (end / start) ** t if spacing == "geometric" else start + (end - start) * t
        sizes.append(int(math.floor(value + 0.5)))
    sizes[0], sizes[-1] = start, end
    return sizes


class StagedBatchSchedule:
    r"""Batch size per epoch in stages: stage i runs epochs [starts[i], starts[i+1]).

    Args:
        sizes: batch size of each stage (positive ints; need not be increasing).
        total_epochs: E, epochs of the whole run (>= number of stages).
        boundaries: optional epochs at which stages 1, 2, ... start (strictly increasing,
            in (0, E)); default: stages of equal length, earlier ones taking the remainder.

    Raises:
        TypeError: if a size or ``total_epochs`` is not an int.
        ValueError: on an empty ``sizes``, a size < 1, more stages than epochs, or bad
            ``boundaries``.

    Example:
        >>> s = StagedBatchSchedule.from_range(32, 128, stages=5, total_epochs=12)
        >>> s.sizes, s.boundaries
        ((32, 45, 64, 91, 128), (3, 6, 8, 10))
        >>> [s.batch_size(e) for e in range(12)]
        [32, 32, 32, 45, 45, 45, 64, 64, 91, 91, 128, 128]
        >>> s.stage(7)
        2
    """

    def __init__(
        self, sizes: Sequence[int], *, total_epochs: int, boundaries: Sequence[int] | None = None
    ) -> None:
        self._set(sizes, total_epochs, boundaries)

    def _set(self, sizes: Any, total_epochs: Any, boundaries: Any) -> None:
        total = check_positive_int(total_epochs, name="total_epochs")
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
            raise ValueError(
                f"sizes must be a non-empty sequence of positive ints (one per stage); "
                f"received {sizes!r}."
            )
        sizes = tuple(check_positive_int(s, name=f"sizes[{i}]") for i, s in enumerate(sizes))
        if len(sizes) > total:
            raise ValueError(
                f"every stage needs at least one epoch, so the number of stages must be <= "
                f"total_epochs; received {len(sizes)} stages for total_epochs={total}. Use "
                "fewer stages or more epochs."
            )
        if boundaries is None:
            lengths = _equal_lengths(total, len(sizes))
            starts = [sum(lengths[:i]) for i in range(1, len(sizes))]
        else:
            starts = [check_positive_int(b, name=f"boundaries[{i}]") for i, b in enumerate(boundaries)]
            ok = len(starts) == len(sizes) - 1 and all(a < b for a, b in zip([0, *starts], [*starts, total]))
            if not ok:
                raise ValueError(
                    f"boundaries must be the {len(sizes) - 1} epochs at which stages 1.. "
                    f"start, strictly increasing within (0, total_epochs={total}); received "
                    f"{list(boundaries)!r} for {len(sizes)} sizes."
                )
        self._sizes = sizes
        self._total = total
        self._boundaries = tuple(starts)

    @classmethod
    def from_range(
        cls, start: int, end: int, *, stages: int = 5, total_epochs: int, spacing: str = "geometric"
    ) -> StagedBatchSchedule:
        r"""Sizes spaced from ``start`` to ``end`` over ``stages`` stages of equal length.

        Geometric spacing rounds :math:`s\,(e/s)^{i/(S-1)}` to the nearest int (halves up);
        linear spacing rounds :math:`s + (e-s)\,i/(S-1)`.

        Raises:
            TypeError: if ``start``, ``end`` or ``stages`` is not an int.
            ValueError: on values < 1, an unknown ``spacing``, ``stages`` > ``total_epochs``,
                or ``stages=1`` with ``start != end``.

        Example:
            >>> StagedBatchSchedule.from_range(32, 128, total_epochs=320).sizes
            (32, 45, 64, 91, 128)
        """
        start = check_positive_int(start, name="start")
        end = check_positive_int(end, name="end")
        stages = check_positive_int(stages, name="stages")
        if spacing not in SPACINGS:
            raise ValueError(
                f"spacing must be one of {SPACINGS}; received {spacing!r}."
            )
        return cls(_ramp(start, end, stages, spacing), total_epochs=total_epochs)

    @classmethod
    def multi_stage(
        cls,
        start: int,
        end: int,
        *,
        stages: int = 5,
        total_epochs: int,
        lr_milestones: Sequence[int],
        spacing: str = "geometric",
    ) -> StagedBatchSchedule:
        r"""The "-MS" variant: the ramp ``start``→``end`` repeated inside each LR phase.

        The paper's "s32-to-128-MS" is not defined in the sources that could be retrieved;
        this is the reading chosen here, *a hypothesis* (README, *Reference reproduction*): the
        learning-rate milestones split training into phases ([0, m_1), [m_1, m_2), ...,
        [m_last, E)) and each phase runs the full ``stages``-stage ramp, its epochs split
        as equally as possible (earlier stages take the remainder).

        Args:
            start, end, stages, spacing: the ramp, as in :meth:`from_range`.
            total_epochs: E.
            lr_milestones: epochs at which the learning rate drops, strictly increasing
                within (0, E), e.g. :func:`paper_lr_milestones` (E).

        Raises:
            ValueError: on bad milestones or a phase shorter than ``stages`` epochs.

        Example:
            >>> s = StagedBatchSchedule.multi_stage(32, 128, stages=2, total_epochs=8,
            ...                                     lr_milestones=(4, 6))
            >>> [s.batch_size(e) for e in range(8)]
            [32, 32, 128, 128, 32, 128, 32, 128]
        """
        total = check_positive_int(total_epochs, name="total_epochs")
        ramp = cls.from_range(start, end, stages=stages, total_epochs=max(stages, 1),
                              spacing=spacing).sizes
        milestones = [check_positive_int(m, name=f"lr_milestones[{i}]") for i, m in enumerate(lr_milestones)]
        edges = [0, *milestones, total]
        if any(a >= b for a, b in zip(edges, edges[1:])):
            raise ValueError(
                f"lr_milestones must be strictly increasing within (0, total_epochs={total}); "
                f"received {list(lr_milestones)!r}. Use paper_lr_milestones(total_epochs)."
            )
        sizes: list[int] = []
        starts: list[int] = []
        for a, b in zip(edges, edges[1:]):
            if b - a < len(ramp):
                raise ValueError(
                    f"each learning-rate phase must hold at least stages={len(ramp)} epochs; "
                    f"phase [{a}, {b}) has {b - a}. Use fewer stages or more epochs."
                )
            lengths = _equal_lengths(b - a, len(ramp))
            starts.extend(a + sum(lengths[:i]) for i in range(len(ramp)))
            sizes.extend(ramp)
        return cls(sizes, total_epochs=total, boundaries=starts[1:])

    @property
    def sizes(self) -> tuple[int, ...]:
        """Batch size of each stage."""
        return self._sizes

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Epochs at which stages 1, 2, ... start (stage 0 starts at epoch 0)."""
        return self._boundaries

    @property
    def total_epochs(self) -> int:
        """E, the number of epochs the schedule covers."""
        return self._total

    def stage(self, epoch: int) -> int:
        """0-based index of the stage that epoch ``epoch`` (0-based) belongs to.

        Raises:
            TypeError, ValueError: unless ``epoch`` is an int in [0, total_epochs).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int; received {epoch!r} of type {type(epoch).__name__}.")
        if not 0 <= epoch < self._total:
            raise ValueError(
                f"epoch must lie in [0, total_epochs={self._total}) (epochs count from 0); "
                f"received {epoch}."
            )
        return sum(1 for b in self._boundaries if b <= epoch)

    def batch_size(self, epoch: int) -> int:
        """Batch size for epoch ``epoch`` (0-based).

        Raises:
            TypeError, ValueError: unless ``epoch`` is an int in [0, total_epochs).
        """
        return self._sizes[self.stage(epoch)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable snapshot: ``sizes``, ``total_epochs``, ``boundaries`` (lists)."""
        return {"sizes": list(self._sizes), "total_epochs": self._total,
                "boundaries": list(self._boundaries)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot (validated like the constructor).

        Raises:
            ValueError: if keys are missing or the values are invalid.
        """
        missing = {"sizes", "total_epochs", "boundaries"} - set(state)
        if missing:
            raise ValueError(
                f"state must be a dict from StagedBatchSchedule.state_dict(); missing keys "
                f"{sorted(missing)}."
            )
        self._set(state["sizes"], state["total_epochs"], state["boundaries"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StagedBatchSchedule):
            return NotImplemented
        return self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        return (f"StagedBatchSchedule(sizes={list(self._sizes)}, total_epochs={self._total}, "
                f"boundaries={list(self._boundaries)})")
