r"""A guard against a silent wrong answer of XLA's SPMD partitioner under a data-parallel mesh.

With the batch sharded over a mesh, ``jit(vmap(grad(loss)))`` of a loss containing a convolution
returns wrong per-sample kernel gradients (JAX 0.10.2, CPU): ``vmap`` turns the per-sample weight
gradient into a grouped convolution (``feature_group_count = B``), which the partitioner splits
wrongly — relative error 0.87 on the Gram of a 3×3 convolution of 8 samples over 4 host devices,
against 3e-16 with the batch replicated (``tests/adapters/test_jax_mesh.py`` reproduces the fault
without fimcore and checks the guarded results against a float64 per-sample loop).

Where the batch lies on a multi-device mesh and the computation would contain such a convolution,
the adapters constrain the batch to be replicated before it: exact, but every device then
computes all B per-sample gradients of that step (no data-parallel speed-up), and a
``RuntimeWarning`` names the routes that keep the work split — ``FlaxGram`` (its Conv path is
patches and matrix products) and ``jax.shard_map`` with ``axis_name=``.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["grouped_conv_in", "mesh_of", "replicate", "replicate_before_vmapped_conv",
           "warn_replicated"]

_warned: set = set()


def mesh_of(tree):
    """The largest multi-device mesh the leaves of ``tree`` are placed on, or None.

    ``jax.typeof(x).sharding.mesh`` names the mesh of a jitted argument too, even where its
    partition spec is left to the partitioner; an unsharded array has the empty mesh."""
    best = None
    for leaf in jax.tree_util.tree_leaves(tree):
        try:
            mesh = jax.typeof(leaf).sharding.mesh
        except (AttributeError, TypeError):
            continue
        if getattr(mesh, "size", 1) > 1 and (best is None or mesh.size > best.size):
            best = mesh
    return best


def replicate(tree, mesh):
    """``tree`` with every leaf constrained to be replicated over ``mesh``."""
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(lambda x: lax.with_sharding_constraint(x, rep), tree)


def warn_replicated(what: str, mesh, cause: str) -> None:
    """One ``RuntimeWarning`` per entry point that the batch is replicated for this step."""
    if what in _warned:
        return
    _warned.add(what)
    warnings.warn(
        f"{what}: the batch is sharded over a {mesh.size}-device mesh and the step contains "
        f"{cause}; XLA's partitioner gives wrong per-sample gradients for it with a sharded "
        "batch, so the batch is replicated for this step (exact, but every device computes all B "
        "per-sample gradients). For a split step use FlaxGram or jax.shard_map with axis_name=.",
        RuntimeWarning, stacklevel=4)


def grouped_conv_in(text: str) -> bool:
    """Whether a printed jaxpr holds a convolution with a group count above 1."""
    return any(int(n) > 1 for m in re.finditer(r"conv_general_dilated\[(.*?)\]", text, re.S)
               for n in re.findall(r"(?:batch|feature)_group_count=(\d+)", m.group(1)))


def replicate_before_vmapped_conv(fn, params, batch, what: str):
    """``batch`` replicated when it lies on a multi-device mesh and the per-example function
    ``fn(params, *example)`` contains a convolution (its ``vmap``-ed gradient is a grouped one);
    otherwise ``batch`` as given."""
    mesh = mesh_of(batch)
    if mesh is None:
        return batch
    one = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)),
                                    params)
    text = str(jax.make_jaxpr(lambda p, b: fn(p, *b))(shapes, one))
    if "conv_general_dilated" not in text:
        return batch
    warn_replicated(what, mesh, "a convolution in the per-example loss (vmap makes its "
                                "per-sample gradient a grouped convolution)")
    return replicate(batch, mesh)
