r"""Diagonal Fisher estimators Î1, Î2 with their conditional variances V1, V2 and bounds.

Soen & Sun, "Trade-Offs of Diagonal Fisher Information Matrix Estimators", NeurIPS 2024,
arXiv 2402.05379. The model is a conditional exponential family with the network output
:math:`h = h_\theta(x) \in \mathbb R^C` as natural parameter,
:math:`p(y\mid x;\theta) = \pi(y)\exp(t(y)^\top h - F(h))`, with :math:`\eta = \nabla F(h)` and
:math:`\mathcal I(h) = \nabla^2 F(h) = \operatorname{Cov}(t(y)\mid x)`:

* ``"categorical"``: :math:`t(y) = e_y`, :math:`F = \operatorname{logsumexp}`,
  :math:`\eta = p = \operatorname{softmax}(h)`, :math:`\mathcal I(h) = \operatorname{diag}(p) - pp^\top`;
* ``"gaussian"`` (unit variance): :math:`t(y) = y`, :math:`F = \tfrac12\lVert h\rVert^2`,
  :math:`\eta = h`, :math:`\mathcal I(h) = I`.

For one scalar parameter :math:`\theta_i` and one input write :math:`u = \partial h/\partial\theta_i`
and :math:`w = \partial^2 h/\partial\theta_i^2` (both in :math:`\mathbb R^C`) and
:math:`s = t(y) - \eta` for a label :math:`y`. With :math:`\ell = \log p(y\mid x;\theta)`:

* the **exact** per-input Fisher diagonal (the GGN diagonal) is
  :math:`\mathcal I(\theta_i\mid x) = u^\top \mathcal I(h)\, u`;
* **Î1** summand: :math:`(\partial_i \ell)^2 = (s^\top u)^2`;
* **Î2** summand: :math:`-\partial_i^2 \ell = u^\top\mathcal I(h)u - s^\top w` (may be negative);
* **empirical** summand: :math:`(s^\top u)^2` with :math:`y` the data label.

Both Î1 and Î2 have conditional mean :math:`\mathcal I(\theta_i\mid x)` when :math:`y\sim p(y\mid x)`.
Their conditional variances over one label draw are

* categorical, with :math:`\bar u = p^\top u`, :math:`\bar w = p^\top w`:
  :math:`V_1 = \sum_a p_a (u_a-\bar u)^4 - \big(\sum_a p_a (u_a-\bar u)^2\big)^2`,
  :math:`V_2 = \sum_a p_a (w_a - \bar w)^2 = w^\top\mathcal I(h) w`;
* gaussian: :math:`V_1 = 2\lVert u\rVert^4 = 2\,\mathcal I(\theta_i\mid x)^2`,
  :math:`V_2 = \lVert w\rVert^2`.

**Bounds** (the form of the paper's Theorem 4.1: norms of the network derivatives times extreme
eigenvalues of output-space moment matrices). :math:`V_1` is the quadratic form of
:math:`\mathcal M(x) = \operatorname{Cov}_y[\operatorname{svec}(s s^\top)]` at
:math:`\operatorname{svec}(uu^\top)`, whose norm is :math:`\lVert u\rVert^2`, so
:math:`\lambda_{\min}(\mathcal M)\lVert u\rVert^4 \le V_1 \le \lambda_{\max}(\mathcal M)\lVert u\rVert^4`, and
:math:`\lambda_{\min}(\mathcal I)\lVert w\rVert^2 \le V_2 \le \lambda_{\max}(\mathcal I)\lVert w\rVert^2`.
For the categorical case :math:`s \perp \mathbf 1`, so ``u`` and ``w`` enter through their
projections :math:`Pu = u - \operatorname{mean}(u)\mathbf 1` (the smallest representative) and the
eigenvalues are those on :math:`\mathbf 1^\perp`: for :math:`\mathcal I(h)` its spectrum without the
zero of :math:`\mathbf 1`; for :math:`\mathcal M` (on symmetric matrices over :math:`\mathbf 1^\perp`)
:math:`\lambda_{\max}` is the largest eigenvalue of the C×C matrix
:math:`A = \sqrt p\sqrt p^\top \circ \big(R\circ R - q\mathbf 1^\top - \mathbf 1 q^\top
+ \lVert\mathcal I\rVert_F^2\big)` with :math:`R_{ab} = s_a^\top s_b`, :math:`q_a = s_a^\top\mathcal I s_a`,
:math:`s_a = e_a - p` (the nonzero spectrum of a covariance of C points), and
:math:`\lambda_{\min}(\mathcal M) = 0` for :math:`C \ge 3` (rank at most C−1 in dimension
C(C−1)/2), equal to :math:`\lambda_{\max}` for C = 2. In the Gaussian case both bounds are
equalities (:math:`\mathcal M` acts as 2·Id, :math:`\mathcal I = I`).

**Sample size** (Chebyshev). Averaging n independent (input-fixed) label draws,
:math:`P(|\hat I_j - \mathcal I| \ge \varepsilon) \le V_j/(n\varepsilon^2)`, so
:math:`n \ge V_j/(\delta\varepsilon^2)` draws give confidence :math:`1-\delta`. Over N inputs with
:math:`M_y` labels each, :math:`\operatorname{Var}[\hat I_j] = \frac{1}{N^2 M_y}\sum_n V_j(\theta_i\mid x_n)`.

The functions here take per-input derivative arrays ``u`` and ``w`` shaped (N, C, K) — N inputs,
C outputs, K scalar parameters — and return sums over the N inputs, so a framework adapter can
stream chunks of inputs and never hold the whole N×C×P array.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._namespace import jit_for, resolve_namespace

__all__ = [
    "ESTIMATORS",
    "LIKELIHOODS",
    "DiagonalBounds",
    "DiagonalFisher",
    "DiagonalSums",
    "GroupSummary",
    "chebyshev_samples",
    "check_options",
    "check_outputs",
    "chunk_size_for",
    "dense_sums",
    "diagonal_sums",
    "estimate",
    "given_labels",
    "label_residuals",
    "output_moments",
    "residuals",
]

LIKELIHOODS = ("categorical", "gaussian")
ESTIMATORS = ("i1", "i2", "exact", "empirical")


def check_options(likelihood: str, estimator: str, mc_samples: Any) -> int:
    """Validate the option values shared by every adapter; return ``mc_samples`` as int.

    Raises:
        ValueError: an unknown likelihood or estimator, or ``mc_samples < 1``.
        TypeError: ``mc_samples`` not an integer.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}; received {likelihood!r}.")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; received {estimator!r}.")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int):
        raise TypeError(f"mc_samples must be an integer >= 1 (labels drawn per input); "
                        f"received {type(mc_samples).__name__} {mc_samples!r}.")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1 (labels drawn per input); received "
                         f"{mc_samples}. Pass mc_samples=1 for one label per input.")
    return mc_samples


def check_outputs(outputs: Any, likelihood: str) -> None:
    """Raise unless the model outputs fit the likelihood: (N, C) with C >= 2 for categorical.

    Raises:
        ValueError: wrong rank, C < 2 for ``"categorical"``.
        FloatingPointError: NaN or inf outputs.
    """
    xp = resolve_namespace(outputs)
    shape = tuple(outputs.shape)
    if len(shape) != 2:
        raise ValueError(f"likelihood {likelihood!r} needs model outputs shaped (N, C) (one "
                         f"natural parameter vector per input); received shape {shape}. "
                         "Flatten or reshape the output in the model.")
    if likelihood == "categorical" and shape[1] < 2:
        raise ValueError(f"likelihood 'categorical' needs C >= 2 logits per input; received "
                         f"outputs of shape {shape}. Use likelihood='gaussian' for a scalar "
                         "regression output.")
    if not bool(xp.all(xp.isfinite(outputs))):
        raise FloatingPointError("the model outputs contain NaN or inf; the Fisher information is "
                                 "undefined there. Check the inputs and the weights.")


def output_moments(outputs: Any, likelihood: str, *, xp: Any = None) -> Any:
    r"""η = E[t(y) | x]: softmax(h) for ``"categorical"``, h itself for ``"gaussian"``.

    Example:
        >>> import numpy as np
        >>> p = output_moments(np.array([[0.0, np.log(3.0)]]), "categorical")
        >>> np.round(p, 6).tolist()
        [[0.25, 0.75]]
    """
    xp = resolve_namespace(outputs, xp=xp)
    if likelihood == "gaussian":
        return outputs
    shifted = outputs - xp.max(outputs, axis=-1, keepdims=True)
    e = xp.exp(shifted)
    return e / xp.sum(e, axis=-1, keepdims=True)


def residuals(outputs: Any, labels: Any, likelihood: str, *, xp: Any = None) -> Any:
    r"""s = t(y) − η for labels shaped (N, M) (categorical ints) or (N, M, C) (gaussian).

    Returns:
        (N, M, C) residuals in the outputs' dtype.

    Raises:
        ValueError: labels of the wrong shape, or class indices outside [0, C).
    """
    xp = resolve_namespace(outputs, xp=xp)
    n, c = outputs.shape
    if likelihood == "categorical":
        if labels.ndim != 2 or labels.shape[0] != n:
            raise ValueError(f"categorical labels must be class indices shaped (N,) or (N, M) with "
                             f"N = {n}; received shape {tuple(labels.shape)}.")
        if bool(xp.any(labels < 0)) or bool(xp.any(labels >= c)):
            raise ValueError(f"categorical labels must lie in [0, C) = [0, {c}); received values "
                             f"from {int(xp.min(labels))} to {int(xp.max(labels))}.")
    elif labels.ndim != 3 or tuple(labels.shape[::2]) != (n, c):
        raise ValueError(f"gaussian labels must be shaped (N, C) or (N, M, C) like the outputs "
                         f"(N, C) = {(n, c)}; received shape {tuple(labels.shape)}.")
    return jit_for(_residuals, xp, static=("likelihood",))(outputs, labels, likelihood=likelihood)


def _residuals(outputs: Any, labels: Any, *, likelihood: str, xp: Any) -> Any:
    eta = output_moments(outputs, likelihood, xp=xp)
    if likelihood == "categorical":
        classes = xp.arange(outputs.shape[1], dtype=labels.dtype,
                            device=getattr(labels, "device", None))
        onehot = xp.astype(labels[:, :, None] == classes, outputs.dtype)
        return onehot - eta[:, None, :]
    return xp.astype(labels, outputs.dtype) - eta[:, None, :]


class DiagonalSums(NamedTuple):
    """Sums over a chunk of inputs of the per-input quantities, each (K,) or None."""

    values: Any
    variance: Any
    lower: Any
    upper: Any


def _projected_sq_norm(v: Any, xp: Any) -> Any:
    """‖Pv‖² over axis 1 (C), with P the projection onto 1^⊥: Σ v² − (Σ v)²/C."""
    c = v.shape[1]
    return xp.sum(v * v, axis=1) - xp.sum(v, axis=1) ** 2 / c


def _categorical_spectra(p: Any, xp: Any) -> tuple[Any, Any, Any, Any]:
    """(λmin, λmax) of 𝓘(h) on 1^⊥ and of 𝓜 on Sym²(1^⊥), each (N,) (see the module docstring)."""
    n, c = p.shape
    eye = xp.eye(c, dtype=p.dtype, device=getattr(p, "device", None))
    fisher = eye[None, :, :] * p[:, None, :] - p[:, :, None] * p[:, None, :]
    eig_i = xp.linalg.eigvalsh(fisher)
    s = eye[None, :, :] - p[:, None, :]                              # rows s_a = e_a − p
    r = xp.matmul(s, xp.matrix_transpose(s))                         # R_ab = s_aᵀ s_b
    q = xp.sum(xp.matmul(s, fisher) * s, axis=-1)                    # q_a = s_aᵀ 𝓘 s_a
    frob = xp.sum(fisher * fisher, axis=(1, 2))
    gamma = r * r - q[:, :, None] - q[:, None, :] + frob[:, None, None]
    root = xp.sqrt(p)
    eig_m = xp.linalg.eigvalsh(root[:, :, None] * gamma * root[:, None, :])
    m_max = xp.clip(eig_m[:, -1], min=0.0)
    m_min = m_max if c == 2 else xp.zeros_like(m_max)
    return xp.clip(eig_i[:, 1], min=0.0), eig_i[:, -1], m_min, m_max


def diagonal_sums(u: Any, w: Any, outputs: Any, s: Any, *, likelihood: str, estimator: str,
                  variance: bool, xp: Any = None) -> DiagonalSums:
    r"""Per-parameter sums over N inputs of the estimator, its V1/V2 and the bounds.

    Args:
        u: (N, C, K) output Jacobian columns :math:`\partial h/\partial\theta_i` per input.
        w: (N, C, K) per-output second derivatives :math:`\partial^2 h/\partial\theta_i^2`;
            needed for ``"i2"`` (else may be None).
        outputs: (N, C) network outputs h (logits, or the Gaussian mean).
        s: (N, M, C) residuals :math:`t(y) - \eta` of M labels per input (``"i1"``, ``"i2"``,
            ``"empirical"``); None for ``"exact"``.
        likelihood: ``"categorical"`` or ``"gaussian"``.
        estimator: ``"i1"``, ``"i2"``, ``"exact"`` or ``"empirical"``.
        variance: also return V1 (``"i1"``) or V2 (``"i2"``) and their bounds.

    Returns:
        :class:`DiagonalSums` of (K,) arrays summed over the N inputs; the label average over M
        is taken per input. ``variance``/``lower``/``upper`` are None unless asked for
        (and always None for ``"exact"`` and ``"empirical"``).

    Example:
        >>> import numpy as np
        >>> u = np.array([[[1.0], [-1.0]]])                      # N=1, C=2, K=1
        >>> h = np.zeros((1, 2))                                 # p = (1/2, 1/2)
        >>> r = diagonal_sums(u, None, h, None, likelihood="categorical",
        ...                   estimator="exact", variance=False)
        >>> r.values.tolist()                                    # Σ p (u − ū)² = 1
        [1.0]
    """
    xp = resolve_namespace(u, xp=xp)
    body = jit_for(_diagonal_sums, xp, static=("likelihood", "estimator", "variance"))
    return body(u, w, outputs, s, likelihood=likelihood, estimator=estimator, variance=variance)


def _diagonal_sums(u: Any, w: Any, outputs: Any, s: Any, *, likelihood: str, estimator: str,
                   variance: bool, xp: Any) -> DiagonalSums:
    per = _per_input(u, w, outputs, s, likelihood=likelihood, estimator=estimator,
                     variance=variance, xp=xp)
    return DiagonalSums(*(None if a is None else xp.sum(a, axis=0) for a in per))


def _per_input(u: Any, w: Any, outputs: Any, s: Any, *, likelihood: str, estimator: str,
               variance: bool, xp: Any) -> DiagonalSums:
    """The per-input (N, K) quantities behind :func:`diagonal_sums` (M labels averaged)."""
    eta = output_moments(outputs, likelihood, xp=xp)
    with_var = variance and estimator in ("i1", "i2")
    if likelihood == "categorical":
        centred = u - xp.sum(eta[:, :, None] * u, axis=1, keepdims=True)
        exact = xp.sum(eta[:, :, None] * centred ** 2, axis=1)           # Σ p (u − ū)²
    else:
        exact = xp.sum(u * u, axis=1)                                    # ‖u‖²
    if estimator == "exact":
        return DiagonalSums(exact, None, None, None)
    if estimator in ("i1", "empirical"):
        su = xp.matmul(s, u)                                             # (N, M, K)
        values = xp.mean(su * su, axis=1)
    else:
        values = exact - xp.mean(xp.matmul(s, w), axis=1)
    if not with_var:
        return DiagonalSums(values, None, None, None)
    if likelihood == "gaussian":
        v = 2.0 * exact ** 2 if estimator == "i1" else xp.sum(w * w, axis=1)
        return DiagonalSums(values, v, v, v)
    i_min, i_max, m_min, m_max = _categorical_spectra(eta, xp)
    if estimator == "i1":
        v = xp.sum(eta[:, :, None] * centred ** 4, axis=1) - exact ** 2
        norm = _projected_sq_norm(u, xp) ** 2
        lo, hi = m_min[:, None] * norm, m_max[:, None] * norm
    else:
        w_c = w - xp.sum(eta[:, :, None] * w, axis=1, keepdims=True)
        v = xp.sum(eta[:, :, None] * w_c ** 2, axis=1)
        norm = _projected_sq_norm(w, xp)
        lo, hi = i_min[:, None] * norm, i_max[:, None] * norm
    return DiagonalSums(values, v, lo, hi)


def dense_sums(j: Any, hd: Any, a: Any, outputs: Any, s: Any, *, likelihood: str, estimator: str,
               variance: bool, xp: Any = None) -> tuple[DiagonalSums, DiagonalSums]:
    r"""Sums over N inputs for a dense layer :math:`z = Wa + b` on one feature vector per input.

    With :math:`J_c = \partial h_c/\partial z` and :math:`(H_c)_{jj} = \partial^2 h_c/\partial z_j^2`,
    :math:`u_c(W_{jk}) = J_{cj}a_k`, :math:`w_c(W_{jk}) = (H_c)_{jj}a_k^2` and, for the bias,
    :math:`a_k = 1`. Every per-input quantity is then a per-unit quantity times :math:`a_k^2`
    (the estimates) or :math:`a_k^4` (V1, V2 and their bounds), so the weight sums are the
    products :math:`Q^\top (a\circ a)` and :math:`Q^\top (a\circ a)^{\circ 2}` — never the
    (N, C, O·F) array of the generic route.

    Args:
        j: (N, C, O) output Jacobian with respect to the layer output.
        hd: (N, C, O) diagonal of the output Hessians (``"i2"``; else None).
        a: (N, F) layer inputs.
        outputs, s, likelihood, estimator, variance: as :func:`diagonal_sums`.

    Returns:
        (weight sums shaped (O, F), bias sums shaped (O,)).
    """
    xp = resolve_namespace(j, xp=xp)
    body = jit_for(_dense_sums, xp, static=("likelihood", "estimator", "variance"))
    return body(j, hd, a, outputs, s, likelihood=likelihood, estimator=estimator,
                variance=variance)


def _dense_sums(j, hd, a, outputs, s, *, likelihood, estimator, variance, xp):
    per = _per_input(j, hd, outputs, s, likelihood=likelihood, estimator=estimator,
                     variance=variance, xp=xp)
    a2 = a * a
    a4 = a2 * a2
    t = xp.matrix_transpose
    weight = DiagonalSums(xp.matmul(t(per.values), a2),
                          *(None if q is None else xp.matmul(t(q), a4) for q in per[1:]))
    bias = DiagonalSums(*(None if q is None else xp.sum(q, axis=0) for q in per))
    return weight, bias


def chebyshev_samples(variance: float, epsilon: float, delta: float = 0.05) -> int:
    r"""Label draws n with :math:`V/(n\varepsilon^2) \le \delta`: :math:`\lceil V/(\delta\varepsilon^2)\rceil`.

    Example:
        >>> chebyshev_samples(2.0, 0.1, 0.05)
        4000
    """
    if not (epsilon > 0 and 0 < delta < 1):
        raise ValueError(f"chebyshev_samples needs epsilon > 0 and 0 < delta < 1; received "
                         f"epsilon={epsilon!r}, delta={delta!r}.")
    return max(1, math.ceil(variance / (delta * epsilon ** 2) - 1e-9))


class DiagonalBounds(NamedTuple):
    """Lower and upper bounds of the conditional variance, ``{name: array}`` each."""

    lower: dict[str, Any]
    upper: dict[str, Any]


@dataclass(frozen=True)
class GroupSummary:
    """Per parameter-group summary (a group = the parameters of one layer).

    Attributes:
        name: the group (layer) name.
        size: number of scalar parameters.
        fisher: mean over the group's parameters of the estimate.
        variance: mean conditional variance (V1 or V2), None without ``variance=True``.
        std: √variance.
        lower, upper: means of the variance bounds.
        samples: Chebyshev label draws for the group's mean variance at the requested ε, δ.
    """

    name: str
    size: int
    fisher: float
    variance: float | None
    std: float | None
    lower: float | None
    upper: float | None
    samples: int | None


def _group_of(name: str) -> str:
    for sep in (".", "/"):
        if sep in name:
            return name.rsplit(sep, 1)[0]
    return name


def _host_sum(x: Any) -> float:
    xp = resolve_namespace(x)
    return float(xp.sum(xp.astype(x, xp.float64) if hasattr(xp, "float64") else x))


@dataclass(frozen=True)
class DiagonalFisher:
    r"""Diagonal Fisher estimate, averaged over the inputs, per parameter.

    Attributes:
        values: ``{name: array shaped like the parameter}`` — the estimate averaged over the N
            inputs (and over the M labels per input).
        variance: ``{name: array}`` — :math:`\frac1N\sum_n V_j(\theta_i\mid x_n)`, the closed-form
            conditional variance of one label draw (V1 for ``"i1"``, V2 for ``"i2"``) averaged over
            the inputs; None unless ``variance=True`` (always None for ``"exact"``, ``"empirical"``).
            The variance of ``values`` itself is ``variance / (N·M)``.
        bounds: :class:`DiagonalBounds` of the same average, or None.
        estimator, likelihood, n_inputs, mc_samples: how it was computed.
    """

    values: dict[str, Any]
    variance: dict[str, Any] | None
    bounds: DiagonalBounds | None
    estimator: str
    likelihood: str
    n_inputs: int
    mc_samples: int

    def groups(self, epsilon: float = 0.1, *, delta: float = 0.05,
               relative: bool = True) -> dict[str, GroupSummary]:
        r"""Per-layer summaries (parameters grouped by the name before the last ``.`` or ``/``).

        Args:
            epsilon: accuracy of the Chebyshev sample count; relative to the group's mean FI
                when ``relative`` (so :math:`\varepsilon\bar{\mathcal I}`), absolute otherwise.
            delta: allowed failure probability.
            relative: see ``epsilon``.
        """
        grouped: dict[str, list[str]] = {}
        for name in self.values:
            grouped.setdefault(_group_of(name), []).append(name)
        out = {}
        for group, names in grouped.items():
            size = sum(int(math.prod(self.values[n].shape)) for n in names)
            mean = lambda d: sum(_host_sum(d[n]) for n in names) / size  # noqa: E731
            fisher = mean(self.values)
            var = lo = hi = std = samples = None
            if self.variance is not None:
                var = mean(self.variance)
                std = math.sqrt(max(var, 0.0))
                eps = epsilon * abs(fisher) if relative else epsilon
                samples = chebyshev_samples(var, eps, delta) if eps > 0 else None
            if self.bounds is not None:
                lo, hi = mean(self.bounds.lower), mean(self.bounds.upper)
            out[group] = GroupSummary(group, size, fisher, var, std, lo, hi, samples)
        return out


def given_labels(estimator: str, labels: Any, targets: Any) -> Any:
    """The labels the estimator evaluates at (None: draw from the model, or ``"exact"``).

    Raises:
        ValueError: ``labels`` with ``"empirical"``/``"exact"``, ``targets`` with anything but
            ``"empirical"``, or ``"empirical"`` without ``targets``.
    """
    unused = {"exact": ("labels", "targets"), "empirical": ("labels",)}.get(estimator, ("targets",))
    passed = {"labels": labels, "targets": targets}
    for key in unused:
        if passed[key] is not None:
            raise ValueError(f"estimator={estimator!r} does not use {key}=; labels= are for "
                             "'i1'/'i2' (drawn from the model when omitted), targets= (data "
                             "labels) for 'empirical', neither for 'exact'.")
    if estimator == "empirical" and targets is None:
        raise ValueError("estimator='empirical' needs targets= (the data labels: class indices "
                         "(N,) for 'categorical', values (N, C) for 'gaussian').")
    return targets if estimator == "empirical" else labels


def label_residuals(outputs: Any, given: Any, likelihood: str) -> Any:
    """:func:`residuals` after lifting (N,) class indices / (N, C) values to M = 1.

    Raises:
        TypeError: non-integer categorical labels.
    """
    xp = resolve_namespace(outputs)
    if likelihood == "categorical":
        if not xp.isdtype(given.dtype, "integral"):
            raise TypeError(f"categorical labels must be integer class indices; received dtype "
                            f"{given.dtype}.")
        given = given[:, None] if given.ndim == 1 else given
    elif given.ndim == 2:
        given = given[:, None, :]
    return residuals(outputs, given, likelihood, xp=xp)


def chunk_size_for(n: int, c: int, p: int, chunk_size: int | None, budget: int = 2 ** 24) -> int:
    """Inputs per chunk: ``chunk_size``, or as many as keep C·P·n entries under ``budget``."""
    return chunk_size or max(1, min(n, budget // (c * p)))


def _check_finite(arr: Any, names: list[str], sizes: list[int], what: str, xp: Any) -> None:
    if arr is None or bool(xp.all(xp.isfinite(arr))):
        return
    bad = xp.any(~xp.isfinite(arr), axis=tuple(range(arr.ndim - 1)))
    first = int(xp.argmax(xp.astype(bad, xp.int32)))
    ends = itertools.accumulate(sizes)
    name = names[next(i for i, end in enumerate(ends) if end > first)]
    raise FloatingPointError(f"non-finite derivatives {what} of the outputs for parameter "
                             f"{name!r}; the Fisher is undefined (check the weights and inputs).")


def _add(old: DiagonalSums | None, new: DiagonalSums) -> DiagonalSums:
    if old is None:
        return new
    return DiagonalSums(*(None if a is None else a + b for a, b in zip(old, new)))


def estimate(chunks: Any, outputs: Any, s: Any, shapes: Mapping[str, tuple[int, ...]], *,
             likelihood: str, estimator: str, variance: bool) -> DiagonalFisher:
    """Stream chunks of derivatives through :func:`diagonal_sums`; average over the N inputs.

    Args:
        chunks: iterable of ``(slice of the inputs, u, w, dense)``: ``u``/``w`` map parameter
            names to (n, C, *shape) derivatives (``w`` may be empty unless ``estimator="i2"``);
            ``dense`` maps a dense layer's weight name to ``(bias name or None, J, H diagonal
            or None, layer input a)`` for :func:`dense_sums`.
        outputs: (N, C) outputs; s: (N, M, C) residuals or None.
        shapes: ``{name: parameter shape}``.

    Raises:
        FloatingPointError: NaN/inf derivatives (nothing is returned).
    """
    xp = resolve_namespace(outputs)
    n, c = outputs.shape
    opts = dict(likelihood=likelihood, estimator=estimator, variance=variance, xp=xp)
    sums: dict[str, DiagonalSums] = {}
    for sl, u, w, dense in chunks:
        out_sl, s_sl = outputs[sl], None if s is None else s[sl]
        names = list(u)
        if names:
            # one (n, C, P) array per chunk: one compiled body in JAX, whatever the leaf count
            sizes = [math.prod(shapes[k]) for k in names]
            un = xp.concat([xp.reshape(u[k], (u[k].shape[0], c, -1)) for k in names], axis=2)
            wn = None
            if estimator == "i2":
                wn = xp.concat([xp.reshape(w[k], (w[k].shape[0], c, -1)) for k in names], axis=2)
            _check_finite(un, names, sizes, "∂h/∂θ", xp)
            _check_finite(wn, names, sizes, "∂²h/∂θ²", xp)
            part = diagonal_sums(un, wn, out_sl, s_sl, **opts)
            for k, lo, hi in zip(names, [0, *itertools.accumulate(sizes)],
                                 itertools.accumulate(sizes)):
                sums[k] = _add(sums.get(k), DiagonalSums(
                    *(None if a is None else a[lo:hi] for a in part)))
        for weight, (bias, j, hd, a) in dense.items():
            for arr, what in ((j, "∂h/∂z"), (hd, "∂²h/∂z²"), (a, "(layer input)")):
                _check_finite(arr, [weight], [arr.shape[-1]] if arr is not None else [], what, xp)
            wsum, bsum = dense_sums(j, hd, a, out_sl, s_sl, **opts)
            sums[weight] = _add(sums.get(weight), wsum)
            if bias is not None:
                sums[bias] = _add(sums.get(bias), bsum)

    def part_of(field: str) -> dict[str, Any] | None:
        if getattr(next(iter(sums.values())), field) is None:
            return None
        return {k: xp.reshape(getattr(sums[k], field) / n, shapes[k]) for k in shapes}

    lower = part_of("lower")
    bounds = None if lower is None else DiagonalBounds(lower, part_of("upper"))
    return DiagonalFisher(part_of("values"), part_of("variance"), bounds, estimator, likelihood,
                          n, 1 if s is None else s.shape[1])
