"""``--batch-schedule auto:<rule>``: a batch size a fimcore.policy rule sets between steps.

The run starts at ``--batch-size`` and feeds every measurement to a
``fimcore.policy.BatchSizePolicy``; a change takes effect from the next iteration (the rest of
the epoch is cut into batches of the new size). Rules: ``noise_scale``, ``norm_test``, ``plane``
(see :mod:`fimcore.policy.rules`). ``--policy-options`` sets constraints and rule options as
``key=value`` pairs separated by commas:

* constraints: ``min`` (default: the initial size), ``max`` (default: 8 × the initial size),
  ``multiple_of`` (1), ``patience`` (3), ``max_growth`` (2), ``allow_shrink`` (false),
  ``max_shrink`` (2), ``lr_coupling`` (``none``, ``linear`` or ``sqrt``);
* ``noise_scale``: ``scale`` (1), ``decay`` (0.9, of the noise-scale EMAs);
* ``norm_test``: ``test`` (``norm``, ``inner_product``, ``augmented``), ``theta`` (0.9), ``nu`` (1);
* ``plane``: ``slope_ratio`` (0.5), ``window`` (5), ``growth`` (2), ``c_bar_max`` (none).

The policy's state travels in the epoch checkpoint, so a resumed run takes the same decisions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import fimcore
from fimcore.policy import RULES, BatchSizePolicy, Constraints
from fimcore.stats import BatchTests, NoiseScale

__all__ = ["AdaptiveSchedule", "parse_options"]

_CONSTRAINT_KEYS = {"min": "min_size", "max": "max_size", "multiple_of": "multiple_of",
                    "patience": "patience", "max_growth": "max_growth",
                    "allow_shrink": "allow_shrink", "max_shrink": "max_shrink",
                    "lr_coupling": "lr_coupling"}


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text.strip()


def parse_options(text: str | None) -> dict[str, Any]:
    """``"theta=0.5,patience=2"`` → ``{"theta": 0.5, "patience": 2}``.

    Raises:
        ValueError: an entry without ``=``.

    Example:
        >>> parse_options("theta=0.5, lr_coupling=sqrt, allow_shrink=true")
        {'theta': 0.5, 'lr_coupling': 'sqrt', 'allow_shrink': True}
    """
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"--policy-options must be key=value pairs separated by commas; "
                             f"received {part.strip()!r} in {text!r}.")
        key, value = part.split("=", 1)
        out[key.strip()] = _value(value)
    return out


class AdaptiveSchedule:
    """The batch schedule of an ``auto:<rule>`` run (the interface of ``StagedBatchSchedule``).

    Args:
        rule_name: a key of :data:`fimcore.policy.RULES`.
        initial: the first batch size.
        options: parsed ``--policy-options``.

    Raises:
        ValueError: an unknown rule or option, or an option the rule or constraints refuse.
    """

    def __init__(self, rule_name: str, initial: int, options: dict[str, Any]):
        if rule_name not in RULES:
            raise ValueError(f"auto:<rule> needs a rule in {sorted(RULES)}; received {rule_name!r}.")
        rule_cls = RULES[rule_name]
        opts = dict(options)
        self.decay = opts.pop("decay", 0.9)
        constraint_args = {"min_size": initial, "max_size": 8 * initial}
        for key in list(opts):
            if key in _CONSTRAINT_KEYS:
                constraint_args[_CONSTRAINT_KEYS[key]] = opts.pop(key)
        rule_fields = {f.name for f in dataclasses.fields(rule_cls)}
        unknown = sorted(set(opts) - rule_fields)
        if unknown:
            raise ValueError(f"--policy-options has keys {unknown} that neither the constraints "
                             f"({sorted(_CONSTRAINT_KEYS)}) nor rule {rule_name!r} "
                             f"({sorted(rule_fields)}) take, plus 'decay' for the noise scale.")
        if constraint_args.get("lr_coupling") == "none":
            constraint_args["lr_coupling"] = None
        self.rule = rule_cls(**opts)
        self.policy = BatchSizePolicy(self.rule, initial, Constraints(**constraint_args))
        self._sizes = [self.policy.batch_size]

    def statistics(self) -> tuple:
        """The tracker statistics the rule reads (besides C̄_K and L_K)."""
        if self.rule.name == "noise_scale":
            return (NoiseScale(decay=self.decay),)
        if self.rule.name == "norm_test":
            return (BatchTests(),)
        return ()

    def batch_size(self, epoch: int) -> int:
        """The size in force (the epoch does not decide it)."""
        return self.policy.batch_size

    def stage(self, epoch: int) -> int:
        """How many times the size has changed so far."""
        return len(self.policy.decisions)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The sizes used so far, in order."""
        return tuple(self._sizes)

    @property
    def lr_factor(self) -> float:
        """Product of the LR factors of the changes so far (1 without LR coupling)."""
        return self.policy.lr_factor

    def update(self, measurement: fimcore.Measurement) -> fimcore.policy.Decision | None:
        """Feed a measurement; the decision it caused, or None."""
        before = len(self.policy.decisions)
        self.policy.update(measurement)
        if len(self.policy.decisions) == before:
            return None
        self._sizes.append(self.policy.batch_size)
        return self.policy.decisions[-1]

    def state_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict(), "sizes": list(self._sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self._sizes = list(state["sizes"])
