"""Per-sample convolution weight gradients, two exact ways, chosen per layer shape.

For sample i, ``J_i[o, c, k] = Σ_t g_i[o, t] · x_i[c, t·stride + k·dilation]`` (within a group).

* ``"grouped"``: one convolution backward over the batch folded into channels (groups = B·groups):
  the input (1, B·C, …) and output gradient (1, B·O, …) give a weight gradient of shape
  (B·O, C/groups, k…), i.e. every sample's weight gradient in one library call.
* ``"unfold"``: a strided view of the padded input as patches (no copy until the reshape), then
  one batched GEMM ``J_i = G_i X_iᵀ`` per sample and group.
* ``"channels_last"`` (ungrouped layers): the same patches taken from a channels-last copy of the
  padded input, so each patch row is whole runs of C contiguous channels, and one batched GEMM
  ``J_i = G_i P_i`` with the output gradient in its own (O, T) layout (no transpose copy).

Which is faster depends on the shape and the CPU, so ``"auto"`` times the candidates once per
shape and caches the winner for the process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ConvSpec", "per_sample", "per_sample_shape", "per_sample_into", "weight_layout", "patches",
           "pick_method", "channel_chunks", "sample_chunk", "Workspace", "METHOD_CACHE"]

METHOD_CACHE: dict = {}


@dataclass
class ConvSpec:
    dim: int
    kernel: tuple
    stride: list
    dilation: list
    groups: int
    in_channels: int
    out_channels: int

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel)


def channel_chunks(spec: ConvSpec, per_channel_bytes: int, budget: int | None):
    """Output-channel ranges whose per-sample gradients fit ``budget`` (whole groups if groups > 1)."""
    O = spec.out_channels
    if budget is None or per_channel_bytes * O <= budget:
        return [(0, O)]
    unit = 1 if spec.groups == 1 else O // spec.groups
    step = max(unit, (budget // max(per_channel_bytes, 1)) // unit * unit)
    return [(o, min(o + step, O)) for o in range(0, O, step)]


SAMPLE_CHUNK_BYTES = 8 << 20
"""Bytes of one sample chunk's patch matrix (T × C/groups·K entries per sample). Forming every
sample's weight gradient in one call at B = 128 builds patch matrices (or, for the grouped
convolution, its internal scratch) of 75 MB on a 16-channel 32×32 layer: above glibc's largest
mmap threshold, so they are mapped, faulted in page by page and unmapped on every step (18,000
page faults per layer) and run 3–6× slower than the same work in chunks of 16–64 samples whose
temporaries stay in the heap and in cache."""


class Workspace:
    """Flat buffers reused by the layers of one recorder in turn, one per (dtype, device).

    Each layer's per-sample gradients J_l (B × p_l) are dead once ``J_l J_lᵀ`` and Σ_i J_i are
    formed, before the next layer's backward runs, so one buffer of the largest layer's size
    serves every layer of every step: no per-layer allocation, no pages handed back to the kernel
    and faulted in again each step. It holds max_l B·p_l entries between steps (the largest
    single layer, never B × P).
    """

    def __init__(self) -> None:
        self._buffers: dict = {}

    def take(self, shape, dtype, device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` on the shared buffer (valid until the next ``take``)."""
        n = math.prod(shape)
        key = (dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            self._buffers.pop(key, None)
            buf = self._buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


CHUNK_ABOVE_BYTES = 32 << 20
"""The batch is split only when its whole patch matrix exceeds this (glibc's largest dynamic mmap
threshold on 64-bit Linux, above which every step maps and faults in fresh pages). Below it one call
over the batch is kept: with chunks at every size, ResNet-20 steps at B = 32 (no patch matrix above
19 MB) measured ratios about 0.1 higher at two threads than with one call per layer (whole-step
runs, not an isolated check)."""


def sample_chunk(spec: ConvSpec, batch: int, positions: int, element_size: int) -> int:
    """Samples per call: the whole batch unless its patch matrix exceeds :data:`CHUNK_ABOVE_BYTES`,
    then as many as fit :data:`SAMPLE_CHUNK_BYTES` (at least 1)."""
    per = positions * (spec.in_channels // spec.groups) * spec.kernel_numel * element_size
    if batch * per <= CHUNK_ABOVE_BYTES:
        return batch
    return max(1, min(batch, SAMPLE_CHUNK_BYTES // max(per, 1)))


def per_sample_shape(method: str, batch: int, spec: ConvSpec, o0: int, o1: int) -> tuple:
    """Shape of :func:`per_sample`'s result for ``batch`` samples (its method's own layout)."""
    g = spec.groups
    ipg = spec.in_channels // g
    if method == "grouped":
        return (batch, o1 - o0, ipg, *spec.kernel)
    if method == "channels_last" and g == 1:
        return (batch, o1 - o0, spec.kernel_numel * spec.in_channels)
    if g > 1:
        opg = spec.out_channels // g
        return (batch, o1 // opg - o0 // opg, ipg * spec.kernel_numel, opg)
    return (batch, 1, ipg * spec.kernel_numel, o1 - o0)


def per_sample_into(out, method: str, x, go, spec: ConvSpec, padding, o0: int, o1: int,
                    chunk: int) -> torch.Tensor:
    """:func:`per_sample` of the whole batch written into ``out`` (its shape:
    :func:`per_sample_shape`), ``chunk`` samples per call; returns ``out``."""
    B = x.shape[0]
    for i0 in range(0, B, chunk):
        i1 = min(i0 + chunk, B)
        per_sample(method, x[i0:i1], go[i0:i1], spec, padding, o0, o1, out=out[i0:i1])
    return out


def _grouped(x, go, spec: ConvSpec, padding, o0, o1):
    B = x.shape[0]
    g = spec.groups
    opg = spec.out_channels // g
    ipg = spec.in_channels // g
    if g == 1:
        xs, ng = x, 1
    else:
        g0, g1 = o0 // opg, o1 // opg
        xs, ng = x[:, g0 * ipg:g1 * ipg], g1 - g0
    n_o = o1 - o0
    gos = go[:, o0:o1]
    dummy = x.new_empty(()).expand(B * n_o, ipg, *spec.kernel)
    gw = torch.ops.aten.convolution_backward(
        gos.reshape(1, B * n_o, *go.shape[2:]), xs.reshape(1, -1, *x.shape[2:]), dummy, None,
        spec.stride, padding, spec.dilation, False, [0] * spec.dim, B * ng,
        [False, True, False])[1]
    return gw.view(B, n_o, ipg, *spec.kernel)


def _unfold_view(x, spec: ConvSpec, padding, out_shape):
    """(B, C, *out_spatial, *kernel) strided view of the zero-padded input."""
    if any(padding):
        pads = []
        for p in reversed(padding):
            pads += [p, p]
        x = F.pad(x, pads)
    x = x.contiguous()
    st = x.stride()
    d = spec.dim
    sizes = tuple(x.shape[:2]) + tuple(out_shape) + tuple(spec.kernel)
    strides = (st[0], st[1]) + tuple(st[2 + k] * spec.stride[k] for k in range(d)) \
        + tuple(st[2 + k] * spec.dilation[k] for k in range(d))
    return x.as_strided(sizes, strides)


def patches(x, go, spec: ConvSpec, padding):
    """Per-group patches A (groups, B, T, C/groups·K) and output gradients (groups, B, T, O/groups)."""
    B = x.shape[0]
    d = spec.dim
    g = spec.groups
    v = _unfold_view(x, spec, padding, go.shape[2:])
    perm = (0,) + tuple(range(2, 2 + d)) + (1,) + tuple(range(2 + d, 2 + 2 * d))
    T = go[0, 0].numel()
    A = v.permute(perm).reshape(B, T, g, -1).permute(2, 0, 1, 3)
    Gg = go.reshape(B, g, spec.out_channels // g, T).permute(1, 0, 3, 2)
    return A, Gg


def _unfold_factors(x, go, spec: ConvSpec, padding, o0, o1):
    B = x.shape[0]
    g = spec.groups
    opg = spec.out_channels // g
    ipg = spec.in_channels // g
    d = spec.dim
    T = go[0, 0].numel()
    v = _unfold_view(x, spec, padding, go.shape[2:])
    if g > 1:
        g0, g1 = o0 // opg, o1 // opg
        v = v[:, g0 * ipg:g1 * ipg]
        ng, n_pg = g1 - g0, opg
    else:
        ng, n_pg = 1, o1 - o0
    # (B, C, *kernel, *out): runs of the output width stay contiguous, so this copy is cheap
    perm = (0, 1) + tuple(range(2 + d, 2 + 2 * d)) + tuple(range(2, 2 + d))
    X = v.permute(perm).reshape(B, ng, ipg * spec.kernel_numel, T)                      # (B, ng, CK, T)
    Gg = go[:, o0:o1].reshape(B, ng, n_pg, T)
    return X, Gg.transpose(-1, -2)                          # J = X Ggᵀ: (B, ng, CK, n_pg)


def _channels_last_factors(x, go, spec: ConvSpec, padding, o0, o1):
    """(B, o1-o0, K·C) per-sample gradients, columns in (kernel offset, channel) order (groups = 1)."""
    B, C = x.shape[0], x.shape[1]
    d = spec.dim
    xl = x.movedim(1, -1)                                            # (B, *S, C) view
    pads = [0, 0]
    for p in reversed(padding):
        pads += [p, p]
    xl = F.pad(xl, pads) if any(padding) else xl.contiguous()        # one channels-last copy
    st = xl.stride()
    out_shape = go.shape[2:]
    sizes = (B, *out_shape, *spec.kernel, C)
    strides = (st[0], *(st[1 + k] * spec.stride[k] for k in range(d)),
               *(st[1 + k] * spec.dilation[k] for k in range(d)), st[-1])
    T = go[0, 0].numel()
    patches = xl.as_strided(sizes, strides).reshape(B, T, spec.kernel_numel * C)
    return go[:, o0:o1].reshape(B, o1 - o0, T), patches     # J = Gₒ P: (B, o1-o0, K·C)


def weight_layout(J: torch.Tensor, method: str, spec: ConvSpec, n_out: int) -> torch.Tensor:
    """Per-sample gradients of :func:`per_sample` as (B, n_out, C/groups, *kernel).

    The unfold method leaves each sample's gradient transposed, (groups, C/groups·K, O/groups),
    and the channels-last method with its columns in (offset, channel) order; both are as good
    for ``J Jᵀ`` (a column permutation) and are only rearranged when the weight's own layout is
    needed (the batch gradient, parameters reused within a step).
    """
    B = J.shape[0]
    if method == "unfold":
        J = J.transpose(-1, -2)
    elif method == "channels_last":
        return J.reshape(B, n_out, *spec.kernel, spec.in_channels).movedim(-1, 2)
    return J.reshape(B, n_out, spec.in_channels // spec.groups, *spec.kernel)


def per_sample(method: str, x, go, spec: ConvSpec, padding, o0: int, o1: int, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weight gradients of output channels [o0, o1), in the method's own layout.

    ``"grouped"`` gives (B, o1-o0, C/groups, *kernel); ``"unfold"`` and ``"channels_last"`` give
    column permutations of it; :func:`weight_layout` converts any of them to the weight's layout.
    """
    if method == "grouped":
        J = _grouped(x, go, spec, padding, o0, o1)
        return J if out is None else out.copy_(J)
    if method == "channels_last" and spec.groups == 1:
        a, b = _channels_last_factors(x, go, spec, padding, o0, o1)
        return torch.bmm(a, b) if out is None else torch.bmm(a, b, out=out)
    a, b = _unfold_factors(x, go, spec, padding, o0, o1)
    return torch.matmul(a, b) if out is None else torch.matmul(a, b, out=out)


def candidates(spec: ConvSpec) -> tuple[str, ...]:
    """The methods that apply to a layer (channels-last only without channel groups)."""
    return ("grouped", "unfold", "channels_last") if spec.groups == 1 else ("grouped", "unfold")


PROBE_SAMPLES = 16
"""Samples the candidates are timed on (per-sample work grows linearly with B, so a slice ranks
them as the whole batch would; timing all 128 samples three times per method made the first step
of a DenseNet-110 at B = 128, 100+ distinct layer shapes, take minutes)."""


PROBE_ROUNDS = 3
"""Interleaved timing rounds of the candidates (the fastest time of each counts)."""


def _time(fn, device) -> float:
    """Seconds of one call of ``fn`` (the device synchronised around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def pick_method(requested: str, x, go, spec: ConvSpec, padding) -> str:
    """``requested`` unless ``"auto"``: then the fastest method for this shape, timed once and cached.

    A requested ``"channels_last"`` on a grouped layer falls back to ``"unfold"``.
    """
    if requested == "channels_last" and spec.groups != 1:
        return "unfold"
    if requested != "auto":
        return requested
    key = (tuple(x.shape), tuple(go.shape), spec.kernel, tuple(spec.stride), tuple(padding),
           tuple(spec.dilation), spec.groups, x.dtype, x.device.type)
    method = METHOD_CACHE.get(key)
    if method is None:
        O = spec.out_channels
        xs, gs = x[:PROBE_SAMPLES], go[:PROBE_SAMPLES]
        times = dict.fromkeys(candidates(spec), math.inf)
        for _ in range(PROBE_ROUNDS):   # interleaved rounds: a burst of load hits every candidate
            for m in times:
                times[m] = min(times[m], _time(lambda m=m: per_sample(m, xs, gs, spec, padding, 0, O),
                                               x.device))
        method = min(times, key=times.get)
        METHOD_CACHE[key] = method
    return method
