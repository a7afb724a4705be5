r"""Statistics of the Gram's spectrum, and of the Fisher spectrum it gives.

For eigenvalues :math:`\lambda_1 \le \dots \le \lambda_B` of G (clamped at 0):

* **effective rank** (Roy & Vetterli, EUSIPCO 2007): :math:`\exp(-\sum_i p_i \log p_i)`,
  :math:`p_i = \lambda_i/\sum_j \lambda_j` (terms with :math:`p_i = 0` are 0); between 1 and B;
* **stable rank**: :math:`\operatorname{Tr} G/\lambda_{\max} = \|J\|_F^2/\|J\|_2^2`, between 1 and
  the rank;
* **Fisher-spectrum statistics** (Karakida, Akaho & Amari, "Universal Statistics of Fisher
  Information in Deep Neural Networks: Mean Field Approach", AISTATS 2019, arXiv 1806.01316): for
  :math:`F = J^\top J/B` (P × P), whose non-zero eigenvalues are those of G divided by B,

  .. math:: m_\lambda = \frac{\operatorname{Tr} F}{P} = \frac{\operatorname{Tr} G}{BP},\quad
            s_\lambda = \frac{\operatorname{Tr} F^2}{P} = \frac{\|G\|_F^2}{B^2P},\quad
            \lambda_{\max}(F) = \frac{\lambda_{\max}(G)}{B},

  and the number of *outliers*: eigenvalues of G above ``outlier_factor`` × the median of its
  non-zero eigenvalues (the bulk; non-zero: above the eigen-solver's floor
  :math:`8B\varepsilon\lambda_{\max}`). In wide networks the Fisher spectrum is a bulk near zero and a
  few outliers, one per output for a linear (Gaussian) head and at most C − 1 for softmax; in the
  Gram they sit at :math:`(\kappa_1 + (T-1)\kappa_2)/(\kappa_1-\kappa_2)` times the bulk for T
  samples (the mean-field order parameters κ of that paper).

An all-zero Gram has no spectrum to normalise: effective and stable rank are NaN (None in
records); ``num_params`` must be a positive int.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import array_api_compat

from .._namespace import check_positive_int, default_int_dtype, jit_for
from .base import Statistic, StepInputs, make_state, register_statistic, finite_or_none
from ._validate import prepared

__all__ = ["FisherSpectrum", "FisherSpectrumResult", "SpectrumShape", "effective_rank",
           "fisher_spectrum_stats", "stable_rank"]


def _effective_rank(eigs: Any, *, xp: Any) -> Any:
    total = xp.sum(eigs)
    ok = total > 0
    p = eigs / xp.where(ok, total, xp.ones_like(total))
    logs = xp.log(xp.where(p > 0, p, xp.ones_like(p)))
    return xp.where(ok, xp.exp(-xp.sum(p * logs)), xp.full_like(total, float("nan")))


def _stable_rank(eigs: Any, *, xp: Any) -> Any:
    lam_max = eigs[-1]
    ok = lam_max > 0
    return xp.where(ok, xp.sum(eigs) / xp.where(ok, lam_max, xp.ones_like(lam_max)),
                    xp.full_like(lam_max, float("nan")))


class FisherSpectrumResult(NamedTuple):
    r""":math:`m_\lambda`, :math:`s_\lambda`, :math:`\lambda_{\max}(F)` and the outlier count."""

    m_lambda: Any
    s_lambda: Any
    lambda_max: Any
    outliers: Any


def _fisher(sym: Any, eigs: Any, *, num_params: int, factor: float, xp: Any) -> FisherSpectrumResult:
    batch = sym.shape[0]
    # the bulk: eigenvalues above the eigen-solver's floor 8·B·eps·λ_max (rounding is not bulk)
    floor = 8 * batch * float(xp.finfo(eigs.dtype).eps) * eigs[-1]
    positive = xp.logical_and(eigs > floor, eigs > 0)
    device = array_api_compat.device(eigs)
    count = xp.sum(xp.astype(positive, default_int_dtype(xp, device)))
    # median of the positive eigenvalues: they are the top `count` of the ascending array
    size = eigs.shape[0]
    position = xp.astype(xp.arange(size, device=device), count.dtype)
    lo = size - count + (count - 1) // 2
    hi = size - count + count // 2
    pick = xp.logical_or(position == lo, position == hi)
    n_pick = xp.sum(xp.astype(pick, eigs.dtype))
    median = xp.sum(xp.where(pick, eigs, xp.zeros_like(eigs))) / xp.where(n_pick > 0, n_pick,
                                                                            xp.ones_like(n_pick))
    outliers = xp.sum(xp.astype(xp.logical_and(positive, eigs > factor * median), count.dtype))
    return FisherSpectrumResult(
        m_lambda=xp.sum(xp.linalg.diagonal(sym)) / (batch * num_params),
        s_lambda=xp.sum(sym * sym) / (batch * batch * num_params),
        lambda_max=eigs[-1] / batch,
        outliers=outliers,
    )


def effective_rank(gram: Any, /, *, xp: Any = None) -> Any:
    r"""Effective rank :math:`\exp(-\sum_i p_i\log p_i)`, :math:`p_i = \lambda_i/\operatorname{Tr} G`.

    Raises:
        ValueError: a bad Gram (see :func:`fimcore.spectrum`).

    Example:
        >>> import numpy as np
        >>> from fimcore.stats import effective_rank
        >>> float(effective_rank(np.diag([1.0, 1.0, 0.0])))
        2.0
    """
    xp, _, eigs = prepared(gram, xp, need_eigs=True)
    return jit_for(_effective_rank, xp)(eigs)


def stable_rank(gram: Any, /, *, xp: Any = None) -> Any:
    r"""Stable rank :math:`\operatorname{Tr} G/\lambda_{\max}`.

    Raises:
        ValueError: a bad Gram.

    Example:
        >>> import numpy as np
        >>> from fimcore.stats import stable_rank
        >>> float(stable_rank(np.diag([4.0, 2.0, 2.0])))
        2.0
    """
    xp, _, eigs = prepared(gram, xp, need_eigs=True)
    return jit_for(_stable_rank, xp)(eigs)


def fisher_spectrum_stats(gram: Any, /, num_params: int, *, outlier_factor: float = 3.0,
                          xp: Any = None) -> FisherSpectrumResult:
    r"""Karakida's statistics of :math:`F = J^\top J/B` from G and the parameter count P.

    Args:
        gram: (B, B) Gram.
        num_params: P, the number of parameters (columns of J), a positive int.
        outlier_factor: an eigenvalue of G above this multiple of the median of the non-zero
            ones counts as an outlier (> 1).

    Raises:
        ValueError: a bad Gram, ``num_params`` < 1 or ``outlier_factor`` <= 1.
        TypeError: ``num_params`` not an int.

    Example:
        >>> import numpy as np
        >>> from fimcore.stats import fisher_spectrum_stats
        >>> r = fisher_spectrum_stats(np.diag([10.0, 1.0, 1.0, 1.0]), 100)
        >>> float(r.m_lambda), float(r.lambda_max), int(r.outliers)
        (0.0325, 2.5, 1)
    """
    num_params = check_positive_int(num_params, name="num_params")
    factor = _check_factor(outlier_factor)
    xp, sym, eigs = prepared(gram, xp, need_eigs=True)
    return jit_for(_fisher, xp, static=("num_params", "factor"))(sym, eigs, num_params=num_params,
                                                                factor=factor)


def _check_factor(factor: Any) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"outlier_factor must be a number > 1 (a multiple of the bulk's median); "
                         f"received {factor!r}.")
    return float(factor)


# ----------------------------------------------------------------------- composable statistics


class ShapeState(NamedTuple):
    effective_rank: Any
    stable_rank: Any


@register_statistic
@dataclasses.dataclass(frozen=True)
class SpectrumShape(Statistic):
    """Effective and stable rank of every measured Gram."""

    name = "spectrum_shape"
    fields = ("effective_rank", "stable_rank")

    def init(self, *, xp=None, device=None) -> ShapeState:
        return make_state(ShapeState, dict(effective_rank=float("nan"), stable_rank=float("nan")),
                          xp=xp, device=device)

    def update(self, state: ShapeState, step: StepInputs, *, xp: Any) -> ShapeState:
        nan = xp.full_like(step.eigs[-1], float("nan"))
        return ShapeState(xp.where(step.finite, _effective_rank(step.eigs, xp=xp), nan),
                          xp.where(step.finite, _stable_rank(step.eigs, xp=xp), nan))

    def record(self, state: ShapeState) -> dict[str, Any]:
        return {"effective_rank": finite_or_none(state.effective_rank),
                "stable_rank": finite_or_none(state.stable_rank)}


class FisherState(NamedTuple):
    m_lambda: Any
    s_lambda: Any
    lambda_max_F: Any
    outliers: Any


@register_statistic
@dataclasses.dataclass(frozen=True)
class FisherSpectrum(Statistic):
    r""":math:`m_\lambda`, :math:`s_\lambda`, :math:`\lambda_{\max}(F)` and outliers of every step.

    Needs P: pass ``num_params`` to the tracker's ``update`` (adapters' ``GramResult`` carry it);
    without it the fields are None.
    """

    outlier_factor: float = 3.0
    name = "fisher_spectrum"
    fields = ("m_lambda", "s_lambda", "lambda_max_F", "outliers")

    def __post_init__(self) -> None:
        _check_factor(self.outlier_factor)

    def init(self, *, xp=None, device=None) -> FisherState:
        nan = float("nan")
        return make_state(FisherState, dict(m_lambda=nan, s_lambda=nan, lambda_max_F=nan, outliers=-1),
                          xp=xp, device=device)

    def update(self, state: FisherState, step: StepInputs, *, xp: Any) -> FisherState:
        if step.num_params is None:
            nan = xp.full_like(step.eigs[-1], float("nan"))
            return FisherState(nan, nan, nan, state.outliers * 0 - 1)
        r = _fisher(step.gram, step.eigs, num_params=step.num_params, factor=self.outlier_factor,
                    xp=xp)
        nan = xp.full_like(r.m_lambda, float("nan"))
        return FisherState(xp.where(step.finite, r.m_lambda, nan),
                           xp.where(step.finite, r.s_lambda, nan),
                           xp.where(step.finite, r.lambda_max, nan),
                           xp.where(step.finite, r.outliers, xp.zeros_like(r.outliers) - 1))

    def record(self, state: FisherState) -> dict[str, Any]:
        outliers = int(state.outliers)
        return {"m_lambda": finite_or_none(state.m_lambda), "s_lambda": finite_or_none(state.s_lambda),
                "lambda_max_F": finite_or_none(state.lambda_max_F),
                "outliers": None if outliers < 0 else outliers}
