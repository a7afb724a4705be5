r"""The batch-size rules: noise scale, adaptive-sampling tests, and the (C̄_K, L_K) plane.

Each rule reads floats of one measurement record and proposes a target batch size; the shared
machinery of :mod:`fimcore.policy.base` clips, snaps, bounds, debounces and logs it.

* :class:`NoiseScaleRule` — grow toward the measured gradient noise scale. McCandlish, Kaplan,
  Amodei et al. (arXiv 1812.06162, 2018) find the critical batch size, beyond which larger
  batches stop buying proportionally fewer steps, close to the simple noise scale
  :math:`B_{\mathrm{simple}} = \operatorname{tr}\Sigma/|g|^2`; the target is
  ``scale`` × the EMA-smoothed estimate (``B_simple_ema`` of :class:`fimcore.stats.NoiseScale`).
* :class:`NormTestRule` — adaptive sampling. Byrd, Chin, Nocedal & Wu (Math. Program. 134, 2012)
  grow the sample when the norm test fails, to the size at which it would pass: the test
  statistic scales as 1/B, so :math:`B_{\mathrm{new}} = B\,(\theta_{\max}/\theta)^2`;
  Bollapragada, Byrd & Nocedal (SIAM J. Optim. 28(4), 2018) do the same with the inner-product
  test and, in the augmented test, the orthogonality test with its own ν. The statistics come
  from :class:`fimcore.stats.BatchTests`.
* :class:`PlaneRule` — the paper's suggestion made explicit (Liao et al., TPAMI 2020: C̄_K and
  L_K "can be used to guide dynamic sampling"). Training progress per iteration shows in the
  slope of :math:`L_K`: when the slope over the last ``window`` measurements falls under
  ``slope_ratio`` × the average slope since the start, the step energy has dropped, and a larger
  batch (the paper's later stages) is proposed, by ``growth``; never while :math:`\bar C_K`
  exceeds ``c_bar_max`` (large batches raise C̄_K, and the paper's good runs sit in a band of it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .base import Rule

__all__ = ["NoiseScaleRule", "NormTestRule", "PlaneRule", "RULES"]


def _finite(m: dict[str, Any], key: str) -> float | None:
    v = m.get(key)
    if v is None or isinstance(v, bool):
        return None
    v = float(v)
    return v if math.isfinite(v) or v == math.inf else None


@dataclasses.dataclass(frozen=True)
class NoiseScaleRule(Rule):
    """Target = ``scale`` × ``m[key]`` (default the EMA of :math:`B_{\\mathrm{simple}}`).

    Example:
        >>> NoiseScaleRule(scale=0.5).propose(None, {"B_simple_ema": 200.0}, 32)[1]
        100.0
    """

    scale: float = 1.0
    key: str = "B_simple_ema"
    name = "noise_scale"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive finite number; received {self.scale!r}.")

    def propose(self, state, m, batch):
        v = _finite(m, self.key)
        if v is None or v <= 0:
            return state, None, f"{self.key} unavailable"
        return state, self.scale * v, f"{self.key} = {v:.4g} → target {self.scale * v:.4g}"


TESTS = ("norm", "inner_product", "augmented")


@dataclasses.dataclass(frozen=True)
class NormTestRule(Rule):
    r"""Grow to the size at which the adaptive-sampling test would pass.

    Args:
        test: ``"norm"`` (Byrd et al.), ``"inner_product"`` or ``"augmented"`` (inner-product
            and orthogonality tests, Bollapragada et al.).
        theta: the test's θ (the tests pass when the largest passing θ is at most this).
        nu: the orthogonality test's ν (``"augmented"`` only).

    Defaults θ = 0.9, ν = 1.0 are this library's starting points, not the papers' tuned values.

    Example:
        >>> NormTestRule(theta=0.5).propose(None, {"norm_test": 1.0}, 16)[1]
        64.0
        >>> NormTestRule(theta=0.5).propose(None, {"norm_test": 0.25}, 16)[1] is None
        True
    """

    test: str = "norm"
    theta: float = 0.9
    nu: float = 1.0
    name = "norm_test"

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"test must be one of {TESTS}; received {self.test!r}.")
        for name in ("theta", "nu"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number; received {v!r}.")

    def propose(self, state, m, batch):
        keys = {"norm": [("norm_test", self.theta)],
                "inner_product": [("inner_product_test", self.theta)],
                "augmented": [("inner_product_test", self.theta), ("orthogonality_test", self.nu)]}
        targets, parts = [], []
        for key, bound in keys[self.test]:
            v = _finite(m, key)
            if v is None:
                return state, None, f"{key} unavailable"
            parts.append(f"{key} = {v:.3g} vs {bound:g}")
            if v > bound:
                targets.append(batch * (v / bound) ** 2)
        if not targets:
            return state, None, "; ".join(parts) + ": passes"
        target = max(targets)
        return state, target, "; ".join(parts) + f": fails → target {target:.4g}"


@dataclasses.dataclass(frozen=True)
class PlaneRule(Rule):
    r"""Grow when the slope of :math:`L_K` flattens, unless :math:`\bar C_K` is already high.

    Args:
        slope_ratio: grow when (slope over the last ``window`` measurements) / (average slope
            since the start) falls below this, in (0, 1).
        window: measurements in the recent window (≥ 2).
        growth: proposed factor when it does (> 1).
        c_bar_max: no growth while :math:`\bar C_K` exceeds this (None: no bound).

    Slopes are per training iteration: the iterations come from the records' ``weight``
    (the iterations each measurement stands for), :math:`L_K` from ``L``, :math:`\bar C_K` from
    ``C_bar``; both count from the start of training (feed the policy every measurement).

    Example:
        >>> rule = PlaneRule(window=2, slope_ratio=0.5)
        >>> s = rule.init()
        >>> for L in (1.0, 2.0, 3.0, 3.2):
        ...     s, target, why = rule.propose(s, {"L": L, "weight": 10, "C_bar": 100.0}, 16)
        >>> target
        32.0
    """

    slope_ratio: float = 0.5
    window: int = 5
    growth: float = 2.0
    c_bar_max: float | None = None
    name = "plane"

    def __post_init__(self) -> None:
        if not 0 < self.slope_ratio < 1:
            raise ValueError(f"slope_ratio must be in (0, 1); received {self.slope_ratio!r}.")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an int >= 2; received {self.window!r}.")
        if not (math.isfinite(self.growth) and self.growth > 1):
            raise ValueError(f"growth must be a finite number > 1; received {self.growth!r}.")
        if self.c_bar_max is not None and not self.c_bar_max > 0:
            raise ValueError(f"c_bar_max must be None or > 0; received {self.c_bar_max!r}.")

    def init(self):
        return [0.0, []]          # iterations since the start of training, recent (iters, L_K)

    def restore(self, state):
        return [float(state[0]), [list(p) for p in state[1]]]

    def propose(self, state, m, batch):
        iters, recent = state[0], [list(p) for p in state[1]]
        L, w = _finite(m, "L"), _finite(m, "weight")
        if L is None or w is None:
            return state, None, "L or weight unavailable"
        iters += w
        recent = (recent + [[iters, L]])[-self.window:]
        new_state = [iters, recent]
        if len(recent) < self.window:
            return new_state, None, "window filling"
        overall = L / iters               # L_K and iterations both count from the start
        span = recent[-1][0] - recent[0][0]
        recent_slope = (recent[-1][1] - recent[0][1]) / span if span > 0 else 0.0
        ratio = recent_slope / overall if overall > 0 else math.inf
        c_bar = _finite(m, "C_bar")
        if ratio >= self.slope_ratio:
            return new_state, None, f"L_K slope ratio {ratio:.3g} ≥ {self.slope_ratio:g}"
        if self.c_bar_max is not None and c_bar is not None and c_bar > self.c_bar_max:
            return new_state, None, f"C̄_K = {c_bar:.4g} above {self.c_bar_max:g}: no growth"
        return new_state, batch * self.growth, (f"L_K slope ratio {ratio:.3g} < {self.slope_ratio:g}"
                                                f" → ×{self.growth:g}")


#: rule names of ``--batch-schedule auto:<rule>`` and checkpoints
RULES = {"noise_scale": NoiseScaleRule, "norm_test": NormTestRule, "plane": PlaneRule}
