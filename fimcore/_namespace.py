"""Namespace resolution and input validation shared by every core function.

Every public function of :mod:`fimcore` resolves the caller's array namespace ``xp`` once
(through :func:`array_api_compat.array_namespace`), validates the *metadata* of its inputs
(rank, shape, dtype, option ranges) and then calls a private body that takes ``xp`` as a
required keyword. Value checks (finiteness, symmetry) need the data on the host; they are
done only when the array is concrete, never on a value traced by ``jax.jit``.

Error messages follow one pattern: *what must hold*, *what was received*, *how to fix it*.

No array framework is imported here: libraries are recognised through the objects the
caller hands over (``array_api_compat`` does this through ``sys.modules``).
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "check_gram",
    "check_nonnegative_number",
    "check_positive_int",
    "check_positive_number",
    "check_real_floating",
    "checked_symmetric",
    "compute_dtype",
    "default_int_dtype",
    "eps_of",
    "float64_available",
    "host_scalar",
    "is_concrete",
    "jit_for",
    "resolve_namespace",
    "symmetrise",
    "symmetry_tolerance",
    "validated_symmetric",
]

_JIT_CACHE: dict[tuple[Callable[..., Any], tuple[str, ...]], Callable[..., Any]] = {}


def jit_for(fn: Callable[..., Any], xp: Any, *, static: tuple[str, ...] = ()) -> Callable[..., Any]:
    """``fn`` with ``xp`` bound; in JAX compiled once per shape with ``jax.jit``.

    Eager JAX compiles every operation separately for each new shape, which makes a
    dozen small array operations cost seconds; one compiled body costs one compilation.
    Inside a caller's ``jax.jit`` the inner one is inlined. ``static`` names keyword
    arguments that are Python values fixing shapes (e.g. a batch size). Other namespaces
    get ``fn`` unchanged.
    """
    if not array_api_compat.is_jax_namespace(xp):
        return functools.partial(fn, xp=xp)
    key = (fn, static)
    compiled = _JIT_CACHE.get(key)
    if compiled is None:
        jax = sys.modules["jax"]
        compiled = jax.jit(functools.partial(fn, xp=xp), static_argnames=static)
        _JIT_CACHE[key] = compiled
    return compiled


def resolve_namespace(*arrays: Any, xp: Any = None) -> Any:
    """Return the array-API namespace of ``arrays`` (or ``xp`` when given).

    Raises:
        TypeError: if the arrays come from different array libraries, or an input is not
            an array of a library with an array-API namespace.
    """
    if xp is not None:
        return xp
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        kinds = sorted({f"{type(a).__module__}.{type(a).__qualname__}" for a in arrays})
        if len(kinds) > 1 and "Multiple namespaces" in str(exc):
            raise TypeError(
                "all arrays must come from one array library; received arrays of types "
                f"{kinds}. Convert them to one library first (e.g. torch.as_tensor or "
                "numpy.asarray)."
            ) from exc
        raise TypeError(
            "inputs must be arrays of a library with an array-API namespace (numpy, torch, "
            f"jax.numpy, array_api_strict, ...); received {kinds}. Convert with "
            "numpy.asarray(...) or pass a tensor of your framework."
        ) from exc


def is_concrete(x: Any) -> bool:
    """True unless ``x`` is a value being traced by a JAX transformation (``jax.jit``)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return True
    tracer = getattr(getattr(jax, "core", None), "Tracer", None)
    return tracer is None or not isinstance(x, tracer)


def check_real_floating(x: Any, xp: Any, *, name: str) -> None:
    """Raise ``TypeError`` unless ``x`` has a real floating-point dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating-point dtype (float32 or float64); received "
            f"dtype {x.dtype}. Cast it first, e.g. x.astype(float64) / x.to(torch.float64); "
            "complex and integer Grams are not supported."
        )


def check_gram(gram: Any, xp: Any, *, name: str = "gram") -> int:
    """Validate the metadata of a Gram matrix and return its size ``B``.

    Raises:
        ValueError: if ``gram`` is not 2-D or not square, or is empty.
        TypeError: if its dtype is not real floating.
    """
    shape = tuple(gram.shape)
    if len(shape) != 2:
        raise ValueError(
            f"{name} must be a 2-D (B, B) matrix; received an array of shape {shape} "
            f"(ndim={len(shape)}). Pass the B×B Gram matrix G = J Jᵀ, not J or a batch of Grams."
        )
    if shape[0] != shape[1]:
        raise ValueError(
            f"{name} must be square (B, B); received shape {shape}. If this is the per-sample "
            "gradient matrix J (B, P), build the Gram first with fimcore.gram(J)."
        )
    if shape[0] is None or shape[0] < 1:
        raise ValueError(
            f"{name} must hold at least one sample (B >= 1); received shape {shape}."
        )
    check_real_floating(gram, xp, name=name)
    return int(shape[0])


def validated_symmetric(
    gram: Any, xp: Any, *, name: str = "gram", where: str = "", allow_nonfinite: bool = False
) -> tuple[Any, bool | None]:
    """The symmetrised Gram (G + Gᵀ)/2 in the compute dtype, after host-side value checks.

    One pass builds the symmetric part and the statistics the checks need (the
    transposed read is the costly part for large B; it is done once). The checks, made
    only on concrete values: finite (unless ``allow_nonfinite``), symmetric within
    ``sqrt(eps)·max|G|`` of the Gram's dtype, non-negative diagonal.

    Returns:
        ``(sym, finite)``; ``finite`` is None for a value traced by JAX (no checks then).

    Raises:
        ValueError: naming what failed (and ``where``, e.g. the tracker step).
    """
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in a non-finite Gram
        sym, scale, asym, diag_min = jit_for(_symmetrised_stats, xp)(gram)
    if not is_concrete(sym):
        return sym, None
    at = f" {where}" if where else ""
    scale, asym, diag_min = host_scalar(scale), host_scalar(asym), host_scalar(diag_min)
    finite = math.isfinite(scale)
    if not finite:
        if allow_nonfinite:
            return sym, False
        raise ValueError(
            f"{name}{at} must be finite; received a Gram with NaN or inf entries. Check the "
            "loss and gradients for overflow (lower the learning rate, use float64), or pass "
            "on_nonfinite='skip' to a MeasureTracker to count and skip such steps."
        )
    tol = symmetry_tolerance(gram.dtype, xp)
    if asym > tol * scale:
        raise ValueError(
            f"{name}{at} must be symmetric (max|G - Gᵀ| <= {tol:.1e}·max|G|); received "
            f"max|G - Gᵀ| = {asym:.3e} with max|G| = {scale:.3e}. Pass G = J Jᵀ "
            "(fimcore.gram(J)); symmetrise a Gram assembled by hand with (G + Gᵀ)/2."
        )
    if diag_min < 0:
        raise ValueError(
            f"{name}{at} must have a non-negative diagonal (G_ii = ‖J_i‖² >= 0); received a "
            f"diagonal entry {diag_min:.3e}. Pass the Gram G = J Jᵀ of per-sample gradients."
        )
    return sym, True


def checked_symmetric(gram: Any, xp: Any) -> tuple[Any, bool | None]:
    r"""The lean counterpart of :func:`validated_symmetric` for a Gram an adapter built.

    An adapter forms :math:`G = \sum_l J_l J_l^\top` itself, so G is symmetric up to the
    rounding of its products and its diagonal :math:`G_{ii} = \|J_i\|^2` is non-negative: those
    checks are skipped. Finiteness is read off one scalar: for such a Gram
    :math:`|G_{ij}| \le \sqrt{G_{ii}G_{jj}}` (Cauchy–Schwarz), so G is finite exactly when
    :math:`\operatorname{Tr} G` is. The symmetric part returned is computed by the same
    operations as in :func:`validated_symmetric`, so everything downstream gets the same numbers.

    Returns:
        ``(sym, finite)``; ``finite`` is None for a value traced by JAX.
    """
    sym, trace = jit_for(_symmetrised_trace, xp)(gram)
    if not is_concrete(sym):
        return sym, None
    return sym, math.isfinite(host_scalar(trace))


def _symmetrised_trace(gram: Any, *, xp: Any) -> tuple[Any, Any]:
    """((G + Gᵀ)/2 in the compute dtype, Tr G), the symmetric part as :func:`_symmetrised_stats`
    forms it."""
    g = xp.astype(gram, compute_dtype(xp), copy=False)
    return symmetrise(g, xp=xp), xp.sum(xp.linalg.diagonal(g))


def host_scalar(value: Any) -> float:
    """A concrete 0-D array as a Python float (detached from autograd graphs first)."""
    detach = getattr(value, "detach", None)
    if callable(detach):
        value = detach()
    return float(value)


def symmetrise(gram: Any, *, xp: Any) -> Any:
    """(G + Gᵀ)/2 in the compute dtype (halves first: no overflow near the dtype's max)."""
    half = xp.astype(gram, compute_dtype(xp), copy=False) / 2
    return half + xp.matrix_transpose(half)


def _symmetrised_stats(gram: Any, *, xp: Any) -> tuple[Any, Any, Any, Any]:
    """((G + Gᵀ)/2, max|G|, max|G - Gᵀ|, min diag G); max|G| is NaN/inf if G is not finite."""
    g = xp.astype(gram, compute_dtype(xp), copy=False)
    sym = symmetrise(g, xp=xp)
    scale = xp.max(xp.abs(g))
    asym = 2 * xp.max(xp.abs(g - sym))
    return sym, scale, asym, xp.min(xp.linalg.diagonal(g))


def symmetry_tolerance(dtype: Any, xp: Any) -> float:
    """Relative asymmetry accepted in a Gram: sqrt(eps) of its dtype (rounding, not intent)."""
    return math.sqrt(float(xp.finfo(dtype).eps))


def float64_available(xp: Any) -> bool:
    """Whether ``xp`` computes in float64 (JAX only with ``jax_enable_x64`` switched on)."""
    if array_api_compat.is_jax_namespace(xp):
        jax = sys.modules.get("jax")
        return bool(jax is not None and jax.config.read("jax_enable_x64"))
    return hasattr(xp, "float64")


def compute_dtype(xp: Any) -> Any:
    """The dtype eigenvalues and sums are computed in: float64, else float32.

    JAX without ``jax_enable_x64`` has no float64; there the core computes in float32 and
    emits no warning (the behaviour is documented in :func:`fimcore.spectrum`).
    """
    return xp.float64 if float64_available(xp) else xp.float32


def default_int_dtype(xp: Any, device: Any = None) -> Any:
    """The namespace's default integer dtype (int32 in JAX without x64)."""
    return xp.asarray(0, device=device).dtype


def eps_of(dtype: Any, xp: Any = None) -> float:
    """Machine epsilon of a real floating dtype of any library, without importing one.

    Raises:
        TypeError: if ``dtype`` is not a real floating-point dtype.
    """
    candidates = []
    if xp is not None:
        candidates.append(xp.finfo)
    module = sys.modules.get(type(dtype).__module__.split(".")[0])
    if module is not None and hasattr(module, "finfo"):
        candidates.append(module.finfo)
    candidates.append(np.finfo)
    for finfo in candidates:
        try:
            return float(finfo(dtype).eps)
        except (TypeError, ValueError, AttributeError):
            continue
    raise TypeError(
        "dtype must be a real floating-point dtype (e.g. float32, float64) of an array "
        f"library; received {dtype!r}. Pass the dtype of the per-sample gradients."
    )


def check_positive_int(value: Any, *, name: str) -> int:
    """Return ``value`` as int; raise unless it is an integer >= 1 (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be a positive integer; received {value!r} of type "
            f"{type(value).__name__}. Pass a Python int, e.g. {name}=128."
        )
    if value < 1:
        raise ValueError(f"{name} must be a positive integer (>= 1); received {value}.")
    return int(value)


def _as_host_number(value: Any, *, name: str) -> float | None:
    """A concrete real number as float; None for an array that cannot be inspected."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number; received the bool {value!r}.")
    if isinstance(value, numbers.Real):
        return float(value)
    if not is_concrete(value):
        return None
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) == ():
        return host_scalar(value)
    raise TypeError(
        f"{name} must be a real number (a Python float or a 0-D array); received "
        f"{type(value).__name__} with shape {shape}."
    )


def check_nonnegative_number(value: Any, *, name: str) -> None:
    """Raise unless ``value`` is a finite real >= 0 (skipped for traced values)."""
    v = _as_host_number(value, name=name)
    if v is not None and not (math.isfinite(v) and v >= 0):
        raise ValueError(
            f"{name} must be a finite number >= 0; received {v!r}. Pass the learning rate "
            "in force at this step (a negative or non-finite rate has no meaning here)."
        )


def check_positive_number(value: Any, *, name: str) -> None:
    """Raise unless ``value`` is a finite real > 0 (skipped for traced values)."""
    v = _as_host_number(value, name=name)
    if v is not None and not (math.isfinite(v) and v > 0):
        raise ValueError(
            f"{name} must be a finite number > 0; received {v!r}. For L_K it is the number "
            "of training iterations this measurement stands for (1 when measuring every step)."
        )
