r"""Spectral measures of a Gram matrix: spectrum, truncated condition number, energy.

Source: Liao, Drummond, Reid, Carneiro, "Approximate Fisher Information Matrix to
Characterise the Training of Deep Neural Networks", IEEE TPAMI 42(1), 2020,
arXiv 1810.06767.

For the Gram matrix :math:`G_k = J_k J_k^\top` of iteration k (batch size :math:`B_k`,
learning rate :math:`\alpha_k`):

* truncated condition number (``convention="fisher"``, the default)

  .. math:: c_k = \frac{\lambda_{\max}(G_k)}{\lambda_{\min}^{+}(G_k)},

  where :math:`\lambda_{\min}^{+}` is the smallest eigenvalue the Gram *resolves*: the rank is
  decided on the diagonally scaled Gram :math:`C = D^{-1} G D^{-1}` against a threshold set by
  the dtypes G was accumulated in and its gradients were computed in, rows with a zero
  gradient are excluded, and :math:`\lambda_{\min}^{+}` is taken on the resolved subspace (the
  rule and its derivation: :mod:`fimcore.rank`). An explicit ``rtol`` instead counts
  :math:`\lambda_i \le \mathrm{rtol}\cdot\lambda_{\max}` as zero (``rtol=0``: exact zero after
  clamping, the authors' released code). ``convention="jacobian"`` returns :math:`\sqrt{c_k}`,
  the ratio of singular values of :math:`J_k` that the released code logs;
* energy :math:`\operatorname{Tr} G_k = \|J_k\|_F^2` and the weighted energy term

  .. math:: I_k = \frac{\alpha_k}{B_k}\sqrt{\operatorname{Tr} G_k}.

Eigenvalues are computed in float64 whatever the Gram's dtype, where the backend has
float64. JAX has it only with ``jax_enable_x64`` switched on; without it the core computes
in float32 and says nothing (no warning is emitted; enable x64 for float64 results).
Results stay in the caller's namespace and on the caller's device as 0-D or 1-D arrays.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from ._namespace import (
    check_gram,
    checked_symmetric,
    check_nonnegative_number,
    check_positive_int,
    compute_dtype,
    eps_of,
    host_scalar,
    is_concrete,
    jit_for,
    resolve_namespace,
    symmetrise,
    validated_symmetric,
)

from .rank import Resolution, legacy, resolved
from .results import GramResult

__all__ = [
    "default_rtol",
    "energy",
    "resolution",
    "spectrum",
    "truncated_condition_number",
    "weighted_energy",
]

CONVENTIONS = ("fisher", "jacobian")


def default_rtol(batch_size: int, dtype: Any, *, xp: Any = None) -> float:
    r"""The legacy tolerance :math:`\mathrm{rtol} = B\cdot\varepsilon(\text{dtype})` (``matrix_rank`` rule).

    Eigenvalues at or below :math:`\mathrm{rtol}\cdot\lambda_{\max}` would count as zero.
    This was the default before the resolved rank of :mod:`fimcore.rank`; it caps
    :math:`c_k` at :math:`1/(B\varepsilon)` (131,072 for B = 64 in float32) and discards the
    accurately computed small eigenvalues of graded Grams. It is kept for one release as the
    ``c_k_legacy`` field of every measurement, for comparison; pass ``rtol=`` to use a
    tolerance relative to :math:`\lambda_{\max}` explicitly.

    Args:
        batch_size: B, the size of the Gram matrix.
        dtype: a real floating dtype of any array library (numpy, torch, jax, ...).
        xp: optional namespace whose ``finfo`` understands ``dtype``.

    Returns:
        B·eps(dtype) as a Python float.

    Raises:
        TypeError: if ``dtype`` is not a real floating dtype, or ``batch_size`` not an int.
        ValueError: if ``batch_size`` < 1 or B·eps >= 1 (no eigenvalue could pass).

    Example:
        >>> import numpy as np
        >>> from fimcore import default_rtol
        >>> default_rtol(1, np.float64) == float(np.finfo(np.float64).eps)
        True
        >>> default_rtol(128, np.float32) == 128 * float(np.finfo(np.float32).eps)
        True
    """
    batch_size = check_positive_int(batch_size, name="batch_size")
    value = batch_size * eps_of(dtype, xp)
    if value >= 1:
        raise ValueError(
            f"the default rtol = B·eps must be < 1; received B = {batch_size} with "
            f"eps({dtype}) giving {value:.3g}. Use gradients of a wider dtype (float32 or "
            "float64) or pass an explicit rtol."
        )
    return value


def spectrum(gram: Any, /, *, xp: Any = None) -> Any:
    r"""Eigenvalues of a Gram matrix, ascending, in float64, clamped at 0.

    Args:
        gram: symmetric (B, B) Gram matrix :math:`G = J J^\top` of any array library, or a
            :class:`fimcore.GramResult`. One an adapter marked ``checked`` takes the lean path:
            no symmetry, diagonal or entry-wise finiteness pass (finiteness is read off
            :math:`\operatorname{Tr} G`), the same eigenvalues.
        xp: array namespace; resolved from ``gram`` when None.

    Returns:
        A 1-D array of the B eigenvalues :math:`0 \le \lambda_1 \le \dots \le \lambda_B`
        (float64; float32 in JAX without x64), in the Gram's namespace and device.

    Raises:
        ValueError: if ``gram`` is not 2-D or not square, holds NaN/inf, is asymmetric
            beyond rounding (``max|G - Gᵀ| > sqrt(eps)·max|G|``), or has a negative diagonal.
        TypeError: if its dtype is not real floating.

    Example:
        >>> import numpy as np
        >>> from fimcore import spectrum
        >>> spectrum(np.array([[2.0, 1.0], [1.0, 2.0]]))
        array([1., 3.])
    """
    checked = isinstance(gram, GramResult) and gram.checked
    if isinstance(gram, GramResult):
        gram = gram.gram
    xp = resolve_namespace(gram, xp=xp)
    check_gram(gram, xp)
    if checked:
        sym, finite = checked_symmetric(gram, xp)
        if finite is False:
            raise ValueError(
                "gram must be finite; received a Gram with NaN or inf entries (its trace is "
                "not finite). Check the loss and gradients for overflow (lower the learning "
                "rate, use float64), or skip this step's measurement."
            )
    else:
        sym, _ = validated_symmetric(gram, xp)
    return jit_for(_eigs, xp)(sym)


def resolution(
    gram: Any, /, *, rtol: float | None = None, grad_dtype: Any = None, xp: Any = None
) -> Resolution:
    r"""How far a Gram resolves its spectrum: :math:`c_k`, rank, zero rows and the limit of :math:`c_k`.

    The rule (the rank decided on :math:`C = D^{-1}GD^{-1}` against
    :math:`\tau = 8B^{+}(\varepsilon_{\mathrm{acc}} + \varepsilon_{\mathrm{grad}}^2)`,
    :math:`\lambda_{\min}^{+}` on the resolved subspace, the limit
    :math:`c_{\mathrm{limit}}`) and its derivation are in :mod:`fimcore.rank`.

    Args:
        gram: symmetric (B, B) Gram matrix; its dtype is taken as the dtype it was
            accumulated in.
        rtol: None (the resolved rank) or an explicit tolerance ``0 <= rtol < 1`` relative
            to :math:`\lambda_{\max}`: eigenvalues :math:`\le \mathrm{rtol}\cdot\lambda_{\max}`
            count as zero (``rtol=0``: exact zero after clamping, the authors' released code).
        grad_dtype: dtype of the per-sample gradients G was built from; defaults to the
            Gram's dtype.
        xp: array namespace; resolved from ``gram`` when None.

    Returns:
        A :class:`fimcore.rank.Resolution` of 0-D arrays (``c`` NaN when undefined).

    Raises:
        ValueError, TypeError: on a bad Gram or ``rtol`` (see :func:`truncated_condition_number`).

    Example:
        >>> import numpy as np
        >>> from fimcore import resolution
        >>> J = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1e-4], [0.0, 0.0]])
        >>> r = resolution(J @ J.T)   # a duplicated row, a tiny one and a zero one
        >>> float(r.c), int(r.rank), int(r.zero_rows), bool(r.limited)
        (200000000.0, 2, 1, False)
    """
    xp = resolve_namespace(gram, xp=xp)
    size = check_gram(gram, xp)
    if rtol is not None:
        rtol = resolve_rtol(rtol, size, gram.dtype, xp)
    sym, _ = validated_symmetric(gram, xp)
    eps_acc, eps_grad = dtype_epsilons(gram.dtype, grad_dtype, xp)
    return jit_for(_resolution_of_symmetric, xp, static=("rtol", "eps_acc", "eps_grad", "project"))(
        sym, rtol=rtol, eps_acc=eps_acc, eps_grad=eps_grad, project=must_project(xp))


def truncated_condition_number(
    gram: Any,
    /,
    *,
    rtol: float | None = None,
    convention: str = "fisher",
    grad_dtype: Any = None,
    xp: Any = None,
) -> Any:
    r"""Truncated condition number :math:`c_k = \lambda_{\max}/\lambda_{\min}^{+}` of a Gram.

    :math:`\lambda_{\min}^{+}` is the smallest eigenvalue the Gram resolves (see
    :func:`resolution` and :mod:`fimcore.rank`): rows with a zero gradient are excluded, the
    rank is read off the diagonally scaled Gram, and the small eigenvalues of small-norm
    samples, accurate to high relative precision even in float32, are kept.

    Args:
        gram: symmetric (B, B) Gram matrix (its dtype: the dtype it was accumulated in).
        rtol: None (the resolved rank, the default) or an explicit tolerance relative to
            :math:`\lambda_{\max}`: eigenvalues :math:`\le \mathrm{rtol}\cdot\lambda_{\max}`
            count as zero; ``0 <= rtol < 1``; ``rtol=0`` is the released code's "exact zero
            after clamping".
        convention: ``"fisher"`` for the eigenvalue ratio of G (the seeds' formula) or
            ``"jacobian"`` for its square root (singular values of J).
        grad_dtype: dtype of the per-sample gradients G was built from; defaults to the
            Gram's dtype.
        xp: array namespace; resolved from ``gram`` when None.

    Returns:
        A 0-D float64 array, :math:`c_k \ge 1`; B = 1 gives 1. Under ``jax.jit`` an
        undefined value (all-zero Gram) is NaN: use :func:`fimcore.measure_update`, which
        flags it, when tracing.

    Raises:
        ValueError: on a bad Gram (see :func:`spectrum`), an unknown ``convention``, an
            ``rtol`` outside [0, 1), or an all-zero Gram (:math:`\lambda_{\max} = 0`:
            no :math:`\lambda_{\min}^{+}` exists).
        TypeError: if the Gram's dtype is not real floating.

    Example:
        >>> import numpy as np
        >>> from fimcore import truncated_condition_number
        >>> G = np.diag([4.0, 1.0, 0.0])
        >>> float(truncated_condition_number(G))
        4.0
        >>> float(truncated_condition_number(G, convention="jacobian"))
        2.0
        >>> G32 = np.diag([1.0, 1e-9]).astype(np.float32)   # a tiny but exact eigenvalue
        >>> float(truncated_condition_number(G32)) > 9.9e8
        True
        >>> float(truncated_condition_number(G32, rtol=2 * float(np.finfo(np.float32).eps)))
        1.0
    """
    check_convention(convention)
    res = resolution(gram, rtol=rtol, grad_dtype=grad_dtype, xp=xp)
    if is_concrete(res.lambda_max) and not host_scalar(res.lambda_max) > 0:
        raise ValueError(
            "the truncated condition number needs λ_max > 0; received an all-zero Gram "
            "(every per-sample gradient is zero), for which λ_min⁺ does not exist. Skip "
            "this step, or use MeasureTracker, which records it as undefined."
        )
    xp = resolve_namespace(res.c)
    return xp.sqrt(res.c) if convention == "jacobian" else res.c


def energy(gram: Any, /, *, xp: Any = None) -> Any:
    r"""Energy :math:`\operatorname{Tr} G = \sum_i \|J_i\|^2 = \|J\|_F^2` (0-D, float64).

    Raises:
        ValueError: if ``gram`` is not 2-D and square, or holds NaN/inf, is asymmetric, or
            has a negative diagonal.
        TypeError: if its dtype is not real floating.

    Example:
        >>> import numpy as np
        >>> from fimcore import energy
        >>> float(energy(np.array([[5.0, 1.0], [1.0, 9.0]])))
        14.0
    """
    xp = resolve_namespace(gram, xp=xp)
    check_gram(gram, xp)
    sym, _ = validated_symmetric(gram, xp)
    return jit_for(_trace, xp)(sym)


def weighted_energy(
    gram: Any, /, *, lr: Any, batch_size: int | None = None, xp: Any = None
) -> Any:
    r"""Weighted energy term :math:`I_k = (\alpha_k/B_k)\sqrt{\operatorname{Tr} G_k}`.

    Args:
        gram: (B, B) Gram matrix of iteration k.
        lr: the learning rate :math:`\alpha_k` in force at iteration k (>= 0).
        batch_size: :math:`B_k`, the actual batch size; defaults to the Gram's size.
        xp: array namespace; resolved from ``gram`` when None.

    Returns:
        :math:`I_k` as a 0-D float64 array.

    Raises:
        ValueError: on a bad Gram (see :func:`energy`), a negative or non-finite ``lr``, or
            ``batch_size`` < 1.
        TypeError: if ``batch_size`` is not an int or the dtype not real floating.

    Example:
        >>> import numpy as np
        >>> from fimcore import weighted_energy
        >>> float(weighted_energy(np.array([[5.0, 0.0], [0.0, 11.0]]), lr=0.1))
        0.2
    """
    xp = resolve_namespace(gram, xp=xp)
    size = check_gram(gram, xp)
    check_nonnegative_number(lr, name="lr")
    batch = size if batch_size is None else check_positive_int(batch_size, name="batch_size")
    sym, _ = validated_symmetric(gram, xp)
    trace = jit_for(_trace, xp)(sym)
    return (lr / batch) * xp.sqrt(trace)


def check_convention(convention: str) -> None:
    """Raise ``ValueError`` unless ``convention`` is "fisher" or "jacobian"."""
    if convention not in CONVENTIONS:
        raise ValueError(
            f"convention must be one of {CONVENTIONS}; received {convention!r}. Use "
            "'fisher' for λ_max/λ_min⁺ of G or 'jacobian' for its square root."
        )


def resolve_rtol(rtol: float | None, size: int, dtype: Any, xp: Any) -> float:
    """The explicit ``rtol`` (validated to lie in [0, 1)) or B·eps(dtype)."""
    if rtol is None:
        return default_rtol(size, dtype, xp=xp)
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
        raise TypeError(
            f"rtol must be a Python float in [0, 1) or None; received {rtol!r} of type "
            f"{type(rtol).__name__}."
        )
    if not 0 <= rtol < 1:
        raise ValueError(
            f"rtol must satisfy 0 <= rtol < 1 (eigenvalues <= rtol·λ_max count as zero); "
            f"received {rtol!r}. Pass None for the default B·eps."
        )
    return float(rtol)


def _spectrum(gram: Any, *, xp: Any) -> Any:
    """Ascending eigenvalues clamped at 0, in the compute dtype (no validation)."""
    return _eigs(symmetrise(gram, xp=xp), xp=xp)


def _eigs(sym: Any, *, xp: Any) -> Any:
    """Ascending eigenvalues of a symmetric matrix already in the compute dtype, clamped at 0."""
    eigs = xp.sort(xp.linalg.eigvalsh(sym))
    return xp.maximum(eigs, xp.zeros_like(eigs))


def _resolution_of_symmetric(sym: Any, *, rtol: float | None, eps_acc: float, eps_grad: float,
                             project: bool, xp: Any) -> Resolution:
    return condition_of(sym, _eigs(sym, xp=xp), rtol=rtol, eps_acc=eps_acc, eps_grad=eps_grad,
                        project=project, xp=xp)


def condition_of(sym: Any, eigs: Any, *, rtol: float | None, eps_acc: float, eps_grad: float,
                 project: bool, xp: Any) -> Resolution:
    """:class:`Resolution` of a symmetric Gram (compute dtype) with ascending clamped ``eigs``."""
    if rtol is not None:
        return legacy(eigs, xp.linalg.diagonal(sym), rtol=rtol, xp=xp)
    return resolved(sym, eigs, eps_acc=eps_acc, eps_grad=eps_grad, project=project, xp=xp)


def dtype_epsilons(gram_dtype: Any, grad_dtype: Any, xp: Any) -> tuple[float, float]:
    """(ε_acc, ε_grad): eps of the accumulation dtype (at least the compute dtype's) and of the
    per-sample gradients' dtype (default: the Gram's)."""
    eps_acc = max(eps_of(gram_dtype, xp), eps_of(compute_dtype(xp), xp))
    eps_grad = eps_of(grad_dtype if grad_dtype is not None else gram_dtype, xp)
    return eps_acc, eps_grad


def must_project(xp: Any) -> bool:
    """Whether the value-independent (projection) route is needed: JAX, whose bodies compile."""
    return bool(array_api_compat.is_jax_namespace(xp))


def _trace(gram: Any, *, xp: Any) -> Any:
    return xp.sum(xp.astype(xp.linalg.diagonal(gram), compute_dtype(xp), copy=False))


def _device(x: Any) -> Any:
    return array_api_compat.device(x)
