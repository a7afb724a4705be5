"""Affine parameters of ``LayerNorm``, ``GroupNorm``, ``BatchNorm``, ``RMSNorm``, ``InstanceNorm``.

With x̂ the normalised input the layer captured (batch statistics for BatchNorm in train mode) and
δ the cotangent of the batch loss at its output, sample i's rows are

    scale_i = Σ_t x̂_it ⊙ δ_it,        bias_i = Σ_t δ_it,

the sums running over every axis except the batch and the feature axes. For BatchNorm in train
mode δ already carries the coupling through the batch statistics, so these are the per-sample
contributions to the batch gradient (they sum to it).
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["norm_rows"]


def norm_rows(module, x_hat, delta, feature_axes):
    """Per-sample ``{"scale": (B, *features), "bias": (B, *features)}`` of one norm-layer call."""
    reduce = tuple(ax for ax in range(1, delta.ndim) if ax not in feature_axes)
    out = {}
    if module.use_scale:
        out["scale"] = jnp.sum(x_hat.astype(delta.dtype) * delta, axis=reduce)
    if getattr(module, "use_bias", False):
        out["bias"] = jnp.sum(delta, axis=reduce)
    return out
