"""Per-sample kernel gradients of ``flax.linen.Conv`` from strided slices of the padded input.

Sample i's kernel gradient is ``J_i = Σ_t P_i[t]ᵀ g_i[t]`` with ``P_i`` its input patches (T output
positions × kernel offsets × channels) and ``g_i`` the output cotangent; the layer's Gram block is
then ``J_l J_lᵀ`` (materialised).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_kernel_per_sample"]


def _explicit_conv_padding(x, padding, kernel_size, strides, dilation):
    """``(x, pads)`` with Flax's padding rule resolved to explicit (low, high) pairs, or None.

    Mirrors ``flax.linen.Conv``: ``"CIRCULAR"``/``"REFLECT"`` and ``"CAUSAL"`` pad the input
    itself, ``"SAME"``/``"VALID"`` follow ``lax.padtype_to_pads``, ints and pairs are explicit.
    None when a pad is negative (cropping; left to the vmap path).
    """
    from flax.linen.linear import canonicalize_padding

    rank = len(kernel_size)
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    pad = canonicalize_padding(padding, rank)
    if pad in ("CIRCULAR", "REFLECT"):
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad]
        x = jnp.pad(x, [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)], mode=mode)
        pad = "VALID"
    elif pad == "CAUSAL":
        x = jnp.pad(x, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
        pad = "VALID"
    if isinstance(pad, str):
        pad = lax.padtype_to_pads(x.shape[1:-1], dilated, strides, pad)
    pad = [tuple(int(v) for v in p) for p in pad]
    if any(v < 0 for p in pad for v in p):
        return None
    return x, pad


def conv_kernel_per_sample(module, x, g, *, over_samples="auto"):
    """Per-sample kernel gradients (B, *kernel_size, C/groups, O) of a ``flax.linen.Conv`` call.

    Sample i's gradient is ``Σ_t P_i[t]ᵀ g_i[t]``, with ``P_i`` its input patches (T positions ×
    kernel offsets × channels) taken by strided slices of the padded input. On CPU the samples go
    through ``lax.map``, one plain matrix product each, instead of ``vmap`` of the convolution's
    VJP (a convolution grouped over the batch; ``over_samples`` chooses). On accelerators, where a loop of
    B small products would leave the device idle, the same body is ``vmap``-ed into one batched
    product.

    Args:
        module: the bound or unbound ``nn.Conv`` (its strides, padding, dilations, groups).
        x: the call's input, (B, *spatial, C) (one batch axis).
        g: the cotangent at the call's output, (B, *out_spatial, O).
        over_samples: ``"map"``, ``"vmap"`` or ``"auto"`` (``"map"`` on the CPU backend).

    Returns:
        The per-sample kernel gradients, or None where this form does not apply (input
        dilation, a kernel mask, unshared weights, negative padding): use the vmap path then.
    """
    kernel_size = tuple(module.kernel_size) if not isinstance(module.kernel_size, int) else (module.kernel_size,)
    rank = len(kernel_size)

    def spread(v):
        v = 1 if v is None else v
        return (v,) * rank if isinstance(v, int) else tuple(v)

    strides, in_dil, dil = spread(module.strides), spread(module.input_dilation), spread(module.kernel_dilation)
    if (any(d != 1 for d in in_dil) or getattr(module, "mask", None) is not None
            or not getattr(module, "shared_weights", True) or x.ndim != rank + 2):
        return None
    resolved = _explicit_conv_padding(x, module.padding, kernel_size, strides, dil)
    if resolved is None:
        return None
    x, pads = resolved
    x = jnp.pad(x, [(0, 0)] + pads + [(0, 0)])
    out = g.shape[1:-1]
    groups = module.feature_group_count
    c_in, c_out = x.shape[-1], g.shape[-1]
    t = math.prod(out)
    dtype = jnp.result_type(x, g)
    x, g = x.astype(dtype), g.astype(dtype)

    def one(pair):
        xi, gi = pair
        cols = []
        for offset in itertools.product(*(range(k) for k in kernel_size)):
            start = [o * d for o, d in zip(offset, dil)]
            stop = [s0 + (n - 1) * st + 1 for s0, n, st in zip(start, out, strides)]
            cols.append(lax.slice(xi, start + [0], stop + [c_in], list(strides) + [1]).reshape(t, c_in))
        gi = gi.reshape(t, c_out)
        if groups == 1:
            patches = jnp.concatenate(cols, axis=-1)                         # (T, K·C)
            return jnp.matmul(patches.T, gi, precision=module.precision)     # (K·C, O)
        patches = jnp.stack(cols, axis=1).reshape(t, len(cols), groups, c_in // groups)
        per_group = jnp.einsum("tkgc,tgo->kcgo", patches, gi.reshape(t, groups, c_out // groups),
                               precision=module.precision)
        return per_group.reshape(len(cols) * (c_in // groups), c_out)

    if over_samples == "auto":
        over_samples = "map" if jax.default_backend() == "cpu" else "vmap"
    if over_samples not in ("map", "vmap"):
        raise ValueError(f"over_samples must be 'auto', 'map' or 'vmap'; received {over_samples!r}.")
    per_sample = lax.map(one, (x, g)) if over_samples == "map" else jax.vmap(one)((x, g))
    return per_sample.reshape((x.shape[0],) + kernel_size + (c_in // groups, c_out))
