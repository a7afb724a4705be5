r"""``diagonal_fisher`` for ``flax.linen`` models: Î1, Î2, exact, empirical, with V1/V2 and bounds.

Same formulas and semantics as the PyTorch adapter (see :mod:`fimcore.diagonal`):

* :math:`u = \partial h/\partial\theta_i` per input from ``vmap(jacrev(·))`` of one sample's
  ``model.apply``, chunk by chunk (C×P per input, never N×P at once);
* :math:`w = \partial^2 h/\partial\theta_i^2` (``"i2"`` only): for each ``nn.Dense`` / ``nn.Conv``
  call an ``nn.intercept_methods`` interceptor adds a zero perturbation δ to its output; the Hessian
  :math:`H_c = \partial^2 h_c/\partial\delta^2` (``jacfwd(jacrev(·))``) is contracted with the layer's
  own Jacobian, :math:`w_c(\theta_i) = \delta z_i^\top H_c\,\delta z_i`; for a Dense layer on one
  feature vector per sample that is :math:`(H_c)_{jj} a_k^2` for the kernel entry (k, j) and
  :math:`(H_c)_{jj}` for the bias. This is exact because those layers are linear in their
  parameters and called once; any parameter-free computation after them is differentiated
  exactly. Other modules owning parameters, a parametrised module called other than once, or one
  called through another method are refused with their path and type.

Parameter names are the paths of ``variables["params"]`` joined with ``/`` (``"Dense_0/kernel"``);
:meth:`~fimcore.diagonal.DiagonalFisher.groups` groups them by layer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from fimcore.diagonal import (
    DiagonalFisher,
    check_options,
    check_outputs,
    chunk_size_for,
    estimate,
    given_labels,
    label_residuals,
)

from .._errors import unsupported_layer

__all__ = ["diagonal_fisher"]

_FIX = ("The exact Î2/V2 route covers nn.Dense / nn.Conv layers with parameter-free computation "
        "between them; use estimator='i1' or 'exact', which need first derivatives only")


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(tree) -> dict:
    return {_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


class _Layers:
    """Interceptor: finds the Dense/Conv calls, refuses other parametrised modules;
    with ``target`` set, perturbs that layer's output by ``delta`` and records its input."""

    def __init__(self, target=None, delta=None):
        self.target, self.delta = target, delta
        self.calls: dict[tuple, int] = {}
        self.modules: dict[tuple, nn.Module] = {}
        self.captured = None

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if method == "setup" or module.scope is None:
            return next_fun(*args, **kwargs)
        path = tuple(module.scope.path)
        params = module.variables.get("params", {})
        direct = sorted(k for k, v in params.items() if not isinstance(v, Mapping))
        if not direct:
            return next_fun(*args, **kwargs)
        if type(module) not in (nn.Dense, nn.Conv) or method != "__call__":
            raise unsupported_layer("/".join(path), type(module).__name__,
                                    f"Î2 and V2 need ∂²h/∂θ² of its parameters {direct} (called "
                                    f"through {method!r}), which this route computes only for "
                                    "nn.Dense and nn.Conv called through __call__", _FIX)
        self.calls[path] = self.calls.get(path, 0) + 1
        self.modules[path] = module
        out = next_fun(*args, **kwargs)
        if path == self.target:
            self.captured = args[0]
            if self.delta is not None:
                out = out + self.delta[None]
        return out


def _apply_one(model, variables):
    def one(params, x):
        return model.apply({**variables, "params": params}, x[None])[0]
    return one


def _layer_plan(model, variables, probe):
    layers = _Layers()
    with nn.intercept_methods(layers):
        model.apply(variables, probe[:1])
    for path, count in layers.calls.items():
        if count != 1:
            raise unsupported_layer("/".join(path), type(layers.modules[path]).__name__,
                                    f"it runs {count} times in one forward (its input would "
                                    "depend on its own parameters)", _FIX)
    return layers.modules


def _layer_second_derivatives(model, variables, path, module, x):
    """{parameter name: (n, C, *shape)} for the parameters of the layer at ``path``."""
    params = variables["params"]

    def capture(xb):
        layers = _Layers(target=path)
        with nn.intercept_methods(layers):
            z = model.apply(variables, xb)
        del z
        return layers.captured

    def h_of_delta(delta, xi):
        layers = _Layers(target=path, delta=delta)
        with nn.intercept_methods(layers):
            return model.apply(variables, xi[None])[0]

    a = capture(x)
    local = params
    for key in path:
        local = local[key]
    standalone = module.clone(parent=None)

    def layer(p, ai):
        return standalone.apply({"params": p}, ai[None])[0]

    z_shape = jax.eval_shape(layer, local, a[0]).shape
    zero = jnp.zeros(z_shape, dtype=a.dtype)
    hess = jax.vmap(jax.jacfwd(jax.jacrev(h_of_delta)), in_axes=(None, 0))(zero, x)
    n, c = hess.shape[:2]
    prefix = "/".join(path) + "/"
    if isinstance(module, nn.Dense) and a.ndim == 2:
        o = z_shape[0]
        diag = jnp.diagonal(hess.reshape(n, c, o, o), axis1=2, axis2=3)          # (n, C, O)
        out = {prefix + "kernel": (a * a)[:, None, :, None] * diag[:, :, None, :]}
        if "bias" in local:
            out[prefix + "bias"] = diag
        return out
    t = math.prod(z_shape)
    h = hess.reshape(n, c, t, t)
    jac = jax.vmap(jax.jacrev(layer), in_axes=(None, 0))(local, a)
    out = {}
    for key, j in jac.items():
        jf = j.reshape(n, t, -1)
        w = jnp.einsum("ntk,nctu,nuk->nck", jf, h, jf)
        out[prefix + key] = w.reshape(n, c, *local[key].shape)
    return out


def _residuals(outputs, labels, targets, *, likelihood, estimator, mc_samples, generator):
    """(N, M, C) residuals s = t(y) − η, or None for ``"exact"``."""
    given = given_labels(estimator, labels, targets)
    if estimator == "exact":
        return None
    if given is None:
        if generator is None:
            raise ValueError("drawing labels from the model needs generator= (a jax.random "
                             "key, e.g. jax.random.key(0)); or pass labels=.")
        n, c = outputs.shape
        if likelihood == "categorical":
            given = jax.random.categorical(generator, outputs, shape=(mc_samples, n)).T
        else:
            noise = jax.random.normal(generator, (n, mc_samples, c), dtype=outputs.dtype)
            given = outputs[:, None, :] + noise
    return label_residuals(outputs, jnp.asarray(given), likelihood)


def diagonal_fisher(model: nn.Module, variables: Mapping, inputs, *,
                    likelihood: str = "categorical", estimator: str = "i1", labels=None,
                    targets=None, mc_samples: int = 1, generator=None, variance: bool = False,
                    chunk_size: int | None = None) -> DiagonalFisher:
    r"""Diagonal Fisher estimate of a Flax model on ``inputs``, averaged over the inputs.

    Same estimators and formulas as ``fimcore_adapters.torch.diagonal_fisher``:
    ``"i1"`` :math:`\frac1{NM}\sum(s^\top u)^2`, ``"i2"``
    :math:`\frac1{NM}\sum(u^\top\mathcal I u - s^\top w)`, ``"exact"``
    :math:`\frac1N\sum u^\top\mathcal I u`, ``"empirical"`` :math:`\frac1N\sum(s^\top u)^2` at the
    data labels ``targets``.

    Args:
        model: a ``flax.linen`` module mapping (N, ...) to (N, C) outputs (logits, or a
            unit-variance Gaussian mean), treating samples independently.
        variables: its variables; derivatives are taken in ``variables["params"]``, other
            collections are held fixed (not mutated).
        inputs: (N, ...) array.
        likelihood, estimator, labels, targets, mc_samples, variance, chunk_size: as in the
            PyTorch adapter.
        generator: a ``jax.random`` key for the label draws (needed when ``labels`` is None for
            ``"i1"``/``"i2"``).

    Returns:
        :class:`fimcore.diagonal.DiagonalFisher` keyed by ``/``-joined parameter paths.

    Raises:
        ValueError, TypeError, NotImplementedError, FloatingPointError: as the PyTorch adapter.

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> model = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(2)])
        >>> x = jax.random.normal(jax.random.key(0), (5, 3))
        >>> variables = model.init(jax.random.key(1), x)
        >>> r = diagonal_fisher(model, variables, x, estimator="i2", variance=True,
        ...                     generator=jax.random.key(2))
        >>> float(jnp.abs(r.variance["layers_2/kernel"]).max())      # last layer: V2 = 0
        0.0
    """
    mc_samples = check_options(likelihood, estimator, mc_samples)
    inputs = jnp.asarray(inputs)
    if "params" not in variables or not jax.tree_util.tree_leaves(variables["params"]):
        raise ValueError("variables must hold a non-empty 'params' collection; received "
                         f"collections {sorted(variables)}.")
    outputs = jax.jit(model.apply)(variables, inputs)
    check_outputs(outputs, likelihood)
    s = _residuals(outputs, labels, targets, likelihood=likelihood, estimator=estimator,
                   mc_samples=mc_samples, generator=generator)
    layers = _layer_plan(model, variables, inputs) if estimator == "i2" else {}
    second = {path: jax.jit(functools.partial(_layer_second_derivatives, model, variables, path,
                                              module)) for path, module in layers.items()}
    params = variables["params"]
    shapes = {k: tuple(v.shape) for k, v in _flat(params).items()}
    jac = jax.jit(jax.vmap(jax.jacrev(_apply_one(model, variables)), in_axes=(None, 0)))
    n, c = outputs.shape
    step = chunk_size_for(n, c, sum(math.prod(v) for v in shapes.values()), chunk_size)

    def chunks():
        for start in range(0, n, step):
            x = inputs[start:start + step]
            w = {}
            for path, fn in second.items():
                w.update(fn(x))
            yield slice(start, start + x.shape[0]), _flat(jac(params, x)), w, {}

    return estimate(chunks(), outputs, s, shapes, likelihood=likelihood, estimator=estimator,
                    variance=variance)
