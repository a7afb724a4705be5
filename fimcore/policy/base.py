r"""Closed-loop batch-size policies: the shared machinery (constraints, hysteresis, LR coupling).

A policy turns the measures of each measured step (floats: :math:`\bar C_K`, :math:`L_K`, the
noise scale, the sampling tests, ...) into the batch size of the next steps (an int). It is
host-side on purpose: a new batch size changes array shapes, so it is never traced.

Every rule proposes a *target* size from one measurement (:meth:`Rule.propose`); this module
turns targets into decisions the same way for every rule:

1. the target is clipped to ``[min_size, max_size]``, snapped to a multiple of ``multiple_of``
   (up for growth, down for shrinkage), and a single change is bounded by the growth factors
   ``max_growth`` (and ``max_shrink`` when shrinking is allowed);
2. **hysteresis**: the size changes only when ``patience`` consecutive measurements propose a
   change in the same direction (AdaptDL needed this: sizes oscillated when every estimate was
   obeyed); the change then goes to the most conservative of those targets;
3. the learning rate may follow (``lr_coupling``): ``"linear"`` scales it by
   :math:`b_{\mathrm{new}}/b_{\mathrm{old}}` (Goyal et al. 2017, arXiv 1706.02677),
   ``"sqrt"`` by :math:`\sqrt{b_{\mathrm{new}}/b_{\mathrm{old}}}` (Krizhevsky 2014,
   arXiv 1404.5997; Hoffer et al. 2017), ``None`` keeps it (the paper's dynamic sampling);
4. every change is logged with the measurement it came from and the rule's reason.

The pure pair :func:`policy_init` / :func:`policy_update` works on a NamedTuple of Python
numbers; :class:`BatchSizePolicy` wraps it with ``state_dict()`` / ``load_state_dict()`` for
checkpoints, so a resumed run takes the same decisions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

__all__ = ["BatchSizePolicy", "Constraints", "Decision", "PolicyState", "Rule", "policy_init",
           "policy_update"]

LR_COUPLINGS = (None, "linear", "sqrt")


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Bounds every rule obeys.

    Args:
        min_size, max_size: the batch size stays in ``[min_size, max_size]``.
        multiple_of: sizes are multiples of this (device-friendly shapes; a bounded set of
            shapes also bounds recompilation under ``jax.jit``).
        patience: consecutive measurements that must agree before the size changes (≥ 1).
        max_growth: largest factor of one growth step (> 1).
        allow_shrink: whether a rule may lower the size; ``max_shrink`` bounds one step (> 1).
        lr_coupling: ``None``, ``"linear"`` or ``"sqrt"`` (see the module docstring).

    Raises:
        ValueError: inconsistent bounds or an unknown coupling.
    """

    min_size: int = 1
    max_size: int = 4096
    multiple_of: int = 1
    patience: int = 3
    max_growth: float = 2.0
    allow_shrink: bool = False
    max_shrink: float = 2.0
    lr_coupling: str | None = None

    def __post_init__(self) -> None:
        for name in ("min_size", "max_size", "multiple_of", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; received {v!r}.")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size must be <= max_size; received {self.min_size} > {self.max_size}.")
        if (self.max_size // self.multiple_of) * self.multiple_of < self.min_size:
            raise ValueError(f"no multiple of {self.multiple_of} lies in [{self.min_size}, "
                             f"{self.max_size}]; widen the bounds or lower multiple_of.")
        for name in ("max_growth", "max_shrink"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 1):
                raise ValueError(f"{name} must be a finite number > 1; received {v!r}.")
        if self.lr_coupling not in LR_COUPLINGS:
            raise ValueError(f"lr_coupling must be one of {LR_COUPLINGS}; received {self.lr_coupling!r}.")

    def legal(self, size: float, *, up: bool) -> int:
        """``size`` clipped to the bounds and snapped to a multiple (up when growing)."""
        snapped = _snap_up(size, self.multiple_of) if up else _snap_down(size, self.multiple_of)
        low = _snap_up(self.min_size, self.multiple_of)
        high = _snap_down(self.max_size, self.multiple_of)
        return int(min(max(snapped, low), high))


def _snap_up(x: float, m: int) -> int:
    return int(math.ceil(x / m - 1e-12)) * m


def _snap_down(x: float, m: int) -> int:
    return max(int(math.floor(x / m + 1e-12)) * m, m)


class Decision(NamedTuple):
    """One batch-size change: at which measurement, from what to what, LR factor, and why."""

    step: int
    old: int
    new: int
    lr_factor: float
    reason: str


class PolicyState(NamedTuple):
    """The policy's whole state (Python numbers): current size, pending direction, its streak,
    the most conservative target of the streak, the measurements seen, the rule's own state."""

    batch_size: int
    direction: int
    streak: int
    pending: int
    steps: int
    rule: Any


class Rule:
    """A batch-size rule: ``propose(state, m, batch) -> (new rule state, target or None, reason)``.

    ``m`` maps measure names to floats (a :class:`fimcore.Measurement`'s ``to_dict()``, or any
    dict with the fields the rule reads); a target of None means "no opinion this step".
    Subclasses are frozen dataclasses whose fields are their options (JSON-serialisable).
    """

    name = "rule"
    needs: tuple[str, ...] = ()

    def init(self) -> Any:
        return None

    def propose(self, state: Any, m: dict[str, Any], batch: int) -> tuple[Any, float | None, str]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def policy_init(rule: Rule, initial: int, constraints: Constraints) -> PolicyState:
    """The state before any measurement, at batch size ``initial`` (made legal).

    Example:
        >>> from fimcore.policy import Constraints, NoiseScaleRule, policy_init
        >>> policy_init(NoiseScaleRule(), 30, Constraints(multiple_of=8)).batch_size
        32
    """
    if isinstance(initial, bool) or not isinstance(initial, int) or initial < 1:
        raise ValueError(f"initial must be a positive int batch size; received {initial!r}.")
    return PolicyState(constraints.legal(initial, up=True), 0, 0, 0, 0, rule.init())


def policy_update(state: PolicyState, m: dict[str, Any], rule: Rule,
                  constraints: Constraints) -> tuple[PolicyState, Decision | None]:
    """One measurement in; the next state and the decision taken (None: the size stays).

    Missing or non-finite inputs give the rule no opinion and reset the streak (hysteresis
    restarts after a gap in the evidence).
    """
    rule_state, target, reason = rule.propose(state.rule, m, state.batch_size)
    b = state.batch_size
    steps = state.steps + 1
    direction = 0
    legal = b
    if target is not None and math.isfinite(target):
        if target > b:
            legal = constraints.legal(min(target, b * constraints.max_growth), up=True)
        elif target < b and constraints.allow_shrink:
            legal = constraints.legal(max(target, b / constraints.max_shrink), up=False)
        direction = (legal > b) - (legal < b)
    if direction == 0:
        return PolicyState(b, 0, 0, 0, steps, rule_state), None
    same = direction == state.direction
    streak = state.streak + 1 if same else 1
    pending = (min(state.pending, legal) if direction > 0 else max(state.pending, legal)) if same else legal
    if streak < constraints.patience:
        return PolicyState(b, direction, streak, pending, steps, rule_state), None
    factor = pending / b
    lr_factor = (factor if constraints.lr_coupling == "linear" else
                 math.sqrt(factor) if constraints.lr_coupling == "sqrt" else 1.0)
    decision = Decision(steps, b, pending, lr_factor, f"{rule.name}: {reason} "
                        f"({constraints.patience} consecutive measurement(s))")
    return PolicyState(pending, 0, 0, 0, steps, rule_state), decision


class BatchSizePolicy:
    """Stateful wrapper: ``update(measurement) -> batch size``, a decision log, checkpoints.

    Args:
        rule: a :class:`Rule` (see :mod:`fimcore.policy.rules`).
        initial: the batch size to start from.
        constraints: a :class:`Constraints` (default: no multiple, patience 3, growth ≤ 2×).

    Example:
        >>> from fimcore.policy import BatchSizePolicy, Constraints, NormTestRule
        >>> p = BatchSizePolicy(NormTestRule(theta=0.5), 16, Constraints(patience=2, max_size=64))
        >>> [p.update({"norm_test": 1.0}) for _ in range(3)]
        [16, 32, 32]
        >>> p.decisions[0].reason.startswith("norm_test")
        True
    """

    def __init__(self, rule: Rule, initial: int, constraints: Constraints | None = None):
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a fimcore.policy Rule; received {type(rule).__name__}.")
        self.rule = rule
        self.constraints = constraints if constraints is not None else Constraints()
        self.state = policy_init(rule, initial, self.constraints)
        self.decisions: list[Decision] = []
        self.lr_factor = 1.0

    @property
    def batch_size(self) -> int:
        """The batch size in force."""
        return self.state.batch_size

    def update(self, measurement: Any) -> int:
        """Feed one measurement (a ``Measurement`` or a dict of floats); return the batch size."""
        m = measurement.to_dict() if hasattr(measurement, "to_dict") else dict(measurement)
        self.state, decision = policy_update(self.state, m, self.rule, self.constraints)
        if decision is not None:
            self.decisions.append(decision)
            self.lr_factor *= decision.lr_factor
        return self.state.batch_size

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable snapshot (rule and constraints included)."""
        return {"format": "fimcore.BatchSizePolicy/1", "rule": self.rule.name,
                "rule_config": self.rule.config(), "constraints": dataclasses.asdict(self.constraints),
                "state": {**self.state._asdict(), "rule": self.state.rule},
                "decisions": [d._asdict() for d in self.decisions], "lr_factor": self.lr_factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot.

        Raises:
            ValueError: not a policy snapshot, or one of another rule.
        """
        if not isinstance(state, dict) or state.get("format") != "fimcore.BatchSizePolicy/1":
            raise ValueError("state must come from BatchSizePolicy.state_dict() (format "
                             "'fimcore.BatchSizePolicy/1').")
        if state["rule"] != self.rule.name or state["rule_config"] != self.rule.config():
            raise ValueError(f"this policy runs {self.rule.name} {self.rule.config()}; the snapshot "
                             f"holds {state['rule']} {state['rule_config']}. Build the policy with the "
                             "same rule before loading.")
        self.constraints = Constraints(**state["constraints"])
        s = state["state"]
        self.state = PolicyState(s["batch_size"], s["direction"], s["streak"], s["pending"],
                                 s["steps"], self.rule.restore(s["rule"]) if hasattr(self.rule, "restore")
                                 else s["rule"])
        self.decisions = [Decision(**d) for d in state["decisions"]]
        self.lr_factor = float(state["lr_factor"])
