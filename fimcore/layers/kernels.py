r"""Array-API reference kernels of per-layer Gram contributions.

Plain, readable implementations in any array-API namespace (NumPy, PyTorch, JAX, ...). The JAX
adapter uses them directly; the PyTorch and TensorFlow rules, which use their framework's fused
kernels, are tested against them. Shapes follow the ``[B, T, d]`` convention of
:mod:`fimcore.layers.tokens`: ``a`` (B, T, d_a) layer inputs at T positions, ``g`` (B, T, d_g)
gradients of the batch loss at the layer's outputs.
"""

from __future__ import annotations

from typing import Any

from .._namespace import resolve_namespace

__all__ = ["embedding_gram", "factored_gram", "norm_affine_rows", "per_sample_weight_grads",
           "rows_gram"]


def factored_gram(a: Any, g: Any, /, *, bias: bool, xp: Any = None) -> Any:
    r"""Gram of a weight used at T positions, without per-sample gradients.

    .. math:: G_{ij} = \sum_{t,s}(a_{it}\cdot a_{js} + \beta)(g_{it}\cdot g_{js}),\quad
              \beta = 1 \text{ with a bias, else } 0;

    for T = 1, :math:`(AA^\top + \beta)\odot(G_oG_o^\top)`.

    Args:
        a: (B, T, d_a) inputs.
        g: (B, T, d_g) output gradients.
        bias: whether the layer has a bias (its per-sample gradient is :math:`\sum_t g_{it}`).

    Example:
        >>> import numpy as np
        >>> a, g = np.ones((2, 1, 3)), np.array([[[1.0]], [[2.0]]])
        >>> factored_gram(a, g, bias=True)
        array([[ 4.,  8.],
               [ 8., 16.]])
    """
    xp = resolve_namespace(a, g, xp=xp)
    batch, t = a.shape[0], a.shape[1]
    a2 = xp.reshape(a, (batch * t, a.shape[2]))
    g2 = xp.reshape(g, (batch * t, g.shape[2]))
    aa = xp.matmul(a2, xp.matrix_transpose(a2))
    if bias:
        aa = aa + 1
    prod = aa * xp.matmul(g2, xp.matrix_transpose(g2))       # (B·T, B·T)
    return xp.sum(xp.reshape(prod, (batch, t, batch, t)), axis=(1, 3))


def per_sample_weight_grads(a: Any, g: Any, /, *, xp: Any = None) -> Any:
    r"""Per-sample weight gradients :math:`J_i = \sum_t g_{it} a_{it}^\top`, shape (B, d_g, d_a).

    Example:
        >>> import numpy as np
        >>> per_sample_weight_grads(np.ones((1, 2, 3)), np.ones((1, 2, 1))).tolist()
        [[[2.0, 2.0, 2.0]]]
    """
    xp = resolve_namespace(a, g, xp=xp)
    return xp.matmul(xp.matrix_transpose(g), a)


def rows_gram(*blocks: Any, xp: Any = None) -> Any:
    r""":math:`\sum_k J_k J_k^\top` of per-sample blocks (B, ...), each flattened to (B, P_k).

    Example:
        >>> import numpy as np
        >>> rows_gram(np.array([[1.0, 2.0], [0.0, 1.0]]), np.ones((2, 1, 1)))
        array([[6., 3.],
               [3., 2.]])
    """
    xp = resolve_namespace(*blocks, xp=xp)
    total = None
    for block in blocks:
        rows = xp.reshape(block, (block.shape[0], -1))
        part = xp.matmul(rows, xp.matrix_transpose(rows))
        total = part if total is None else total + part
    return total


def embedding_gram(ids: Any, g: Any, /, *, xp: Any = None) -> Any:
    r"""Gram of an embedding table looked up at T positions per sample.

    Row :math:`t` of sample i adds :math:`g_{it}` to table row ``ids[i, t]``, so

    .. math:: G_{ij} = \sum_{t,s} [\mathrm{id}_{it} = \mathrm{id}_{js}]\,(g_{it}\cdot g_{js}).

    Args:
        ids: (B, T) integer indices.
        g: (B, T, d) gradients at the looked-up rows.

    Example:
        >>> import numpy as np
        >>> embedding_gram(np.array([[0], [0]]), np.array([[[1.0]], [[3.0]]]))
        array([[1., 3.],
               [3., 9.]])
    """
    xp = resolve_namespace(g, xp=xp)
    batch, t = ids.shape[0], ids.shape[1]
    flat = xp.reshape(ids, (batch * t,))
    same = xp.astype(flat[:, None] == flat[None, :], g.dtype)
    g2 = xp.reshape(g, (batch * t, g.shape[2]))
    prod = same * xp.matmul(g2, xp.matrix_transpose(g2))
    return xp.sum(xp.reshape(prod, (batch, t, batch, t)), axis=(1, 3))


def norm_affine_rows(xhat: Any, delta: Any, /, *, reduce_axes: tuple[int, ...],
                     xp: Any = None) -> tuple[Any, Any]:
    r"""Per-sample affine gradients of a normalisation layer: :math:`(\sum_t \hat x\delta, \sum_t \delta)`.

    Args:
        xhat: the normalised input (batch statistics in train mode), batch first.
        delta: the gradient of the batch loss at the layer's output, same shape.
        reduce_axes: the non-batch axes that are not the affine parameters' axes.

    Returns:
        ``(scale rows, shift rows)``, each (B, *parameter shape).

    Example:
        >>> import numpy as np
        >>> s, b = norm_affine_rows(np.ones((2, 3, 4)), np.ones((2, 3, 4)), reduce_axes=(1,))
        >>> s.shape, float(b[0, 0])
        ((2, 4), 3.0)
    """
    xp = resolve_namespace(xhat, delta, xp=xp)
    return xp.sum(xhat * delta, axis=reduce_axes), xp.sum(delta, axis=reduce_axes)
