"""Capture layer inputs and output cotangents of a ``flax.linen`` model in one forward/backward.

An ``nn.intercept_methods`` interceptor sees every module call. For a recognised layer it
records what the Gram needs (the layer input, or the normalised input x̂ of a norm layer) and
adds a zero *perturbation* to the layer output; the gradient of the batch loss with respect to
that perturbation is the output cotangent δ of the layer. Parameters are not differentiated at
all, so the backward pass computes no weight gradient: the batch weight gradients are formed
from the same (input, δ) pairs that build the Gram.

Modules that own parameters but are not recognised are recorded as *fallback* calls (their
array arguments and non-parameter collections are kept): their rows are formed afterwards by
re-running that module alone (:mod:`.fallback`), per sample or, when it couples samples,
as the batch VJP masked to each sample.

A module whose type has a user rule (``register_layer_rule``, :mod:`.registry`) runs through
that rule's ``forward``, which returns the arrays to keep; its rows come from the rule's
``per_sample``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from .registry import rule_for

__all__ = ["Call", "Recorder", "layer_kind"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm, nn.RMSNorm, nn.InstanceNorm)


def layer_kind(module, method_name):
    """The recognised layer kind of ``module`` (a registered user rule, else an exact type match
    with the default contraction), else None."""
    if rule_for(module) is not None:
        return "user"
    kind_type = type(module)
    if kind_type in (nn.Dense, nn.DenseGeneral):
        if module.dot_general is not None or module.dot_general_cls is not None:
            return None
        if kind_type is nn.DenseGeneral and tuple(jnp.atleast_1d(jnp.asarray(module.batch_dims))) != ():
            return None
        return "dense" if kind_type is nn.Dense else "dense_general"
    if kind_type is nn.Conv:
        return "conv"
    if kind_type is nn.Embed:
        return "embed"
    if kind_type in _NORMS:
        return "norm"
    return None


def _feature_axes(module, ndim):
    if isinstance(module, nn.BatchNorm):
        axes = module.axis
    elif isinstance(module, nn.GroupNorm):
        axes = -1
    else:
        axes = module.feature_axes
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(sorted(ax % ndim for ax in axes))


@dataclasses.dataclass
class Call:
    """Static description of one intercepted call (arrays live in ``Recorder.arrays``)."""

    path: tuple
    kind: str
    module: object
    method: str
    index: int  # position of this call's captured arrays in Recorder.arrays
    n_out: int  # number of perturbed output leaves
    static: dict = dataclasses.field(default_factory=dict)


class Recorder:
    """The interceptor. ``perturbations=None`` is the discovery pass (records output shapes)."""

    def __init__(self, batch, perturbations=None, fallback="vmap", generic=None):
        self.batch = batch
        self.perturbations = perturbations
        self.fallback = fallback
        self.generic = generic or (lambda name: False)  # layers sent to the exact re-run path
        self.calls: list[Call] = []
        self.arrays: list = []
        self.out_shapes: list = []
        self._next = 0
        self._active: list = []
        self._passthrough = False

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if self._passthrough or method == "setup" or module.scope is None:
            return next_fun(*args, **kwargs)
        path = tuple(module.scope.path)
        if path in self._active:  # a method called from inside a recorded call of the same module
            return next_fun(*args, **kwargs)
        kind = layer_kind(module, method)
        params = module.variables.get("params", {})
        direct = {k: v for k, v in params.items() if not isinstance(v, Mapping)}
        if kind == "user" and not direct:  # a rule for a module owning no parameters of its own
            kind = None
        forced = kind is not None and self.generic("/".join(path) or "<root>")
        if kind is not None and method != "__call__":
            if not direct:
                return next_fun(*args, **kwargs)
            if self.fallback == "error":
                raise NotImplementedError(
                    f"the Flax Gram path handles {type(module).__name__} only through __call__; "
                    f"module {'/'.join(path)} was called through {method!r}, which uses its "
                    "parameters elsewhere (e.g. a tied embedding), and fallback='error' refuses "
                    "the exact re-run of that call. Pass fallback='vmap', or use "
                    "value_grad_and_gram (generic path) for this model."
                )
            forced = True  # the call through another method is re-run exactly (tied weights)
        if forced:
            kind = None
        if kind is None:
            if not direct:
                return next_fun(*args, **kwargs)
            if self.fallback == "error" and not forced:
                raise NotImplementedError(
                    f"module {'/'.join(path) or '<root>'} ({type(module).__name__}) owns parameters "
                    f"{sorted(direct)} but is not a recognised Flax layer; with fallback='error' "
                    "it cannot be handled. Pass fallback='vmap' for an exact computation from a "
                    "re-run of the module alone (per sample, or masked batch VJPs when it couples samples)."
                )
            kind = "fallback"
        x = args[0] if args else next(iter(kwargs.values()))
        if kind != "fallback" and (getattr(x, "ndim", 0) < 1 or x.shape[0] != self.batch):
            raise ValueError(
                f"layer {'/'.join(path)} ({type(module).__name__}) must receive the batch on its "
                f"leading axis (size {self.batch}); its input has shape {getattr(x, 'shape', None)}. "
                "Keep the batch axis first inside the model, or use value_grad_and_gram."
            )
        if kind == "fallback":  # the state the call starts from (it may update it), for the re-run
            before = {c: jax.tree_util.tree_map(lambda v: v, dict(v)) for c, v in module.variables.items()
                      if c != "params"}
        self._active.append(path)
        static, captured = {}, None
        try:
            if kind == "user":
                rule = static["rule"] = rule_for(module)
                out, captured = rule.forward(module, next_fun, args, kwargs)
            else:
                out = next_fun(*args, **kwargs)
        finally:
            self._active.pop()
        if kind == "user":
            pass  # the rule's forward returned its own capture
        elif kind in ("dense", "dense_general", "conv", "embed"):
            captured = x
        elif kind == "norm":
            captured = self._normalised(module, args, kwargs)
            static["feature_axes"] = _feature_axes(module, x.ndim)
        else:  # fallback
            leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
            is_array = [isinstance(v, (jax.Array, jnp.ndarray)) for v in leaves]
            static.update(
                treedef=treedef,
                is_array=is_array,
                static_leaves=[None if a else v for v, a in zip(leaves, is_array)],
                params=params,
                direct=sorted(direct),
            )
            captured = ([v for v, a in zip(leaves, is_array) if a], before)
        out_leaves, out_def = jax.tree_util.tree_flatten(out)
        float_out = [jnp.issubdtype(jnp.result_type(o), jnp.inexact) for o in out_leaves]
        if kind != "fallback" and (len(out_leaves) != 1 or out_leaves[0].shape[0] != self.batch):
            raise ValueError(
                f"layer {'/'.join(path)} must return one array with the batch on its leading "
                f"axis (size {self.batch}); received {jax.tree_util.tree_map(jnp.shape, out)}."
            )
        static["float_out"] = float_out
        self.calls.append(Call(path, kind, module, method, len(self.arrays), sum(float_out), static))
        self.arrays.append(captured)
        new_leaves = []
        for leaf, is_float in zip(out_leaves, float_out):
            if is_float:
                if self.perturbations is None:
                    self.out_shapes.append(jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf)))
                else:
                    leaf = leaf + self.perturbations[self._next]
                    self._next += 1
            new_leaves.append(leaf)
        return jax.tree_util.tree_unflatten(out_def, new_leaves)

    def _normalised(self, module, args, kwargs):
        """x̂ of a norm layer: the same module without scale and bias, applied to the same input."""
        plain = module.clone(parent=None, use_scale=False, **({} if isinstance(module, nn.RMSNorm) else {"use_bias": False}))
        variables = {c: v for c, v in module.variables.items() if c != "params"}
        self._passthrough = True
        try:
            xhat, _ = plain.apply(variables, *args, mutable=list(variables), **kwargs)
        finally:
            self._passthrough = False
        return xhat
