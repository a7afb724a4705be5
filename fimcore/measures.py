r"""Pure running measures over a NamedTuple state (optax style, ``jax.jit``-safe).

Source: Liao et al., IEEE TPAMI 2020, arXiv 1810.06767. Over the measured iterations
:math:`\mathcal M` up to iteration K,

.. math::

    \bar C_K = \frac{1}{|\mathcal M|}\sum_{k\in\mathcal M} c_k, \qquad
    L_K = \sum_{k\in\mathcal M} w_k\, I_k, \qquad
    I_k = \frac{\alpha_k}{B_k}\sqrt{\operatorname{Tr} G_k},

with :math:`c_k = \lambda_{\max}(G_k)/\lambda_{\min}^{+}(G_k)` and :math:`w_k` the number of
training iterations measurement k stands for.

:func:`measure_init` / :func:`measure_update` never raise on values and never branch on them
in Python: a non-finite Gram or an undefined :math:`c_k` (all-zero Gram) is flagged in the
state (``finite``, ``defined``) and counted, so the pair works under ``jax.jit`` and as a
``lax.scan`` carry. :class:`fimcore.MeasureTracker` wraps the same per-step computation with
host-side checks, records and checkpoints.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._namespace import (
    check_gram,
    check_nonnegative_number,
    check_positive_int,
    check_positive_number,
    compute_dtype,
    default_int_dtype,
    jit_for,
    resolve_namespace,
)
from .rank import legacy
from .spectral import (_eigs, condition_of, default_rtol, dtype_epsilons, must_project,
                       resolve_rtol, symmetrise)

__all__ = ["MeasureState", "measure_init", "measure_update"]


class MeasureState(NamedTuple):
    r"""State of the pure running measures (every field a scalar or 0-D array).

    Running totals: ``steps`` (updates so far, k of the last one), ``measured`` (steps with
    a defined :math:`c_k`), ``skipped`` (steps without: undefined or non-finite),
    ``nonfinite`` (of which non-finite), ``limited`` (defined steps whose :math:`c_k` is
    within a factor 2 of the largest value the Gram could resolve), ``c_sum`` =
    :math:`\sum c_k`, ``c_jacobian_sum`` = :math:`\sum\sqrt{c_k}` over defined steps, and
    ``L`` = :math:`L_K = \sum_k w_k I_k`. Hence :math:`\bar C_K` = ``c_sum / measured``.

    Last step: ``c_k``, ``c_k_jacobian`` (NaN when undefined), ``I_k``, ``trace``,
    ``lambda_max``, ``rank`` (resolved rank), ``zero_rows`` (samples with a zero gradient,
    excluded), ``c_limit`` (:math:`c_{\mathrm{limit}}`, the largest resolvable
    :math:`c_k`), ``resolution_limited`` (:math:`c_k \ge c_{\mathrm{limit}}/2`),
    ``c_k_legacy`` (:math:`c_k` under the legacy tolerance :math:`B\varepsilon_{\mathrm{grad}}
    \lambda_{\max}`, kept for one release), ``defined``, ``finite`` (NaN fields where the
    Gram was not finite). The rule: :mod:`fimcore.rank`.
    """

    steps: Any
    measured: Any
    skipped: Any
    nonfinite: Any
    limited: Any
    c_sum: Any
    c_jacobian_sum: Any
    L: Any
    c_k: Any
    c_k_jacobian: Any
    I_k: Any
    trace: Any
    lambda_max: Any
    rank: Any
    zero_rows: Any
    c_limit: Any
    resolution_limited: Any
    c_k_legacy: Any
    defined: Any
    finite: Any


def measure_init(*, xp: Any = None, device: Any = None) -> MeasureState:
    """Initial :class:`MeasureState`: zero totals, no last step.

    Args:
        xp: namespace to build the state in (needed when the state is a ``lax.scan``
            carry, whose dtypes must not change); Python scalars when None.
        device: device of the arrays when ``xp`` is given.

    Example:
        >>> import numpy as np
        >>> from fimcore import measure_init, measure_update
        >>> state = measure_init()
        >>> state = measure_update(state, np.diag([4.0, 1.0]), lr=0.1)
        >>> int(state.steps), float(state.c_sum / state.measured), bool(state.defined)
        (1, 4.0, True)
    """
    nan = float("nan")
    fields = dict(
        steps=0, measured=0, skipped=0, nonfinite=0, limited=0, c_sum=0.0,
        c_jacobian_sum=0.0, L=0.0, c_k=nan, c_k_jacobian=nan, I_k=nan, trace=nan,
        lambda_max=nan, rank=0, zero_rows=0, c_limit=nan, resolution_limited=False,
        c_k_legacy=nan, defined=False, finite=True,
    )
    if xp is None:
        return MeasureState(**fields)
    fdt, idt = compute_dtype(xp), default_int_dtype(xp, device)
    return MeasureState(
        **{
            name: xp.asarray(
                value,
                dtype=xp.bool if isinstance(value, bool) else idt if isinstance(value, int) else fdt,
                device=device,
            )
            for name, value in fields.items()
        }
    )


def measure_update(
    state: MeasureState,
    gram: Any,
    *,
    lr: Any,
    weight: Any = 1,
    batch_size: int | None = None,
    rtol: float | None = None,
    grad_dtype: Any = None,
    xp: Any = None,
) -> MeasureState:
    r"""Add one measured iteration to the running measures (pure, ``jax.jit``-safe).

    Only metadata is validated (shape, dtype, option ranges of Python numbers); values are
    never inspected on the host, so a traced Gram, ``lr`` or ``weight`` works.

    Args:
        state: the previous :class:`MeasureState`.
        gram: (B, B) Gram matrix :math:`G_k` of the iteration.
        lr: learning rate :math:`\alpha_k` in force (>= 0).
        weight: :math:`w_k`, training iterations this measurement stands for (> 0).
        batch_size: :math:`B_k`; defaults to the Gram's size.
        rtol: None (the resolved rank of :mod:`fimcore.rank`) or an explicit tolerance
            relative to :math:`\lambda_{\max}` (``rtol=0``: exact zero after clamping).
        grad_dtype: dtype of the per-sample gradients the Gram was built from.
        xp: array namespace; resolved from ``gram`` when None.

    Returns:
        The new state; its last-step fields describe this iteration.

    Raises:
        ValueError, TypeError: on bad metadata (as :func:`fimcore.spectrum`,
            :func:`fimcore.weighted_energy`), never on values.
    """
    xp = resolve_namespace(gram, xp=xp)
    opts = check_options(gram, xp, lr=lr, weight=weight, batch_size=batch_size, rtol=rtol,
                         grad_dtype=grad_dtype)
    step = jit_for(step_values, xp, static=STEP_STATIC)(gram, lr, **opts)
    zero = xp.zeros_like(step["c_k"])
    int_dtype = getattr(state.steps, "dtype", None)
    if int_dtype is None:
        int_dtype = default_int_dtype(xp)

    def one_if(flag: Any) -> Any:
        return xp.astype(flag, int_dtype)

    defined, finite = step["defined"], step["finite"]
    return MeasureState(
        steps=state.steps + 1,
        measured=state.measured + one_if(defined),
        skipped=state.skipped + one_if(xp.logical_not(defined)),
        nonfinite=state.nonfinite + one_if(xp.logical_not(finite)),
        limited=state.limited + one_if(step["resolution_limited"]),
        c_sum=state.c_sum + xp.where(defined, step["c_k"], zero),
        c_jacobian_sum=state.c_jacobian_sum + xp.where(defined, step["c_k_jacobian"], zero),
        L=state.L + xp.where(finite, weight * step["I_k"], zero),
        c_k=step["c_k"],
        c_k_jacobian=step["c_k_jacobian"],
        I_k=step["I_k"],
        trace=step["trace"],
        lambda_max=step["lambda_max"],
        rank=step["rank"],
        zero_rows=step["zero_rows"],
        c_limit=step["c_limit"],
        resolution_limited=step["resolution_limited"],
        c_k_legacy=step["c_k_legacy"],
        defined=defined,
        finite=finite,
    )


#: keyword arguments of :func:`step_values` that are Python values (static under ``jax.jit``)
STEP_STATIC = ("batch", "rtol", "legacy_rtol", "eps_acc", "eps_grad", "project", "symmetric")


def check_options(
    gram: Any, xp: Any, *, lr: Any, weight: Any, batch_size: int | None, rtol: float | None,
    grad_dtype: Any,
) -> dict[str, Any]:
    """Validate the metadata of one update; return the static options of :func:`step_values`."""
    size = check_gram(gram, xp)
    check_nonnegative_number(lr, name="lr")
    check_positive_number(weight, name="weight")
    batch = size if batch_size is None else check_positive_int(batch_size, name="batch_size")
    if rtol is not None:
        rtol = resolve_rtol(rtol, size, gram.dtype, xp)
    grad = grad_dtype if grad_dtype is not None else gram.dtype
    eps_acc, eps_grad = dtype_epsilons(gram.dtype, grad, xp)
    return dict(batch=batch, rtol=rtol, legacy_rtol=_legacy_rtol(size, grad, xp),
                eps_acc=eps_acc, eps_grad=eps_grad, project=must_project(xp))


def _legacy_rtol(size: int, dtype: Any, xp: Any) -> float:
    """B·eps(gradient dtype), or 0 where that would reach 1 (tiny dtypes, huge B)."""
    try:
        return default_rtol(size, dtype, xp=xp)
    except ValueError:
        return 0.0


def step_values(
    gram: Any, lr: Any, *, batch: int, rtol: float | None, legacy_rtol: float, eps_acc: float,
    eps_grad: float, project: bool, xp: Any, symmetric: bool = False,
) -> dict[str, Any]:
    """Per-iteration quantities, NaN-flagged instead of raising (no value branching).

    ``symmetric=True`` says ``gram`` is already (G + Gᵀ)/2 in the compute dtype.
    """
    g = xp.astype(gram, compute_dtype(xp), copy=False)
    finite = xp.isfinite(xp.max(xp.abs(g)))  # max propagates NaN; inf stays inf
    g = xp.where(finite, g, xp.zeros_like(g))
    sym = g if symmetric else symmetrise(g, xp=xp)
    eigs = _eigs(sym, xp=xp)
    res = condition_of(sym, eigs, rtol=rtol, eps_acc=eps_acc, eps_grad=eps_grad,
                       project=project, xp=xp)
    old = legacy(eigs, xp.linalg.diagonal(sym), rtol=legacy_rtol, xp=xp)
    nan = xp.full_like(res.c, float("nan"))
    trace = xp.sum(xp.linalg.diagonal(sym))
    i_k = (lr / batch) * xp.sqrt(xp.maximum(trace, xp.zeros_like(trace)))
    defined = xp.logical_and(res.defined, finite)
    return {
        "c_k": res.c,
        "c_k_jacobian": xp.sqrt(res.c),
        "I_k": xp.where(finite, i_k, nan),
        "trace": xp.where(finite, trace, nan),
        "lambda_max": xp.where(finite, res.lambda_max, nan),
        "rank": res.rank,
        "zero_rows": res.zero_rows,
        "c_limit": res.limit,
        "resolution_limited": xp.logical_and(res.limited, finite),
        "c_k_legacy": old.c,
        "defined": defined,
        "finite": finite,
    }
