"""Trace-time validation and dtype helpers shared by the generic and the Flax paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "accumulation_dtype",
    "batch_size",
    "check_finite_if_concrete",
    "check_params",
    "gradient_dtype",
]


def _path_name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def check_params(params, *, what: str = "params") -> None:
    """Raise ``TypeError`` unless every leaf of ``params`` is a floating-point array.

    Runs on shapes and dtypes only, so it works at trace time under ``jax.jit``.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError(
            f"{what} must contain at least one array leaf; received an empty pytree "
            f"({type(params).__name__}). Pass the trainable parameters."
        )
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            dtype = np.asarray(leaf).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"every leaf of {what} must be a floating-point array (per-sample gradients "
                f"are taken with respect to it); leaf {_path_name(path)} has dtype {dtype}. "
                "Cast it to a float dtype or move it out of the differentiated parameters."
            )


def check_finite_if_concrete(params, *, what: str = "params") -> None:
    """Raise ``ValueError`` for a non-finite parameter when the values are known.

    Under ``jax.jit`` the values are abstract and this check is skipped (a non-finite
    parameter then shows up as non-finite entries of the Gram, which
    ``fimcore.MeasureTracker`` rejects by default). Outside ``jit`` it costs one
    device-to-host transfer of a boolean per leaf.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if isinstance(leaf, jax.core.Tracer):
            continue
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(
                f"every entry of {what} must be finite; leaf {_path_name(path)} contains "
                "NaN or Inf. Check the parameter initialisation or the previous update."
            )


def batch_size(batch, *, what: str = "batch") -> int:
    """Common leading size of the array leaves of ``batch``, checked at trace time."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError(
            f"{what} must contain at least one array with a leading batch axis; "
            "received no array leaves. Pass the inputs (and targets) of the batch."
        )
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"every leaf of {what} needs a leading batch axis; leaf {_path_name(path)} "
                "is a scalar. Give it shape (B, ...) or close over it in the loss function."
            )
        sizes[_path_name(path)] = shape[0]
    distinct = sorted(set(sizes.values()))
    if len(distinct) != 1:
        raise ValueError(
            f"all leaves of {what} must have the same leading (batch) size; received sizes "
            f"{sizes}. Slice the leaves to one batch size or close over per-batch constants."
        )
    size = distinct[0]
    if size < 1:
        raise ValueError(
            f"the batch must hold at least one sample; received leading size {size}."
        )
    return int(size)


def gradient_dtype(params):
    """dtype of the per-sample gradients of ``params`` (their common result type).

    Pass it as ``grad_dtype`` to ``fimcore.MeasureTracker.update`` so the default
    ``rtol = B·eps(grad_dtype)`` matches the precision the Gram was built from.

    Example:
        >>> import jax.numpy as jnp
        >>> from fimcore_adapters.jax import gradient_dtype
        >>> gradient_dtype({"w": jnp.ones(3, jnp.float32)})
        dtype('float32')
    """
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.dtype(jnp.result_type(*leaves))


def accumulation_dtype(dtype, params):
    """The dtype the Gram is accumulated in.

    ``dtype=None`` means float64 when ``jax_enable_x64`` is on, else the gradient dtype
    (float32 for a float32 model: JAX cannot hold float64 arrays without x64). An
    explicit float64 request with x64 off is an error rather than a silent float32.
    """
    x64 = bool(jax.config.jax_enable_x64)
    if dtype is None:
        return jnp.dtype(jnp.float64) if x64 else jnp.promote_types(gradient_dtype(params), jnp.float32)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"dtype must be a floating-point dtype for the Gram; received {dtype}. "
            "Use jnp.float32 or jnp.float64 (or None for the default)."
        )
    if dtype.itemsize == 8 and not x64:
        raise ValueError(
            "a float64 Gram needs jax_enable_x64; received dtype=float64 with x64 off. "
            "Call jax.config.update('jax_enable_x64', True) at start-up or pass dtype=None."
        )
    return dtype
