"""Exact rows for a parameterised Flax module without a layer rule (``FlaxGram``'s fallback).

For one call of such a module, with θ its own parameters, ``f(θ, X)`` its batch forward and
``δ`` (leading axis B) the cotangent of the batch loss at its outputs, read off the batch
backward, sample i's contribution to the gradient is the parameter use that produced output
row i:

    row_i = (∂f(θ, X)_i / ∂θ)ᵀ δ_i,        Σ_i row_i = (∂f/∂θ)ᵀ δ = the batch gradient.

Two ways compute it exactly:

* *separable* call (row i of the batch forward depends on θ as the module run on sample i
  alone does): ``vmap`` over i of the VJP of ``f(θ, X_i)`` at ``δ_i``;
* *coupled* call (batch statistics, ``h − mean_b h``, a softmax over the batch, ...): the VJP
  of the whole batch forward at ``δ ⊙ e_i`` (the cotangent masked to sample i's slice),
  ``vmap``-ed over i: B times the module's backward.

Which case holds is decided at the call's own values, by comparing the parameter Jacobians
applied to one fixed pseudo-random tangent ``v``: separable iff
``|∂f(θ, X_i)/∂θ · v − (∂f(θ, X)/∂θ · v)_i| ≤ τ·m`` for every i and entry, with ``m`` the
largest magnitude of either side and ``τ = 1000 ε`` of the output dtype (the tolerance the
PyTorch generic path uses for its per-sample re-run). Jacobians that differ agree on a random
``v`` only on a set of measure zero, and the check sees couplings that vanish in the outputs
at this point (e.g. a coupling term whose weight is 0) but not in the gradient. Under ``jit``
the decision is a ``lax.cond``. The module is re-run from the non-parameter state it started
the call with.
"""

from __future__ import annotations

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["fallback_rows"]

#: separable-check tolerance in units of the output dtype's machine epsilon
_TOL_EPS = 1000.0


def fallback_rows(call, captured, deltas, size):
    """Rows ``{name: (B, *shape)}`` of one fallback call's own parameters, and how they were formed.

    Args:
        call: the recorded ``Call`` (module, method, path, static description of its arguments).
        captured: ``(array argument leaves, non-parameter variable collections)`` of the call.
        deltas: cotangents of the batch loss at the call's floating-point outputs.
        size: the batch size B.

    Raises:
        ValueError: an output the loss depends on has no leading batch axis of size B.
        NotImplementedError: the module draws random numbers (its forward cannot be re-run).
    """
    st = call.static
    leaves, others = captured
    params = nn.meta.unbox(st["params"])
    own = {k: params[k] for k in st["direct"]}
    plain = call.module.clone(parent=None)
    where = f"module {'/'.join(call.path) or '<root>'} ({type(call.module).__name__})"
    deltas = list(deltas)
    for d in deltas:
        if jnp.ndim(d) == 0 or jnp.shape(d)[0] != size:
            raise ValueError(
                f"{where} returned an output of shape {jnp.shape(d)} that the loss depends on, "
                f"without the batch (size {size}) on its leading axis; its per-sample "
                "contributions cannot be separated. Return batch-first outputs from it, or use "
                "value_grad_and_gram with a per-example loss."
            )
    mapped = [jnp.ndim(v) > 0 and jnp.shape(v)[0] == size for v in leaves]

    def forward(p, arrays):
        it = iter(arrays)
        full = [next(it) if a else s for a, s in zip(st["is_array"], st["static_leaves"])]
        args, kwargs = jax.tree_util.tree_unflatten(st["treedef"], full)
        try:
            out = plain.apply({"params": {**params, **p}, **others}, *args, method=call.method,
                              mutable=list(others), **kwargs)[0]
        except flax.errors.InvalidRngError as exc:
            raise NotImplementedError(
                f"{where} draws random numbers, so its forward cannot be re-run to form its "
                "per-sample rows. Move the randomness (e.g. nn.Dropout) out of this module into a "
                "parameter-free submodule or the model around it, or use value_grad_and_gram."
            ) from exc
        return [o for o, fl in zip(jax.tree_util.tree_leaves(out), st["float_out"]) if fl]

    def single(p, sample):  # the module on ONE sample: `sample` holds the mapped leaves without B
        it = iter(sample)
        arrays = [next(it)[None] if m else v for v, m in zip(leaves, mapped)]
        return [o[0] for o in forward(p, arrays)]

    samples = [v for v, m in zip(leaves, mapped) if m]
    if not deltas:  # no floating-point output: the loss cannot depend on this call
        return jax.tree_util.tree_map(lambda x: jnp.zeros((size,) + jnp.shape(x), jnp.result_type(x)), own), (
            "fallback: no floating-point output")

    def coupled():
        _, pullback = jax.vjp(lambda p: forward(p, leaves), own)

        def row(e):
            return pullback([d * e.reshape((size,) + (1,) * (d.ndim - 1)).astype(d.dtype) for d in deltas])[0]

        return jax.vmap(row)(jnp.eye(size))

    def separable():
        def row(d_i, sample):
            return jax.vjp(lambda p: single(p, sample), own)[1](d_i)[0]

        return jax.vmap(row)(deltas, samples)

    try:
        same = _same_jacobian(forward, single, own, leaves, samples)
    except (TypeError, ValueError, IndexError, flax.errors.FlaxError) as exc:  # it cannot run on one sample
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        return coupled(), f"fallback: masked batch VJP per sample (per-sample re-run failed: {reason})"
    if not isinstance(same, jax.core.Tracer):
        if bool(same):
            return separable(), "fallback: vmap per-sample VJP of the module (checked separable)"
        return coupled(), ("fallback: masked batch VJP per sample (the module couples samples; "
                           "B × its backward)")
    return lax.cond(same, separable, coupled), (
        "fallback: vmap per-sample VJP if the module is separable at this call, else masked batch "
        "VJP per sample (checked at run time)")


def _same_jacobian(forward, single, own, leaves, samples):
    """Whether ``∂f(θ, X_i)/∂θ · v`` equals row i of ``∂f(θ, X)/∂θ · v`` for every i (a bool array)."""
    keys = jax.random.split(jax.random.key(0), len(jax.tree_util.tree_leaves(own)))
    flat, tree = jax.tree_util.tree_flatten(own)
    v = jax.tree_util.tree_unflatten(
        tree, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, flat)])
    batch = jax.jvp(lambda p: forward(p, leaves), (own,), (v,))[1]
    per_sample = jax.vmap(lambda s: jax.jvp(lambda p: single(p, s), (own,), (v,))[1])(samples)
    same = jnp.asarray(True)
    for b, s in zip(batch, per_sample):
        if jnp.shape(b) != jnp.shape(s):
            return jnp.asarray(False)
        if not jnp.size(b):
            continue
        tol = _TOL_EPS * jnp.finfo(jnp.result_type(b)).eps
        scale = jnp.maximum(jnp.max(jnp.abs(b)), jnp.max(jnp.abs(s)))
        same = same & jnp.all(jnp.abs(s - b) <= tol * scale)
    return same
