"""Batch-size and learning-rate schedules of a run, by the paper's names.

* ``sB`` — fixed batch B; ``sA-to-B`` — dynamic sampling, A to B geometrically over ``stages``
  equal stages (a choice); ``sA-to-B-MS`` — the ramp repeated inside each LR phase (a
  hypothesis; both in README, *Reference reproduction*); ``16,32,64`` — explicit sizes, one per equal stage.
* Learning rate: base LR ×0.1 at each of ``fimcore.paper_lr_milestones(E)`` = (⌊E/2⌋, ⌊3E/4⌋).
"""

from __future__ import annotations

import re

import fimcore

__all__ = ["label_of", "lr_at", "make_schedule", "parse_batch_schedule", "run_label"]

_SCHEDULE_RE = re.compile(r"^s(\d+)(?:-to-(\d+))?(-MS)?$", re.IGNORECASE)


def parse_batch_schedule(spec: str) -> tuple[str, list[int] | tuple[int, int] | str]:
    """Parse a batch-schedule name.

    Returns ``("fixed", [b])``, ``("range", (start, end))``, ``("ms", (start, end))``,
    ``("list", sizes)`` or ``("auto", rule)`` for ``auto:<rule>`` (a closed-loop policy,
    :mod:`reference_training.adaptive`).

    Raises:
        ValueError: the name is not of the form ``sB``, ``sA-to-B``, ``sA-to-B-MS``, a comma
            list of positive ints or ``auto:<rule>`` with a known rule.
    """
    s = str(spec).strip()
    if s.lower().startswith("auto:"):
        from fimcore.policy import RULES

        rule = s.split(":", 1)[1].strip()
        if rule not in RULES:
            raise ValueError(f"auto:<rule> needs a rule in {sorted(RULES)}; received {spec!r}.")
        return "auto", rule
    m = _SCHEDULE_RE.match(s)
    if m:
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else None
        ms = bool(m.group(3))
        if a < 1 or (b is not None and b < 1):
            raise ValueError(f"batch sizes must be >= 1, got {spec!r}.")
        if b is None:
            if ms:
                raise ValueError(f"'-MS' needs a range 'sA-to-B-MS', got {spec!r}.")
            return "fixed", [a]
        return ("ms" if ms else "range"), (a, b)
    try:
        sizes = [int(p) for p in s.split(",") if p.strip()]
    except ValueError:
        sizes = []
    if sizes and all(v >= 1 for v in sizes):
        return "list", sizes
    raise ValueError(
        f"batch schedule must look like 's64', 's16-to-64', 's16-to-64-MS', '16,32,64' or "
        f"'auto:<rule>', got {spec!r}."
    )


def make_schedule(spec: str, *, epochs: int, stages: int = 5, initial: int | None = None,
                  options: str | None = None):
    """Build the batch schedule for a schedule name and epoch budget.

    ``sA-to-B`` grows geometrically over ``stages`` equal stages (a choice);
    ``sA-to-B-MS`` repeats the ramp inside each LR phase (a hypothesis; README, *Reference
    reproduction*);
    ``auto:<rule>`` is an :class:`~reference_training.adaptive.AdaptiveSchedule` starting at
    ``initial`` with the ``key=value`` ``options``.
    """
    kind, value = parse_batch_schedule(spec)
    if kind == "auto":
        from .adaptive import AdaptiveSchedule, parse_options

        if initial is None:
            raise ValueError(f"{spec!r} needs an initial batch size (--batch-size).")
        return AdaptiveSchedule(value, initial, parse_options(options))
    if kind == "fixed":
        return fimcore.StagedBatchSchedule(list(value), total_epochs=epochs)
    if kind == "list":
        return fimcore.StagedBatchSchedule(list(value), total_epochs=epochs)
    start, end = value
    if kind == "range":
        return fimcore.StagedBatchSchedule.from_range(start, end, stages=stages, total_epochs=epochs)
    return fimcore.StagedBatchSchedule.multi_stage(
        start, end, stages=stages, total_epochs=epochs,
        lr_milestones=fimcore.paper_lr_milestones(epochs),
    )


def run_label(config) -> str:
    """Short name of a ``RunConfig``'s batch setting, e.g. ``s64``, ``s16-to-64`` (the paper's
    naming) or ``s16-auto-norm_test`` (a policy starting at 16)."""
    kind, value = parse_batch_schedule(config.schedule_spec)
    if kind == "auto":
        return f"s{config.batch_size}-auto-{value}"
    return label_of(config.schedule_spec)


def label_of(spec: str) -> str:
    """The paper's short name of a batch-schedule spec (``"16,32"`` → ``s16-32``).

    Example:
        >>> label_of("s16-to-64-ms"), label_of("32")
        ('s16-to-64-MS', 's32')
    """
    kind, value = parse_batch_schedule(spec)
    if kind == "auto":
        return f"auto-{value}"
    if kind == "fixed":
        return f"s{value[0]}"
    if kind == "list":
        return "s" + "-".join(str(v) for v in value)
    return f"s{value[0]}-to-{value[1]}" + ("-MS" if kind == "ms" else "")


def lr_at(epoch: int, *, base_lr: float, epochs: int) -> float:
    """Base LR ×0.1 for every milestone of ``fimcore.paper_lr_milestones(epochs)`` reached."""
    drops = sum(1 for m in fimcore.paper_lr_milestones(epochs) if epoch >= m)
    return base_lr * (0.1 ** drops)
