r"""Sampled-label ("true") Fisher Gram and output-Jacobian Gram for JAX.

A per-example loss written as ``ℓ(predict(params, x), y)`` with a likelihood fimcore knows is an
:class:`OutputLoss` (:func:`output_loss`). It is an ordinary per-example loss for
:func:`value_grad_and_gram`, and it lets ``fisher="sampled"`` draw labels from the model:

* ``"cross_entropy"``: logits h with the class axis **last** (shape (C,) or (…, C) per example,
  the optax convention), integer labels of shape h.shape[:-1]; ℓ = mean over positions of
  −log softmax(h)_y; ŷ ~ Categorical(softmax(h)), Λ = diag(p) − ppᵀ (divided by the number of
  positions).
* ``"mse"``: ℓ = (1/D)‖h − y‖² over the D elements of h; read as a Gaussian N(h, (D/2)·I),
  ŷ = h + sqrt(D/2)·ε, Λ = (2/D)·I.

Formulas and the choice of the mean of K Grams: :mod:`fimcore_adapters._fisher`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from .._fisher import WEIGHTINGS, check_likelihood

__all__ = ["OutputLoss", "output_loss", "sample_labels", "output_jacobian_gram"]


class OutputLoss(NamedTuple):
    """A per-example loss ``ℓ(predict(params, x), y)`` with a known likelihood.

    Attributes:
        predict: ``predict(params, x) -> h`` for ONE example (logits or the regression mean).
        likelihood: ``"cross_entropy"`` or ``"mse"``.
    """

    predict: Callable
    likelihood: str

    def __call__(self, params, x, y):
        return _loss(self.likelihood, self.predict(params, x), y)


def output_loss(predict: Callable, likelihood: str) -> OutputLoss:
    """Build the per-example loss ``ℓ(predict(params, x), y)`` for ``likelihood``.

    Raises:
        ValueError: a likelihood other than ``"cross_entropy"`` / ``"mse"`` (named, with the fix).

    Example:
        >>> import jax.numpy as jnp
        >>> loss = output_loss(lambda w, x: x @ w, "mse")
        >>> float(loss(jnp.ones((2, 1)), jnp.array([1.0, 2.0]), jnp.array([1.0])))
        4.0
    """
    if not callable(predict):
        raise TypeError(f"predict must be callable predict(params, x); received {type(predict).__name__}")
    return OutputLoss(predict, check_likelihood(likelihood))


def _loss(likelihood, h, y):
    if likelihood == "cross_entropy":
        logp = jax.nn.log_softmax(h, axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(y)[..., None].astype(jnp.int32), axis=-1)
        return -jnp.mean(picked)
    return jnp.mean((h - y) ** 2)


def _draw(likelihood, h, key, K):
    """(labels (K, …), cotangents ∂ℓ/∂h (K, *h.shape)) for one example."""
    if likelihood == "cross_entropy":
        p = jax.nn.softmax(h, axis=-1)
        labels = jax.random.categorical(key, h, axis=-1, shape=(K,) + h.shape[:-1])
        positions = math.prod(h.shape[:-1])
        cot = (p[None] - jax.nn.one_hot(labels, h.shape[-1], dtype=h.dtype)) / positions
        return labels, cot
    D = math.prod(h.shape)
    eps = jax.random.normal(key, (K,) + h.shape, dtype=h.dtype)
    labels = h[None] + math.sqrt(D / 2.0) * eps
    return labels, (2.0 / D) * (h[None] - labels)


def _keys(key, B):
    return jax.random.split(key, B)


def sample_labels(loss: OutputLoss, params, x, key, mc_samples: int = 1):
    """The labels ``fisher="sampled"`` draws for batch ``x`` with ``key``: shape (K, B, …).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> loss = output_loss(lambda w, x: x @ w, "cross_entropy")
        >>> sample_labels(loss, jnp.zeros((2, 3)), jnp.ones((4, 2)), jax.random.key(0), 5).shape
        (5, 4)
    """
    def one(xi, k):
        return _draw(loss.likelihood, loss.predict(params, xi), k, mc_samples)[0]

    labels = jax.vmap(one)(x, _keys(key, jax.tree_util.tree_leaves(x)[0].shape[0]))
    return jnp.moveaxis(labels, 0, 1)


def sampled_grads(loss: OutputLoss, params, x, y, key, K):
    """Per example: data loss, data gradient, and the K sampled-label gradients (one forward)."""
    h, pullback = jax.vjp(lambda p: loss.predict(p, x), params)
    value, dh = jax.value_and_grad(lambda hh: _loss(loss.likelihood, hh, y))(h)
    (grad,) = pullback(dh)
    _, cots = _draw(loss.likelihood, jax.lax.stop_gradient(h), key, K)
    (sampled,) = jax.vmap(pullback)(cots)
    return value, grad, sampled


def output_jacobian_gram(predict: Callable, params, x, *, weighted_by: str | None = None,
                         max_outputs: int = 100, dtype=None):
    r"""The (B·C, B·C) output-Jacobian Gram Θ = 𝒥𝒥ᵀ of ``predict`` (one example → C outputs),
    or Λ^{1/2} Θ Λ^{1/2} (see :mod:`fimcore_adapters._torch.ntk` for the conventions).

    Rows of 𝒥 are ``jax.jacrev`` per example (vmapped), accumulated leaf by leaf; B·C × P_l per
    leaf is alive at once. Row i·C + c is output c (flattened) of example i.

    Args:
        predict: ``predict(params, x_i) -> h_i`` for ONE example.
        params: parameter pytree.
        x: batch (leading axis B).
        weighted_by: None, ``"softmax"`` (Λ_i = diag(p_i) − p_i p_iᵀ, class axis last) or
            ``"mse"`` (Λ = (2/C)·I).
        max_outputs: refuse more than this many outputs per example.
        dtype: Gram dtype; default the rows' dtype.

    Raises:
        ValueError: bad ``weighted_by``; C > ``max_outputs``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[1.0, 0.0], [1.0, 1.0]])
        >>> output_jacobian_gram(lambda w, xi: xi @ w, jnp.zeros((2, 1)), x).tolist()
        [[1.0, 1.0], [1.0, 2.0]]
    """
    if weighted_by not in WEIGHTINGS:
        raise ValueError(f"weighted_by must be one of {WEIGHTINGS}; received {weighted_by!r}. Use None "
                         "for the NTK Gram, 'softmax' for softmax cross-entropy, 'mse' for squared error")
    B = jax.tree_util.tree_leaves(x)[0].shape[0]
    h = jax.vmap(lambda xi: predict(params, xi))(x)
    C = math.prod(h.shape[1:])
    if C > max_outputs:
        raise ValueError(f"output_jacobian_gram forms a (B·C)² Gram and B·C Jacobian rows; C must be "
                         f"at most {max_outputs} outputs per example; received C = {C}. Pass "
                         "max_outputs=C if the memory allows")
    jac = jax.vmap(lambda xi: jax.jacrev(lambda p: jnp.reshape(predict(p, xi), (-1,)))(params))(x)
    gram = None
    for leaf in jax.tree_util.tree_leaves(jac):
        rows = jnp.reshape(leaf, (B * C, -1))
        if dtype is not None:
            rows = rows.astype(dtype)
        block = rows @ rows.T
        gram = block if gram is None else gram + block
    if weighted_by is None:
        return gram
    if weighted_by == "mse":
        return gram * (2.0 / C)
    if h.ndim != 2:
        raise ValueError("weighted_by='softmax' needs one categorical per example, logits of shape "
                         f"(C,); received per-example outputs of shape {tuple(h.shape[1:])}")
    p = jax.nn.softmax(h, axis=-1)
    lam = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
    w, V = jnp.linalg.eigh(lam)
    # Λ is singular (Λ1 = 0): eigenvalues at rounding level are zeros, not sqrt(eps)-sized roots
    w = jnp.where(w > C * jnp.finfo(w.dtype).eps * w.max(axis=-1, keepdims=True), w, 0.0)
    root = (V * jnp.sqrt(w)[:, None, :]) @ jnp.swapaxes(V, 1, 2)
    root = root.astype(gram.dtype)
    g4 = jnp.reshape(gram, (B, C, B, C))
    g4 = jnp.einsum("iab,ibjc,jcd->iajd", root, g4, root)
    return jnp.reshape(g4, (B * C, B * C))
