r"""The ``[B, T, d]`` weight-sharing convention.

A weight that one sample uses at several positions (tokens of a sequence, pixels of a 1×1
convolution, any leading dimensions of a dense layer's input) contributes, per sample, the
sum over positions: :math:`J_i = \sum_t g_{it} a_{it}^\top`. Every rule brings its operands to
the shape (B, T, d): batch first, all positions flattened into T, features last; T = 1 for a
plain (B, d) input. :func:`fimcore.layers.factored_gram` and
:func:`fimcore.layers.per_sample_weight_grads` take that shape.
"""

from __future__ import annotations

import math
from typing import Any

from .._namespace import resolve_namespace

__all__ = ["as_tokens"]


def as_tokens(x: Any, /, *, feature_axes: int = 1, xp: Any = None) -> Any:
    """Reshape a batch-first array (B, *positions, *features) to (B, T, d).

    Args:
        x: array whose axis 0 is the batch and whose last ``feature_axes`` axes are features.
        feature_axes: how many trailing axes form the feature width d.
        xp: array namespace; resolved from ``x`` when None.

    Raises:
        ValueError: ``x`` has fewer than ``1 + feature_axes`` axes.

    Example:
        >>> import numpy as np
        >>> as_tokens(np.zeros((4, 3, 5, 7))).shape
        (4, 15, 7)
        >>> as_tokens(np.zeros((4, 7))).shape
        (4, 1, 7)
    """
    xp = resolve_namespace(x, xp=xp)
    shape = tuple(x.shape)
    if len(shape) < 1 + feature_axes:
        raise ValueError(f"x must be (B, *positions, *features) with {feature_axes} feature axes; "
                         f"received shape {shape}.")
    d = math.prod(shape[len(shape) - feature_axes:])
    t = math.prod(shape[1:len(shape) - feature_axes])
    return xp.reshape(x, (shape[0], t, d))
