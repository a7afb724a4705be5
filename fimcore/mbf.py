r"""Mini-Block Fisher (MBF): the framework-free parts of the preconditioned gradient method.

Bahamou, Goldfarb & Ren, "A Mini-Block Fisher Method for Deep Neural Networks", AISTATS 2023
(PMLR 206:9191–9220), arXiv 2202.04124. The preconditioner is a block-diagonal approximation
of the damped empirical Fisher, each layer's block being itself block diagonal in small
*mini-blocks* :math:`F_{l,j}` that are factored in parallel:

* **fully connected** layer (d_in → d_out): one mini-block per output neuron o holding
  :math:`\tilde w_o = [W_{o,:}, b_o] \in \mathbb R^{d_{in}+1}`, i.e. d_out blocks of size
  (d_in+1)²; when :math:`d_{out}(d_{in}+1)^2` exceeds ``average_above`` entries one shared
  (d_in+1)² matrix, the mean of the mini-blocks
  :math:`\hat F^{avg} = \tfrac1{d_{out}}\bar G^\top\bar G` with
  :math:`\bar G = [\nabla_W L \mid \nabla_b L]`, is kept instead ("spatial averaging");
* **convolution** (c_out, c_in/groups, kernel κ = k_h·k_w): one κ×κ mini-block per (output,
  input-within-group) channel pair, :math:`w_{o,i} = \operatorname{vec} W[o,i,:,:]`; the bias gets
  size-1 blocks preconditioned without a square root, :math:`\mu_b/(\bar F_b+\lambda)`; the
  option ``conv_average`` keeps one κ×κ matrix per layer, the mean over all pairs
  ("MBF-CNN-Avg", which the paper reports slightly worse than per-pair blocks);
* **every other parameter** (norm layers, embeddings, …): the Adam-like direction
  :math:`\mu/(\sqrt v + \epsilon)`.

Curvature of a mini-block (``curvature``):

* ``"minibatch_outer"`` (the paper's experiments): :math:`\hat F_j = \bar g_j\bar g_j^\top`, with
  :math:`\bar g` the mini-batch mean gradient;
* ``"per_sample"`` (the exact empirical-Fisher block): :math:`\hat F_j = \tfrac1m\sum_n g_{n,j}g_{n,j}^\top`
  with :math:`g_n = \nabla\ell_n` the per-example loss gradients (larger than the mini-batch
  form by roughly the batch size m, so λ must be re-tuned);
* ``"sampled_labels"`` ("MBF-True"): :math:`\bar g` from a backward with labels sampled from the
  model's predictive distribution.

The update, per iteration t (T1 = ``curvature_every``, T2 = ``inverse_every``, β1 =
``momentum``, β2 = ``curvature_decay``, γ = ``weight_decay``, α = learning rate)::

    μ ← β1 μ + ḡ                                   (undamped momentum on the raw gradient)
    t mod T1 = 0:  F̄_j ← β2 F̄_j + (1−β2) F̂_j ;  v ← β2 v + (1−β2) ḡ∘ḡ
    t mod T2 = 0:  factor F̄_j + λI = L_j L_jᵀ      (Cholesky, no explicit inverse)
    p_j = (F̄_j + λI)⁻¹ μ_j ;  p_other = μ/(√v + ε) ;  p ← p + γθ ;  θ ← θ − α p

The one-pass warm start sets :math:`\bar F_j` (and v) to the arithmetic mean of the per-batch
estimates over the data before the first step. Without it the first refresh gives
:math:`\bar F = (1-\beta_2)\hat F` (no bias correction).

Defaults (the paper's CNN settings, with numerals reconstructed from its prose and the same
group's TNT code): λ = 0.003, β1 = β2 = 0.9, T1 = 10, T2 = 100; for autoencoders the paper used
T1 = 1, T2 = 20 and λ from a grid (3e-4 on MNIST).

**Gram view** (:func:`output_step_matrix`). For a full batch of n examples with output Jacobian
blocks :math:`J_j` and :math:`F_j = J_j^\top J_j/n`, the push-through identity
:math:`(J_j^\top J_j/n+\lambda I)^{-1}J_j^\top/n = J_j^\top(G_j+n\lambda I)^{-1}` with
:math:`G_j = J_jJ_j^\top` makes the idealised step change the outputs, to first order, by
:math:`\Delta u = -\eta\, S(\lambda)(u-y)`, :math:`S(\lambda) = \sum_j G_j(G_j+n\lambda I)^{-1}`,
whose eigenvalues lie in [0, b] for b mini-blocks.

This module holds the option validation, the partition description, the refresh schedule and
the array-API update rules; the framework adapters (``fimcore_adapters.torch.MBF``,
``fimcore_adapters.jax.mbf``) hold the gradients, the factorisations and the solves.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import array_api_compat
import numpy as np

__all__ = [
    "CURVATURES",
    "BlockLayout",
    "MBFOptions",
    "averaged_outer",
    "conv_layout",
    "dense_layout",
    "diagonal_layout",
    "ema",
    "is_curvature_step",
    "is_inverse_step",
    "outer_blocks",
    "output_step_matrix",
]

CURVATURES = ("minibatch_outer", "per_sample", "sampled_labels")
"""Accepted values of the ``curvature`` option (see the module docstring)."""


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; received {value!r}.")
    return int(value)


def _number(name: str, value, *, low: float, high: float | None = None, low_open: bool,
            high_open: bool = True) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low) if low_open else (value >= low)
        if ok and high is not None:
            ok = (value < high) if high_open else (value <= high)
    if not ok:
        lo = f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f" and {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must be a finite number {lo}{hi}; received {value!r}.")
    return float(value)


@dataclass(frozen=True)
class MBFOptions:
    """Validated MBF hyper-parameters (symbols as in the module docstring).

    Attributes:
        lr: learning rate α (≥ 0).
        damping: λ > 0, added to every mini-block before factoring (and to size-1 bias blocks).
        momentum: β1 in [0, 1).
        curvature_decay: β2 in [0, 1): weight of the old estimate in the EMA.
        weight_decay: γ ≥ 0, decoupled (added to the preconditioned direction).
        curvature_every: T1 ≥ 1, iterations between curvature refreshes.
        inverse_every: T2 ≥ T1, iterations between factorisations.
        curvature: one of :data:`CURVATURES`.
        average_above: a fully connected layer with more than this many block entries
            :math:`d_{out}(d_{in}+1)^2` keeps one averaged block (``math.inf``: never).
        eps: ε > 0 of the Adam-like direction.
        conv_average: one averaged κ×κ block per convolution instead of one per channel pair.

    Raises:
        ValueError: an option is outside its range (the message names it and what was received).

    Example:
        >>> MBFOptions(lr=1e-3).damping
        0.003
        >>> MBFOptions(lr=1e-3, curvature_every=10, inverse_every=5)
        Traceback (most recent call last):
        ...
        ValueError: inverse_every must be >= curvature_every (a factorisation between two refreshes repeats the last one); received inverse_every=5, curvature_every=10.
    """

    lr: float
    damping: float = 0.003
    momentum: float = 0.9
    curvature_decay: float = 0.9
    weight_decay: float = 0.0
    curvature_every: int = 10
    inverse_every: int = 100
    curvature: str = "minibatch_outer"
    average_above: float = 2 ** 24
    eps: float = 1e-8
    conv_average: bool = False

    def __post_init__(self) -> None:
        _number("lr", self.lr, low=0.0, low_open=False)
        _number("damping", self.damping, low=0.0, low_open=True)
        _number("momentum", self.momentum, low=0.0, high=1.0, low_open=False)
        _number("curvature_decay", self.curvature_decay, low=0.0, high=1.0, low_open=False)
        _number("weight_decay", self.weight_decay, low=0.0, low_open=False)
        _number("eps", self.eps, low=0.0, low_open=True)
        t1 = _positive_int("curvature_every", self.curvature_every)
        t2 = _positive_int("inverse_every", self.inverse_every)
        if t2 < t1:
            raise ValueError(
                "inverse_every must be >= curvature_every (a factorisation between two refreshes "
                f"repeats the last one); received inverse_every={t2}, curvature_every={t1}.")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}; received {self.curvature!r}.")
        a = self.average_above
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not a >= 0:
            raise ValueError(f"average_above must be a number >= 0 (math.inf: never average); "
                             f"received {a!r}.")
        if not isinstance(self.conv_average, bool):
            raise ValueError(f"conv_average must be a bool; received {self.conv_average!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


def is_curvature_step(t: int, curvature_every: int) -> bool:
    """True when iteration ``t`` (0-based) refreshes the curvature: ``t mod T1 == 0``."""
    return t % curvature_every == 0


def is_inverse_step(t: int, inverse_every: int) -> bool:
    """True when iteration ``t`` (0-based) re-factors the damped blocks: ``t mod T2 == 0``."""
    return t % inverse_every == 0


# ---------------------------------------------------------------------------------- partition


@dataclass(frozen=True)
class BlockLayout:
    """How one parameter group is preconditioned.

    Attributes:
        kind: ``"dense"``, ``"dense_averaged"``, ``"conv"``, ``"conv_averaged"``,
            ``"conv_bias"`` (size-1 blocks, no square root) or ``"diagonal"`` (Adam-like).
        block_size: side of one mini-block (1 for the diagonal kinds).
        num_blocks: mini-blocks the layer stands for (the averaged kinds store one of them).
        stored_entries: numbers held for the curvature (one matrix for the averaged kinds).

    Example:
        >>> dense_layout(1000, 784, has_bias=True, average_above=2 ** 24)
        BlockLayout(kind='dense_averaged', block_size=785, num_blocks=1000, stored_entries=616225)
        >>> conv_layout(64, 64, (3, 3)).stored_entries == 64 * 64 * 81
        True
    """

    kind: str
    block_size: int
    num_blocks: int
    stored_entries: int


def dense_layout(d_out: int, d_in: int, *, has_bias: bool, average_above: float) -> BlockLayout:
    """Partition of a fully connected layer: d_out blocks of size d_in (+1 with a bias)."""
    k = d_in + int(bool(has_bias))
    if d_out * k * k > average_above:
        return BlockLayout("dense_averaged", k, d_out, k * k)
    return BlockLayout("dense", k, d_out, d_out * k * k)


def conv_layout(c_out: int, c_in_per_group: int, kernel, *, conv_average: bool = False) -> BlockLayout:
    """Partition of a convolution kernel (c_out, c_in/groups, *kernel): κ×κ blocks per pair."""
    kappa = math.prod(int(k) for k in kernel)
    pairs = c_out * c_in_per_group
    if conv_average:
        return BlockLayout("conv_averaged", kappa, pairs, kappa * kappa)
    return BlockLayout("conv", kappa, pairs, pairs * kappa * kappa)


def diagonal_layout(numel: int, *, kind: str = "diagonal") -> BlockLayout:
    """Size-1 blocks: ``"diagonal"`` (Adam-like, square root) or ``"conv_bias"`` (no root)."""
    return BlockLayout(kind, 1, numel, numel)


# ------------------------------------------------------------------------- update rules (array API)


def ema(old, new, decay: float):
    r"""The curvature EMA :math:`\bar F \leftarrow \beta_2\bar F + (1-\beta_2)\hat F` (any namespace).

    Example:
        >>> float(ema(np.float64(1.0), np.float64(3.0), 0.9))
        1.2
    """
    return decay * old + (1.0 - decay) * new


def outer_blocks(rows):
    r"""Mini-block outer products: rows (..., k) → (..., k, k), :math:`\bar g_j\bar g_j^\top`.

    For a dense layer ``rows`` is :math:`\bar G = [\nabla_W L\mid\nabla_b L]` (d_out, d_in+1);
    for a convolution the kernel gradient as (c_out, c_in/groups, κ).

    Example:
        >>> outer_blocks(np.array([[1.0, 2.0]]))[0].tolist()
        [[1.0, 2.0], [2.0, 4.0]]
    """
    return rows[..., :, None] * rows[..., None, :]


def averaged_outer(rows):
    r"""The mean mini-block :math:`\tfrac1{n}\sum_j \bar g_j\bar g_j^\top` over all leading axes.

    ``rows`` is (..., k); the result (k, k) is ``R.mT @ R / n`` with R the rows flattened to
    (n, k), the "spatial averaging" of large dense layers and the MBF-CNN-Avg block.

    Example:
        >>> averaged_outer(np.array([[1.0, 0.0], [0.0, 2.0]])).tolist()
        [[0.5, 0.0], [0.0, 2.0]]
    """
    xp = array_api_compat.array_namespace(rows)
    k = rows.shape[-1]
    flat = xp.reshape(rows, (-1, k))
    return (flat.mT @ flat) / flat.shape[0]


def output_step_matrix(grams, n: int, damping: float) -> np.ndarray:
    r""":math:`S(\lambda) = \sum_j G_j(G_j + n\lambda I)^{-1}` from the mini-block Grams (float64).

    ``grams`` is a sequence of (n, n) mini-block Gram matrices :math:`G_j = J_jJ_j^\top` of the
    output Jacobian restricted to block j; the idealised full-batch MBF step changes the outputs
    by :math:`-\eta S(\lambda)(u-y)` to first order (module docstring). Eigenvalues lie in
    [0, b] for b blocks; as λ → 0 with every :math:`G_j \succ 0`, S → b·I.

    Raises:
        ValueError: a Gram is not (n, n), or ``damping`` ≤ 0.

    Example:
        >>> S = output_step_matrix([np.eye(2), 3 * np.eye(2)], n=2, damping=0.5)
        >>> np.round(np.diag(S), 6).tolist()      # 1/(1+1) + 3/(3+1)
        [1.25, 1.25]
    """
    _number("damping", damping, low=0.0, low_open=True)
    n = _positive_int("n", n)
    total = np.zeros((n, n))
    for j, g in enumerate(grams):
        g = np.asarray(g, dtype=np.float64)
        if g.shape != (n, n):
            raise ValueError(f"every mini-block Gram must be ({n}, {n}); block {j} has shape {g.shape}.")
        # G (G + nλI)⁻¹ = ((G + nλI)⁻ᵀ Gᵀ)ᵀ, G symmetric
        total += np.linalg.solve(g + n * damping * np.eye(n), g).T
    return total
