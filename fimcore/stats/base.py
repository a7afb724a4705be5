r"""Composable statistics of the per-step Gram: pure ``init``/``update`` pairs (the optax pattern).

A :class:`Statistic` owns one NamedTuple state. ``init`` builds it (Python scalars, or 0-D
arrays of a namespace for ``jax.jit``/``lax.scan`` carries); ``update(state, step, xp=...)``
returns the next state from the :class:`StepInputs` of one measured iteration and never raises
on values or branches on them in Python, so it traces under ``jax.jit``. ``record`` turns a
state whose leaves are Python numbers into the fields of one measurement record; field names
are unique across statistics, so records can be written flat (``metrics.jsonl``) and read back.

The quantities every statistic may need are computed once per step by :func:`step_inputs`:
the symmetrised Gram in the compute dtype (zeros where it was not finite), its ascending
clamped eigenvalues, the finiteness flag, the learning rate, the weight (iterations the
measurement stands for), the batch size and the dtype epsilons of :mod:`fimcore.rank`.

Writing a new statistic is one module: a NamedTuple state, a frozen dataclass subclass of
:class:`Statistic` with ``name``, ``fields``, ``init``, ``update`` and ``record``, and a line
registering it with :func:`register_statistic` so that checkpoints naming it load again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

from .._namespace import compute_dtype, default_int_dtype

__all__ = ["Statistic", "StepInputs", "make_state", "register_statistic", "statistic_from_config",
           "to_host"]

_REGISTRY: dict[str, type] = {}


class StepInputs(NamedTuple):
    r"""What one measured iteration hands every statistic.

    Attributes:
        gram: :math:`(G + G^\top)/2` in the compute dtype (zeros where G was not finite).
        eigs: its ascending eigenvalues, clamped at 0.
        finite: whether G was finite (0-D bool).
        lr: :math:`\alpha_k`; weight: :math:`w_k`, iterations the measurement stands for.
        batch: :math:`B_k` (static); eps_acc, eps_grad: epsilons of the accumulation and
            gradient dtypes; legacy_rtol: :math:`B\varepsilon_{\mathrm{grad}}`; project: take the
            value-independent route of :mod:`fimcore.rank` (static).
        num_params: P, the number of parameters the Gram covers, when known (static).
        blocks: per-layer symmetrised Grams ``{layer: (B, B)}`` summing to ``gram``, or None.
    """

    gram: Any
    eigs: Any
    finite: Any
    lr: Any
    weight: Any
    batch: int
    eps_acc: float
    eps_grad: float
    legacy_rtol: float
    project: bool
    num_params: int | None = None
    blocks: dict | None = None


@dataclasses.dataclass(frozen=True)
class Statistic:
    """Base class of a running statistic (subclass as a frozen dataclass; options are fields).

    Class attributes:
        name: the key of this statistic in records and checkpoints.
        fields: the record fields it contributes (unique across statistics).
    """

    name: ClassVar[str] = "statistic"
    fields: ClassVar[tuple[str, ...]] = ()

    def init(self, *, xp: Any = None, device: Any = None) -> NamedTuple:
        """The state before any step (Python scalars when ``xp`` is None)."""
        raise NotImplementedError

    def update(self, state: NamedTuple, step: StepInputs, *, xp: Any) -> NamedTuple:
        """The state after one measured step (pure; no value branching)."""
        raise NotImplementedError

    def record(self, state: NamedTuple) -> dict[str, Any]:
        """Record fields from a state of Python numbers (``None`` where undefined)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The options that rebuild this statistic (JSON-serialisable)."""
        return dataclasses.asdict(self)


def register_statistic(cls: type) -> type:
    """Register a :class:`Statistic` subclass by its ``name`` (usable as a decorator).

    Raises:
        TypeError: ``cls`` is not a Statistic subclass.
        ValueError: another class already has this name or one of its fields.
    """
    if not (isinstance(cls, type) and issubclass(cls, Statistic)):
        raise TypeError(f"register_statistic needs a Statistic subclass; received {cls!r}.")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(f"a statistic named {cls.name!r} is already registered ({other.__qualname__}).")
    taken = {f: c.name for c in _REGISTRY.values() if c is not cls for f in c.fields}
    clash = sorted(f for f in cls.fields if f in taken)
    if clash:
        raise ValueError(f"statistic {cls.name!r} reuses record fields {clash} of "
                         f"{sorted({taken[f] for f in clash})}; record fields must be unique.")
    _REGISTRY[cls.name] = cls
    return cls


def statistic_from_config(name: str, config: dict[str, Any]) -> Statistic:
    """Rebuild a registered statistic from its name and :meth:`Statistic.config`.

    Raises:
        ValueError: no statistic of that name is registered (import its module first).
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"no statistic named {name!r} is registered (known: {sorted(_REGISTRY)}); "
                         "import the module that defines it before loading the state.")
    return cls(**config)


def registered_fields() -> dict[str, str]:
    """``{record field: statistic name}`` over every registered statistic."""
    return {f: c.name for c in _REGISTRY.values() for f in c.fields}


def make_state(cls: type, values: dict[str, Any], *, xp: Any = None, device: Any = None):
    """A NamedTuple ``cls`` of Python values, or of 0-D arrays in ``xp`` (bool, int, float kept)."""
    if xp is None:
        return cls(**values)
    fdt, idt = compute_dtype(xp), default_int_dtype(xp, device)

    def dtype_of(v):
        return xp.bool if isinstance(v, bool) else idt if isinstance(v, int) else fdt

    return cls(**{k: xp.asarray(v, dtype=dtype_of(v), device=device) for k, v in values.items()})


def to_host(value: Any) -> Any:
    """A 0-D array (or a dict/tuple of them) as Python bool/int/float; NaN stays NaN."""
    if isinstance(value, dict):
        return {k: to_host(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(to_host(v) for v in value))
    if value is None or type(value) in (bool, int, float):
        return value
    detach = getattr(value, "detach", None)
    if callable(detach):
        value = detach()
    dtype = str(getattr(value, "dtype", ""))
    if "bool" in dtype:
        return bool(value)
    if "int" in dtype:
        return int(value)
    return float(value)


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float, or None for NaN/inf/None (what a record stores)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


#: statistics every tracker keeps (not selectable by name: they are always recorded)
ALWAYS = ("condition", "energy")


def statistics_from_names(names: Any) -> tuple:
    """The registered statistics a comma list (or iterable) of names selects, in registration order.

    A name is a statistic's ``name`` (``noise_scale``, ``batch_tests``, ``spectrum_shape``,
    ``fisher_spectrum``, ``per_layer``, …), one of its record fields (``norm_test`` selects
    ``batch_tests``, ``stable_rank`` selects ``spectrum_shape``), or ``all``. Each statistic is built
    with its defaults and appears once; ``condition`` and ``energy`` are always recorded and are
    not returned. This is what the reference CLI's ``--stats`` and the Keras callback's
    ``statistics=`` take.

    Raises:
        ValueError: an unknown name (the known ones are listed).

    Example:
        >>> [s.name for s in statistics_from_names("stable_rank,norm_test,noise_scale")]
        ['noise_scale', 'batch_tests', 'spectrum_shape']
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",")]
    names = [n for n in names if n]
    by_field = registered_fields()
    selectable = {s for s in _REGISTRY if s not in ALWAYS}
    known = selectable | {f for f, s in by_field.items() if s in selectable}
    unknown = [n for n in names if n != "all" and n not in known]
    if unknown:
        raise ValueError(f"statistics must be named from {sorted(known | {'all'})}; received unknown "
                         f"{unknown}.")
    wanted = selectable if "all" in names else {n if n in _REGISTRY else by_field[n] for n in names}
    return tuple(cls() for name, cls in _REGISTRY.items() if name in wanted)
