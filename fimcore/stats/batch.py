r"""Gradient-noise statistics of a batch from its per-sample Gram alone.

With :math:`G_{ij} = \nabla\ell_i\cdot\nabla\ell_j` (rows of J: per-sample gradients, or
B × per-sample contributions to a mean loss, as every adapter returns them), batch size B,
:math:`n = \mathbf 1^\top G\mathbf 1` and :math:`t = \operatorname{Tr} G`:

* mean gradient: :math:`\|\bar g\|^2 = n/B^2`;
* unbiased trace of the per-sample gradient covariance:
  :math:`\operatorname{tr}\hat\Sigma = (t - n/B)/(B-1) = \frac{1}{B-1}\sum_i\|\nabla\ell_i - \bar g\|^2`;
* unbiased squared true-gradient norm:
  :math:`|g|^2 = \|\bar g\|^2 - \operatorname{tr}\hat\Sigma/B = (n - t)/(B(B-1))`, the mean of the
  off-diagonal entries of G;
* the **simple gradient noise scale** :math:`B_{\mathrm{simple}} = \operatorname{tr}\Sigma/|g|^2`
  (McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training",
  arXiv 1812.06162, 2018, §2.2 and App. A: the two-batch-size estimators with batch sizes 1 and B);
* the **norm test** (Byrd, Chin, Nocedal & Wu, Math. Program. 134, 2012, eq. 3.9), as Cockpit
  reports it: the largest θ that passes, :math:`\theta = \sqrt{\operatorname{tr}\hat\Sigma/(B\|\bar g\|^2)}`;
* the **inner-product test** (Bollapragada, Byrd & Nocedal, SIAM J. Optim. 28(4), 2018,
  arXiv 1710.11258, eq. 2.6): with projections :math:`p_i = \nabla\ell_i\cdot\bar g = (G\mathbf 1)_i/B`,
  :math:`\operatorname{var}_p = \sum_i (p_i - \|\bar g\|^2)^2/(B-1)` and
  :math:`\theta = \sqrt{\operatorname{var}_p/(B\|\bar g\|^4)}`;
* the **orthogonality test** (same paper, eq. 3.3): the variance of the components orthogonal to
  :math:`\bar g`, :math:`\operatorname{var}_\perp = (t - \sum_i p_i^2/\|\bar g\|^2)/(B-1)` and
  :math:`\nu = \sqrt{\operatorname{var}_\perp/(B\|\bar g\|^2)}`.

All need B ≥ 2 (one sample has no spread): the functions raise ``ValueError`` for B = 1. Where the
mean gradient vanishes (an all-zero Gram, or :math:`n = 0`), θ and ν are +inf (no test can pass);
:math:`B_{\mathrm{simple}}` is +inf when the unbiased :math:`|g|^2 \le 0` (noise dominates this
batch's estimate) and NaN for an all-zero Gram (0/0). The estimators are noisy from one batch:
:class:`NoiseScale` smooths numerator and denominator separately with bias-corrected EMAs, as
McCandlish et al. recommend.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from .._namespace import jit_for
from .base import Statistic, StepInputs, finite_or_none, make_state, register_statistic
from ._validate import prepared

__all__ = ["BatchTests", "NoiseScale", "NoiseScaleResult", "TestsResult", "inner_product_test",
           "noise_scale", "norm_test", "orthogonality_test"]


class NoiseScaleResult(NamedTuple):
    r""":math:`B_{\mathrm{simple}}` and its parts (0-D arrays)."""

    B_simple: Any
    trace_sigma: Any
    g2_unbiased: Any
    g2_biased: Any


class TestsResult(NamedTuple):
    """The largest θ (norm, inner product) and ν (orthogonality) that would pass."""

    norm: Any
    inner_product: Any
    orthogonality: Any


def _parts(sym: Any, batch: int, *, xp: Any) -> dict[str, Any]:
    n = xp.sum(sym)
    t = xp.sum(xp.linalg.diagonal(sym))
    p = xp.sum(sym, axis=1) / batch                      # projections ∇ℓ_i · ḡ
    g2 = n / batch**2                                    # ‖ḡ‖²
    return dict(n=n, t=t, p=p, g2=g2, trace_sigma=(t - n / batch) / (batch - 1),
                g2_unbiased=(n - t) / (batch * (batch - 1)))


def _noise(sym: Any, *, xp: Any) -> NoiseScaleResult:
    q = _parts(sym, sym.shape[0], xp=xp)
    inf = xp.full_like(q["t"], float("inf"))
    positive = q["g2_unbiased"] > 0
    ratio = q["trace_sigma"] / xp.where(positive, q["g2_unbiased"], xp.ones_like(inf))
    b_simple = xp.where(positive, ratio, xp.where(q["t"] > 0, inf, xp.full_like(inf, float("nan"))))
    return NoiseScaleResult(b_simple, q["trace_sigma"], q["g2_unbiased"], q["g2"])


def _tests(sym: Any, *, xp: Any) -> TestsResult:
    batch = sym.shape[0]
    q = _parts(sym, batch, xp=xp)
    g2, p = q["g2"], q["p"]
    ok = g2 > 0
    safe = xp.where(ok, g2, xp.ones_like(g2))
    inf = xp.full_like(g2, float("inf"))
    var_p = xp.sum((p - g2) ** 2) / (batch - 1)       # centred: the mean projection is ‖ḡ‖²
    var_orth = (q["t"] - xp.sum(p * p) / safe) / (batch - 1)
    zero = xp.zeros_like(g2)

    def root(x):
        return xp.sqrt(xp.maximum(x, zero))

    return TestsResult(
        norm=xp.where(ok, root(q["trace_sigma"] / (batch * safe)), inf),
        inner_product=xp.where(ok, root(var_p / (batch * safe * safe)), inf),
        orthogonality=xp.where(ok, root(var_orth / (batch * safe)), inf),
    )


def noise_scale(gram: Any, /, *, xp: Any = None) -> NoiseScaleResult:
    r"""The simple gradient noise scale :math:`B_{\mathrm{simple}} = \operatorname{tr}\Sigma/|g|^2` of one batch.

    Args:
        gram: (B, B) Gram of per-sample gradients, B ≥ 2.
        xp: array namespace; resolved from ``gram`` when None.

    Returns:
        :class:`NoiseScaleResult` (``B_simple``, ``trace_sigma``, ``g2_unbiased``, ``g2_biased``).

    Raises:
        ValueError: B < 2, or a bad Gram (see :func:`fimcore.spectrum`).

    Example:
        >>> import numpy as np
        >>> from fimcore.stats import noise_scale
        >>> J = np.array([[1.0, 1.0], [1.0, -1.0]])   # mean (1, 0), spread ±1 in y
        >>> r = noise_scale(J @ J.T)
        >>> float(r.trace_sigma), float(r.g2_unbiased), float(r.B_simple)
        (2.0, 0.0, inf)
    """
    xp, sym, _ = prepared(gram, xp, min_batch=2, what="the gradient noise scale")
    return jit_for(_noise, xp)(sym)


def _test(gram: Any, xp: Any, what: str) -> TestsResult:
    xp, sym, _ = prepared(gram, xp, min_batch=2, what=what)
    return jit_for(_tests, xp)(sym)


def norm_test(gram: Any, /, *, xp: Any = None) -> Any:
    r"""Largest θ for which the norm test passes, :math:`\sqrt{\operatorname{tr}\hat\Sigma/(B\|\bar g\|^2)}`.

    Raises:
        ValueError: B < 2, or a bad Gram.

    Example:
        >>> import numpy as np
        >>> from fimcore.stats import norm_test
        >>> J = np.array([[2.0, 0.0], [0.0, 2.0]])   # ḡ = (1, 1), spread ±(1, −1)
        >>> round(float(norm_test(J @ J.T)), 12)
        1.0
    """
    return _test(gram, xp, "the norm test").norm


def inner_product_test(gram: Any, /, *, xp: Any = None) -> Any:
    r"""Largest θ for which the inner-product test passes, :math:`\sqrt{\operatorname{var}_p/(B\|\bar g\|^4)}`.

    Raises:
        ValueError: B < 2, or a bad Gram.

    Example:
        >>> import numpy as np
        >>> from fimcore.stats import inner_product_test
        >>> J = np.array([[2.0, 0.0], [0.0, 2.0]])   # both projections on ḡ equal 2
        >>> float(inner_product_test(J @ J.T))
        0.0
    """
    return _test(gram, xp, "the inner-product test").inner_product


def orthogonality_test(gram: Any, /, *, xp: Any = None) -> Any:
    r"""Largest ν for which the orthogonality test passes, :math:`\sqrt{\operatorname{var}_\perp/(B\|\bar g\|^2)}`.

    Raises:
        ValueError: B < 2, or a bad Gram.

    Example:
        >>> import numpy as np
        >>> from fimcore.stats import orthogonality_test
        >>> J = np.array([[2.0, 0.0], [0.0, 2.0]])
        >>> round(float(orthogonality_test(J @ J.T)), 12)
        1.0
    """
    return _test(gram, xp, "the orthogonality test").orthogonality


# ----------------------------------------------------------------------- composable statistics


class NoiseScaleState(NamedTuple):
    B_simple: Any
    trace_sigma: Any
    g2_unbiased: Any
    ema_trace_sigma: Any
    ema_g2: Any
    count: Any


@register_statistic
@dataclasses.dataclass(frozen=True)
class NoiseScale(Statistic):
    r""":math:`B_{\mathrm{simple}}` per step and smoothed: bias-corrected EMAs of its two parts.

    :math:`\hat S_k = \beta\hat S_{k-1} + (1-\beta)\operatorname{tr}\hat\Sigma_k`,
    :math:`\hat G_k = \beta\hat G_{k-1} + (1-\beta)|g|^2_k`, and
    :math:`B_{\mathrm{simple}}^{\mathrm{EMA}} = \hat S_k/\hat G_k` (the bias corrections
    :math:`1-\beta^k` cancel in the ratio; they are applied to the reported parts). Steps with
    B = 1 or a non-finite Gram leave the EMAs unchanged.

    Args:
        decay: β in [0, 1).
    """

    decay: float = 0.9
    name = "noise_scale"
    fields = ("B_simple", "trace_sigma", "g2_unbiased", "B_simple_ema", "trace_sigma_ema",
              "g2_unbiased_ema")

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1); received {self.decay!r}.")

    def init(self, *, xp=None, device=None) -> NoiseScaleState:
        nan = float("nan")
        return make_state(NoiseScaleState, dict(B_simple=nan, trace_sigma=nan, g2_unbiased=nan,
                                                ema_trace_sigma=0.0, ema_g2=0.0, count=0),
                          xp=xp, device=device)

    def update(self, state: NoiseScaleState, step: StepInputs, *, xp: Any) -> NoiseScaleState:
        if step.gram.shape[0] < 2:
            nan = xp.full_like(step.eigs[-1], float("nan"))
            return state._replace(B_simple=nan, trace_sigma=nan, g2_unbiased=nan)
        r = _noise(step.gram, xp=xp)
        use = step.finite
        beta = self.decay
        ema_s = xp.where(use, beta * state.ema_trace_sigma + (1 - beta) * r.trace_sigma,
                         state.ema_trace_sigma + xp.zeros_like(r.trace_sigma))
        ema_g = xp.where(use, beta * state.ema_g2 + (1 - beta) * r.g2_unbiased,
                         state.ema_g2 + xp.zeros_like(r.g2_unbiased))
        count = state.count + xp.astype(use, xp.asarray(0).dtype if not hasattr(state.count, "dtype")
                                        else state.count.dtype)
        return NoiseScaleState(r.B_simple, r.trace_sigma, r.g2_unbiased, ema_s, ema_g, count)

    def record(self, state: NoiseScaleState) -> dict[str, Any]:
        k = int(state.count)
        debias = 1 - self.decay**k if k else None
        s = state.ema_trace_sigma / debias if debias else None
        g = state.ema_g2 / debias if debias else None
        ratio = None
        if s is not None and g is not None:
            ratio = s / g if g > 0 else (float("inf") if s > 0 else None)
        return {"B_simple": _num(state.B_simple), "trace_sigma": finite_or_none(state.trace_sigma),
                "g2_unbiased": finite_or_none(state.g2_unbiased), "B_simple_ema": ratio,
                "trace_sigma_ema": s, "g2_unbiased_ema": g}


class TestsState(NamedTuple):
    norm: Any
    inner_product: Any
    orthogonality: Any


@register_statistic
@dataclasses.dataclass(frozen=True)
class BatchTests(Statistic):
    """The norm, inner-product and orthogonality tests of every measured step (θ and ν to pass)."""

    name = "batch_tests"
    fields = ("norm_test", "inner_product_test", "orthogonality_test")

    def init(self, *, xp=None, device=None) -> TestsState:
        nan = float("nan")
        return make_state(TestsState, dict(norm=nan, inner_product=nan, orthogonality=nan),
                          xp=xp, device=device)

    def update(self, state: TestsState, step: StepInputs, *, xp: Any) -> TestsState:
        if step.gram.shape[0] < 2:
            nan = xp.full_like(step.eigs[-1], float("nan"))
            return TestsState(nan, nan, nan)
        r = _tests(step.gram, xp=xp)
        nan = xp.full_like(r.norm, float("nan"))
        return TestsState(*(xp.where(step.finite, v, nan) for v in r))

    def record(self, state: TestsState) -> dict[str, Any]:
        return {"norm_test": _num(state.norm), "inner_product_test": _num(state.inner_product),
                "orthogonality_test": _num(state.orthogonality)}


def _num(value: Any) -> float | None:
    """A record value: None for NaN, +inf kept (it has a meaning here)."""
    value = float(value)
    return None if value != value else value
