"""Measure-guided dynamic sampling: host-side batch-size policies (floats in, int out).

See :mod:`fimcore.policy.base` for the machinery every rule shares (bounds, multiple-of,
hysteresis, LR coupling, decision log, checkpoints) and :mod:`fimcore.policy.rules` for the
rules (noise scale, adaptive-sampling tests, the (C̄_K, L_K) plane).
"""

from .base import (BatchSizePolicy, Constraints, Decision, PolicyState, Rule, policy_init,
                   policy_update)
from .batches import PolicyBatches
from .rules import RULES, NoiseScaleRule, NormTestRule, PlaneRule

__all__ = ["BatchSizePolicy", "Constraints", "Decision", "NoiseScaleRule", "NormTestRule",
           "PlaneRule", "PolicyBatches", "PolicyState", "RULES", "Rule", "policy_init", "policy_update"]
