r"""Pure running measures over a NamedTuple state (optax style, ``jax.jit``-safe).

Source: Liao et al., IEEE TPAMI 2020, arXiv 1810.06767. Over the measured iterations
:math:`\mathcal M` up to iteration K,

.. math::

    \bar C_K = \frac{1}{|\mathcal M|}\sum_{k\in\mathcal M} c_k, \qquad
    L_K = \sum_{k\in\mathcal M} w_k\, I_k, \qquad
    I_k = \frac{\alpha_k}{B_k}\sqrt{\operatorname{Tr} G_k},

with :math:`c_k = \lambda_{\max}(G_k)/\lambda_{\min}^{+}(G_k)` and :math:`w_k` the number of
training iterations measurement k stands for.

The state holds a step counter, a count of non-finite Grams and one state per statistic
(:mod:`fimcore.stats`; by default :class:`~fimcore.stats.Condition` and
:class:`~fimcore.stats.Energy`). :func:`measure_init` / :func:`measure_update` never raise on
values and never branch on them in Python: a non-finite Gram or an undefined :math:`c_k`
(all-zero Gram) is flagged in the state and counted, so the pair works under ``jax.jit`` and as
a ``lax.scan`` carry. :class:`fimcore.MeasureTracker` wraps the same per-step computation with
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
from .spectral import _eigs, default_rtol, dtype_epsilons, must_project, symmetrise
from .stats import DEFAULT, Condition, Energy, Statistic, StepInputs

__all__ = ["MeasureState", "measure_init", "measure_update"]


class MeasureState(NamedTuple):
    r"""State of the pure running measures.

    Attributes:
        steps: updates so far (k of the last one).
        nonfinite: updates whose Gram held NaN or inf.
        stats: one state per statistic, in the order of the statistics tuple.

    Fields of the statistics' states read through, for the default pair: ``state.c_k``,
    ``state.c_sum / state.measured`` (:math:`\bar C_K`), ``state.L`` (:math:`L_K`), ...
    """

    steps: Any
    nonfinite: Any
    stats: tuple

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for sub in tuple.__getitem__(self, 2):
            if name in getattr(type(sub), "_fields", ()):
                return getattr(sub, name)
        raise AttributeError(f"MeasureState has no field {name!r} (statistics' fields: "
                             f"{[f for s in tuple.__getitem__(self, 2) for f in s._fields]})")


def resolve_statistics(statistics: Any, rtol: float | None) -> tuple[Statistic, ...]:
    """The statistics tuple: ``statistics``, or the default pair with ``rtol`` applied.

    Raises:
        TypeError: an entry is not a :class:`fimcore.stats.Statistic`.
        ValueError: both ``statistics`` and ``rtol`` are given, or two share a name.
    """
    if statistics is None:
        return DEFAULT if rtol is None else (Condition(rtol=rtol), Energy())
    if rtol is not None:
        raise ValueError("pass rtol either to Condition(rtol=...) inside statistics or alone, not "
                         "both; received statistics and rtol.")
    stats = tuple(statistics)
    bad = [s for s in stats if not isinstance(s, Statistic)]
    if bad or not stats:
        raise TypeError(f"statistics must be a non-empty sequence of fimcore.stats.Statistic "
                        f"instances; received {[type(s).__name__ for s in bad] or 'none'}.")
    names = [s.name for s in stats]
    if len(set(names)) != len(names):
        raise ValueError(f"statistics must have distinct names; received {names}.")
    return stats


def measure_init(*, statistics: Any = None, rtol: float | None = None, xp: Any = None,
                 device: Any = None) -> MeasureState:
    """Initial :class:`MeasureState`: zero totals, no last step.

    Args:
        statistics: the statistics to keep (default ``(Condition(), Energy())``).
        rtol: shorthand for ``statistics=(Condition(rtol=rtol), Energy())``.
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
    stats = resolve_statistics(statistics, rtol)
    if xp is None:
        counters = (0, 0)
    else:
        idt = default_int_dtype(xp, device)
        counters = tuple(xp.asarray(0, dtype=idt, device=device) for _ in range(2))
    return MeasureState(*counters, tuple(s.init(xp=xp, device=device) for s in stats))


def measure_update(
    state: MeasureState,
    gram: Any,
    *,
    lr: Any,
    weight: Any = 1,
    batch_size: int | None = None,
    rtol: float | None = None,
    grad_dtype: Any = None,
    statistics: Any = None,
    num_params: int | None = None,
    blocks: dict | None = None,
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
        rtol: shorthand for ``statistics=(Condition(rtol=rtol), Energy())``.
        grad_dtype: dtype of the per-sample gradients the Gram was built from.
        statistics: the statistics ``state`` was initialised with (default pair).
        num_params: P, the number of parameters the Gram covers (statistics that need it).
        blocks: per-layer Grams ``{layer: (B, B)}`` summing to ``gram`` (per-layer statistics).
        xp: array namespace; resolved from ``gram`` when None.

    Returns:
        The new state; its last-step fields describe this iteration.

    Raises:
        ValueError, TypeError: on bad metadata (as :func:`fimcore.spectrum`,
            :func:`fimcore.weighted_energy`), or statistics that do not match ``state``;
            never on values.
    """
    xp = resolve_namespace(gram, xp=xp)
    stats = resolve_statistics(statistics, rtol)
    if len(stats) != len(state.stats):
        raise ValueError(f"state holds {len(state.stats)} statistics but {len(stats)} were given; "
                         "pass the statistics measure_init was called with.")
    opts = check_options(gram, xp, lr=lr, weight=weight, batch_size=batch_size,
                         grad_dtype=grad_dtype, num_params=num_params)
    new, finite = jit_for(update_statistics, xp, static=STEP_STATIC)(
        state.stats, gram, lr, weight, blocks, statistics=stats, **opts)
    int_dtype = getattr(state.steps, "dtype", None)
    if int_dtype is None:
        int_dtype = default_int_dtype(xp)
    return MeasureState(state.steps + 1,
                        state.nonfinite + xp.astype(xp.logical_not(finite), int_dtype), new)


#: keyword arguments of :func:`update_statistics` that are Python values (static under ``jax.jit``)
STEP_STATIC = ("statistics", "batch", "legacy_rtol", "eps_acc", "eps_grad", "project",
               "num_params", "symmetric")


def check_options(
    gram: Any, xp: Any, *, lr: Any, weight: Any, batch_size: int | None, grad_dtype: Any,
    num_params: int | None = None,
) -> dict[str, Any]:
    """Validate the metadata of one update; return the static options of :func:`update_statistics`."""
    size = check_gram(gram, xp)
    check_nonnegative_number(lr, name="lr")
    check_positive_number(weight, name="weight")
    batch = size if batch_size is None else check_positive_int(batch_size, name="batch_size")
    if num_params is not None:
        num_params = check_positive_int(num_params, name="num_params")
    grad = grad_dtype if grad_dtype is not None else gram.dtype
    eps_acc, eps_grad = dtype_epsilons(gram.dtype, grad, xp)
    return dict(batch=batch, legacy_rtol=_legacy_rtol(size, grad, xp), eps_acc=eps_acc,
                eps_grad=eps_grad, project=must_project(xp), num_params=num_params)


def _legacy_rtol(size: int, dtype: Any, xp: Any) -> float:
    """B·eps(gradient dtype), or 0 where that would reach 1 (tiny dtypes, huge B)."""
    try:
        return default_rtol(size, dtype, xp=xp)
    except ValueError:
        return 0.0


def update_statistics(
    states: tuple, gram: Any, lr: Any, weight: Any, blocks: dict | None, *,
    statistics: tuple[Statistic, ...], batch: int, legacy_rtol: float, eps_acc: float,
    eps_grad: float, project: bool, num_params: int | None, xp: Any, symmetric: bool = False,
) -> tuple[tuple, Any]:
    """Every statistic's next state and the finiteness flag of the Gram (no value branching).

    ``symmetric=True`` says ``gram`` is already (G + Gᵀ)/2 in the compute dtype.
    """
    g = xp.astype(gram, compute_dtype(xp), copy=False)
    finite = xp.isfinite(xp.max(xp.abs(g)))  # max propagates NaN; inf stays inf
    g = xp.where(finite, g, xp.zeros_like(g))
    sym = g if symmetric else symmetrise(g, xp=xp)
    if blocks is not None:
        blocks = {name: symmetrise(xp.where(finite, b, xp.zeros_like(b)), xp=xp)
                  for name, b in blocks.items()}
    step = StepInputs(gram=sym, eigs=_eigs(sym, xp=xp), finite=finite, lr=lr, weight=weight,
                      batch=batch, eps_acc=eps_acc, eps_grad=eps_grad, legacy_rtol=legacy_rtol,
                      project=project, num_params=num_params, blocks=blocks)
    return tuple(stat.update(s, step, xp=xp) for stat, s in zip(statistics, states)), finite
