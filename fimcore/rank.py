r"""Which eigenvalues of a per-sample Gram are resolved: the zero threshold of :math:`c_k`.

The truncated condition number :math:`c_k = \lambda_{\max}(G)/\lambda_{\min}^{+}(G)` needs a
rule for which eigenvalues count as zero. fimcore decides it on the Gram's own accuracy,
scale-invariantly:

.. math::

    C = D^{-1} G D^{-1},\quad D = \operatorname{diag}(\sqrt{G_{ii}})\ \text{(non-zero rows)},
    \qquad r = \#\{\mu_i(C) > \tau\},\qquad
    \tau = 8\,B^{+}\,(\varepsilon_{\mathrm{acc}} + \varepsilon_{\mathrm{grad}}^2),

with :math:`B^{+}` the number of rows with :math:`G_{ii} > 0` (rows with an exactly zero
gradient are excluded and counted), :math:`\varepsilon_{\mathrm{acc}}` the machine epsilon
of the dtype the Gram was accumulated in (its own dtype; at least that of the dtype the
eigenvalues are computed in) and :math:`\varepsilon_{\mathrm{grad}}` that of the per-sample
gradients. :math:`\lambda_{\min}^{+}` is the smallest eigenvalue of G on the span of the
r resolved eigenvectors :math:`V_r` of C (eigenvalues :math:`M_r`),

.. math:: \lambda_{\min}^{+} = \lambda_{\min}\!\left(M_r^{1/2} V_r^\top D^2 V_r M_r^{1/2}\right),

which is :math:`\lambda_{\min}(G)` over the non-zero rows when :math:`r = B^{+}`. The largest
:math:`c_k` this Gram could have resolved is

.. math::

    c_{\mathrm{limit}} = \frac{\lambda_{\max}}{\max\!\left(\tau \min_i G_{ii},\;
        8 B\,\varepsilon_{\mathrm{eig}}\,\lambda_{\max}\right)},

and a step is *resolution-limited* when :math:`c_k \ge c_{\mathrm{limit}}/2`.

Why this rule:

1. *Scale-free rank.* By Ostrowski's theorem :math:`\lambda_k(DCD) = \theta_k\,\mu_k(C)` with
   :math:`\theta_k \in [\min_i G_{ii}, \max_i G_{ii}]`: G and C have the same inertia, so the
   rank can be read off C, whose diagonal is 1 whatever the per-sample gradient norms.
2. *Accumulation.* An entry :math:`G_{ij} = J_i\cdot J_j` summed in a dtype with epsilon
   :math:`\varepsilon` is off by at most :math:`\gamma\varepsilon\|J_i\|\|J_j\|` (Cauchy–Schwarz
   bounds the sum of :math:`|J_{ip}J_{jp}|`), i.e. :math:`|\delta C_{ij}| \le \gamma\varepsilon`,
   and by Weyl's inequality no eigenvalue of C moves by more than
   :math:`\|\delta C\|_2 \le B\gamma\varepsilon`. The factor 8 stands for γ (on float32
   ResNet-20 Grams at B = 64 and 128, accumulation errors measured at most 8.7ε entrywise and
   0.89·Bε in spectral norm: ``benchmarks/results/resolution.md``). The float32 model's own
   rounding moves C far more (up to 204·Bε in spectral norm there) but, being a row-wise
   relative perturbation of J, it shifts resolved eigenvalues relatively (measured at most
   2.2e-4) and creates no rank, so τ need not cover it.
3. *Gradient rounding.* Rows rounded in their dtype, :math:`\tilde J_i = J_i + E_i` with
   :math:`\|E_i\| \le \varepsilon_{\mathrm{grad}}\|J_i\|`, lift an exact null vector v of C only
   to :math:`v^\top\tilde C v = \|\sum_i v_i E_i/\sqrt{G_{ii}}\|^2 \le B\varepsilon_{\mathrm{grad}}^2`
   (second order: it is a Gram), which matters when a float32-gradient Gram is accumulated in
   float64.
4. *Relative accuracy.* For a resolved eigenvalue, the perturbation of the graded matrix
   :math:`G = DCD` moves it by a relative amount :math:`\lesssim \|\delta C\|_2/\mu`
   (Demmel & Veselić, SIAM J. Matrix Anal. Appl. 13(4), 1992; Mathias, 1995): small
   eigenvalues that belong to small-norm samples stay accurate, which a tolerance relative to
   :math:`\lambda_{\max}` (the ``matrix_rank`` rule :math:`B\varepsilon\lambda_{\max}`) throws
   away, capping :math:`c_k` at :math:`1/(B\varepsilon)`.
5. *Projection.* Taking the r-th largest eigenvalue of G is not enough when C is singular: a
   null direction among large-norm samples can carry more rounding than a real eigenvalue of a
   small-norm sample, so the resolved subspace is projected out explicitly — except when
   the r-th largest eigenvalue of G lies at least 10³ times above the bound
   :math:`\max_i G_{ii}\cdot\max_{\mu_k \le \tau}|\mu_k|` on what the unresolved directions
   carry (Weyl's inequality): then it
   is :math:`\lambda_{\min}^{+}` to a relative 10⁻³, and the eigenvalues of C
   suffice (host route only; the jit-safe route always projects).

The eigen-solve itself (float64, or float32 in JAX without x64) resolves eigenvalues down to
about :math:`B\varepsilon_{\mathrm{eig}}\lambda_{\max}`, the second term of
:math:`c_{\mathrm{limit}}`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from ._namespace import compute_dtype, default_int_dtype, eps_of

__all__ = ["Resolution", "rank_tolerance"]

#: the constant γ in front of B·ε (see the module docstring, point 2)
SLACK = 8.0


class Resolution(NamedTuple):
    r"""How :math:`c_k` was resolved (0-D arrays in the Gram's namespace).

    Attributes:
        c: :math:`c_k = \lambda_{\max}/\lambda_{\min}^{+}` (NaN when undefined).
        lambda_max: :math:`\lambda_{\max}(G)`.
        lambda_min: :math:`\lambda_{\min}^{+}` (NaN when undefined).
        rank: resolved rank r (eigenvalues of C above τ, or of G above rtol·λ_max).
        zero_rows: rows with :math:`G_{ii} = 0` (samples with a zero gradient), excluded.
        limit: :math:`c_{\mathrm{limit}}`, the largest :math:`c_k` this Gram could resolve.
        limited: :math:`c_k \ge c_{\mathrm{limit}}/2`.
        defined: :math:`\lambda_{\max} > 0` and finite.
    """

    c: Any
    lambda_max: Any
    lambda_min: Any
    rank: Any
    zero_rows: Any
    limit: Any
    limited: Any
    defined: Any


def rank_tolerance(batch_size: int, gram_dtype: Any, grad_dtype: Any = None, *,
                   xp: Any = None) -> float:
    r"""The rank threshold :math:`\tau = 8B(\varepsilon_{\mathrm{acc}} + \varepsilon_{\mathrm{grad}}^2)` on C.

    Args:
        batch_size: :math:`B^{+}`, the number of non-zero rows of the Gram.
        gram_dtype: dtype the Gram was accumulated in.
        grad_dtype: dtype of the per-sample gradients (default: ``gram_dtype``).
        xp: optional namespace whose ``finfo`` understands the dtypes; when given, its
            compute dtype (float64, or float32 in JAX without x64) bounds
            :math:`\varepsilon_{\mathrm{acc}}` from below.

    Returns:
        τ as a Python float.

    Example:
        >>> import numpy as np
        >>> from fimcore import rank_tolerance
        >>> eps32, eps64 = np.finfo(np.float32).eps, np.finfo(np.float64).eps
        >>> bool(rank_tolerance(128, np.float32) == 8 * 128 * (eps32 + eps32**2))
        True
        >>> bool(rank_tolerance(2, np.float64, np.float32) == 16 * (eps64 + eps32**2))
        True
    """
    eps_acc = eps_of(gram_dtype, xp)
    if xp is not None:
        eps_acc = max(eps_acc, eps_of(compute_dtype(xp), xp))
    eps_grad = eps_of(grad_dtype if grad_dtype is not None else gram_dtype, xp)
    return SLACK * batch_size * (eps_acc + eps_grad**2)


def resolved(sym: Any, eigs: Any, *, eps_acc: float, eps_grad: float, xp: Any,
             project: bool) -> Resolution:
    r""":class:`Resolution` of a symmetric Gram in the compute dtype with ascending ``eigs``.

    ``project=True`` always takes the projection route (value-independent, ``jax.jit``-safe).
    ``project=False`` (numpy, torch, array_api_strict) first tests on the host whether every
    row is non-zero and C − τI is positive definite (one Cholesky factorisation, a third of
    an ``eigvalsh``); then :math:`\lambda_{\min}^{+} = \lambda_{\min}(G)` and nothing else is
    needed. Otherwise it projects.
    """
    size = sym.shape[0]
    diag = xp.linalg.diagonal(sym)
    nonzero = diag > 0
    n_nonzero = xp.sum(xp.astype(nonzero, sym.dtype))
    tau = SLACK * n_nonzero * (eps_acc + eps_grad**2)
    lam_max = eigs[-1]
    int_dtype = default_int_dtype(xp, device=_device(sym))
    if not project and bool(xp.all(nonzero)):
        d = xp.sqrt(diag)
        c_mat = sym / (d[:, None] * d[None, :])
        # λ_min(G) ≥ λ_min(C)·min G_ii (Ostrowski): C − τI positive definite puts λ_min(G)
        # above τ·min G_ii. When the computed λ_min(G) lies below that, the Cholesky test is
        # skipped. It is a fast path only: the eigenvalue route below finds r = B by itself
        # whenever the rank is full, so skipping it never changes the result's meaning.
        maybe_definite = bool(eigs[0] >= tau * xp.min(diag))
        if maybe_definite and _positive_definite(c_mat, tau, xp=xp):
            rank = xp.asarray(size, dtype=int_dtype, device=_device(sym))
            return _limit_and_finish(lam_max, eigs[0], rank, diag, nonzero, tau, xp=xp)
        separated = _separated_minimum(c_mat, eigs, diag, tau, xp=xp)
        if separated is not None:
            lam_min, rank = separated
            return _limit_and_finish(lam_max, lam_min, rank, diag, nonzero, tau, xp=xp)
        lam_min, rank = _projected_minimum(c_mat, d, tau, xp=xp, host=True)
        return _limit_and_finish(lam_max, lam_min, rank, diag, nonzero, tau, xp=xp)
    one = xp.ones_like(diag)
    d = xp.sqrt(xp.where(nonzero, diag, one))
    # zero rows become a decoupled eigenvalue −1 of C: far from the spectrum, never resolved
    eye = xp.eye(size, dtype=sym.dtype, device=_device(sym))
    c_mat = sym / (d[:, None] * d[None, :])
    c_mat = xp.where(nonzero[:, None] & nonzero[None, :], c_mat, -eye)
    lam_min, rank = _projected_minimum(c_mat, d * xp.astype(nonzero, d.dtype), tau, xp=xp,
                                       host=not project)
    return _limit_and_finish(lam_max, lam_min, rank, diag, nonzero, tau, xp=xp)


def _limit_and_finish(lam_max, lam_min, rank, diag, nonzero, tau, *, xp) -> Resolution:
    r"""Add :math:`c_{\mathrm{limit}}` and the zero-row count to the resolved values."""
    size = diag.shape[0]
    defined = xp.logical_and(lam_max > 0, xp.isfinite(lam_max))
    d_min2 = xp.min(xp.where(nonzero, diag, xp.full_like(diag, float("inf"))))
    d_min2 = xp.where(xp.any(nonzero), d_min2, xp.zeros_like(d_min2))
    eps_eig = float(xp.finfo(diag.dtype).eps)
    floor = xp.maximum(tau * d_min2, SLACK * size * eps_eig * lam_max)
    zero_rows = xp.sum(xp.astype(xp.logical_not(nonzero), rank.dtype))
    limit = lam_max / xp.where(defined, floor, xp.ones_like(floor))
    return _finish(lam_max, lam_min, rank, zero_rows, limit, defined, xp=xp)


def legacy(eigs: Any, diag: Any, *, rtol: float, xp: Any) -> Resolution:
    r""":class:`Resolution` by a tolerance relative to :math:`\lambda_{\max}` (explicit ``rtol``).

    :math:`\lambda_{\min}^{+} = \min\{\lambda_i > \mathrm{rtol}\cdot\lambda_{\max}\}`;
    :math:`c_{\mathrm{limit}} = 1/\mathrm{rtol}` (for ``rtol = 0``, the eigen-solver's floor
    :math:`1/(8B\varepsilon_{\mathrm{eig}})`). ``diag`` (G's diagonal) counts the zero rows.
    """
    size = eigs.shape[0]
    lam_max = eigs[-1]
    above = eigs > rtol * lam_max
    lam_min = xp.min(xp.where(above, eigs, xp.full_like(eigs, float("inf"))))
    rank = xp.sum(xp.astype(above, default_int_dtype(xp, device=_device(eigs))))
    defined = xp.logical_and(lam_max > 0, xp.isfinite(lam_max))
    eps_eig = float(xp.finfo(eigs.dtype).eps)
    limit = 1.0 / rtol if rtol > 0 else 1.0 / (SLACK * size * eps_eig)
    zero_rows = xp.sum(xp.astype(diag <= 0, rank.dtype))
    return _finish(lam_max, lam_min, rank, zero_rows, xp.full_like(lam_max, limit), defined,
                   xp=xp)


def _finish(lam_max, lam_min, rank, zero_rows, limit, defined, *, xp) -> Resolution:
    one = xp.ones_like(lam_max)
    nan = xp.full_like(lam_max, float("nan"))
    # λ_min⁺ ≤ λ_max (on the projection route both come from different solves)
    lam_min = xp.where(defined, xp.minimum(lam_min, lam_max), nan)
    lam_min = xp.where(rank <= 1, lam_max, lam_min)   # one resolved eigenvalue: c = 1 exactly
    c = xp.where(defined, lam_max / xp.where(defined, lam_min, one), nan)
    limit = xp.where(defined, limit, nan)
    limited = xp.logical_and(defined, c >= limit / 2)
    return Resolution(c=c, lambda_max=lam_max, lambda_min=lam_min, rank=rank,
                      zero_rows=zero_rows, limit=limit, limited=limited, defined=defined)


def _positive_definite(c_mat: Any, tau: Any, *, xp: Any) -> bool:
    """Host test: C − τI is positive definite (its Cholesky factorisation exists)."""
    eye = xp.eye(c_mat.shape[0], dtype=c_mat.dtype, device=_device(c_mat))
    try:
        factor = xp.linalg.cholesky(c_mat - tau * eye)
    except (ValueError, RuntimeError, ArithmeticError):  # numpy LinAlgError, torch LinAlgError
        return False
    return bool(xp.all(xp.isfinite(xp.linalg.diagonal(factor))))


#: how far above the unresolved part's bound the r-th largest eigenvalue of G must lie to be
#: taken for λ_min⁺ without the projection (relative error ≤ 1/SEPARATION, see below). The
#: projection's own answer is accurate only to a relative ~‖δC‖/μ_r (the rounding of C against
#: its smallest resolved eigenvalue); the shortcut's bound b/λ_min⁺ exceeds that by at most the
#: spread max G_ii / min G_ii, so 10⁻³ adds little where it is taken.
SEPARATION = 1e3


def _separated_minimum(c_mat: Any, eigs: Any, diag: Any, tau: Any, *,
                       xp: Any) -> tuple[Any, Any] | None:
    r"""Host shortcut when the resolved and unresolved parts of G are far apart, else None.

    Split :math:`C = C_r + C_n` along its eigenvectors (:math:`\mu > \tau` and the rest). The
    projection's :math:`\lambda_{\min}^{+}` is the smallest non-zero eigenvalue of
    :math:`D C_r D`, which has rank r; and :math:`\|D C_n D\|_2 \le b = \max_i G_{ii}\cdot
    (\max_{\mu_k \le \tau} |\mu_k| + 8B\varepsilon_{\mathrm{eig}}\mu_{\max})` (the unresolved
    eigenvalues of C as computed, plus the eigen-solver's error). By Weyl's inequality every eigenvalue of
    :math:`G = D C_r D + D C_n D` lies within b of the same-index one of :math:`D C_r D`, so the
    r-th largest eigenvalue of G is :math:`\lambda_{\min}^{+}` to a relative
    :math:`b/\lambda \le 1/\mathrm{SEPARATION}` when it is at least SEPARATION·b. That needs
    the eigenvalues of C only (no eigenvectors): one ``eigvalsh`` instead of an ``eigh``.
    """
    size = c_mat.shape[0]
    mu = xp.sort(xp.linalg.eigvalsh(c_mat))
    r = int(xp.sum(xp.astype(mu > tau, default_int_dtype(xp, device=_device(c_mat)))))
    if r == 0:
        return None
    if r == size:
        return eigs[0], xp.asarray(r, dtype=default_int_dtype(xp, device=_device(c_mat)),
                                   device=_device(c_mat))
    # ‖C_n‖₂: the largest unresolved |μ| as computed, plus the eigen-solver's own error
    unresolved = xp.max(xp.abs(mu[: size - r]))
    solver = SLACK * size * float(xp.finfo(mu.dtype).eps) * mu[-1]
    bound = xp.max(diag) * (unresolved + solver)
    candidate = eigs[size - r]
    if not bool(candidate >= SEPARATION * bound):
        return None
    return candidate, xp.asarray(r, dtype=default_int_dtype(xp, device=_device(c_mat)),
                                 device=_device(c_mat))


def _projected_minimum(c_mat: Any, d: Any, tau: Any, *, xp: Any,
                       host: bool = False) -> tuple[Any, Any]:
    """(λ_min of G on the resolved eigenvectors of C, resolved rank r).

    Value-independent unless ``host``: then only the r resolved columns enter the r×r
    eigenproblem (``eigh`` returns eigenvalues ascending, so they are the last r).
    """
    mu, vecs = xp.linalg.eigh(c_mat)
    keep = mu > tau
    rank = xp.sum(xp.astype(keep, default_int_dtype(xp, device=_device(c_mat))))
    size = c_mat.shape[0]
    if host:
        r = int(rank)
        if r == 0:
            return xp.asarray(float("inf"), dtype=c_mat.dtype, device=_device(c_mat)), rank
        factor = (d[:, None] * vecs[:, size - r:]) * xp.sqrt(mu[size - r:])[None, :]
        inner = xp.matmul(xp.matrix_transpose(factor), factor)
        return xp.min(xp.linalg.eigvalsh((inner + xp.matrix_transpose(inner)) / 2)), rank
    root = xp.sqrt(xp.where(keep, mu, xp.zeros_like(mu)))
    factor = (d[:, None] * vecs) * root[None, :]          # L = D V_r M_r^{1/2} (masked)
    inner = xp.matmul(xp.matrix_transpose(factor), factor)
    inner = (inner + xp.matrix_transpose(inner)) / 2
    lam = xp.sort(xp.linalg.eigvalsh(inner))
    position = xp.arange(size, device=_device(c_mat))
    top = position >= (size - xp.astype(rank, position.dtype))
    lam_min = xp.min(xp.where(top, lam, xp.full_like(lam, float("inf"))))
    return lam_min, rank


def _device(x: Any) -> Any:
    return array_api_compat.device(x)
