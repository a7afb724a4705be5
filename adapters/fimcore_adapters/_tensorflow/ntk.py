r"""Output-Jacobian Gram (empirical NTK) and its loss-Hessian-weighted form (TensorFlow).

Conventions as in the PyTorch adapter: Θ = 𝒥𝒥ᵀ (B·C × B·C, row i·C + c = output c of sample i),
weighted W = Λ^{1/2} Θ Λ^{1/2} with the symmetric square root of Λ_i = ∇²_h ℓ; the non-zero
eigenvalues of W are B × those of the Fisher (generalised Gauss–Newton) F = (1/B) Σ_i 𝒥_iᵀΛ_i𝒥_i.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .._fisher import WEIGHTINGS

__all__ = ["output_jacobian_gram"]


def output_jacobian_gram(model, x, *, weighted_by=None, training: bool = False,
                         max_outputs: int = 100, dtype=None) -> np.ndarray:
    r"""The (B·C, B·C) output-Jacobian Gram of ``model`` on batch ``x``, as a NumPy array.

    Rows of 𝒥 come from ``GradientTape.jacobian`` of the whole batch output (so layers that
    couple samples are exact), accumulated variable by variable: B·C × P_v is alive per variable.

    Args:
        model: a built Keras model; ``model(x)`` is (B, C) (or (B, …), flattened to C).
        x: one batch.
        weighted_by: None (Θ), ``"softmax"`` (Λ_i = diag(p_i) − p_i p_iᵀ, logits (B, C)) or
            ``"mse"`` (Λ = (2/C)·I, the batch-mean squared error's Hessian per sample).
        training: the forward's ``training`` flag.
        max_outputs: refuse more than this many outputs per sample.
        dtype: dtype of the products; default the output's.

    Raises:
        ValueError: bad ``weighted_by``; C > ``max_outputs``.

    Example:
        >>> import numpy as np, keras
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
        >>> x = np.array([[1.0, 0.0], [1.0, 1.0]], "float32")
        >>> output_jacobian_gram(model, x).tolist()
        [[1.0, 1.0], [1.0, 2.0]]
    """
    if weighted_by not in WEIGHTINGS:
        raise ValueError(f"weighted_by must be one of {WEIGHTINGS}; received {weighted_by!r}. Use None "
                         "for the NTK Gram, 'softmax' for softmax cross-entropy, 'mse' for squared error")
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        h = model(x, training=training)
        h = tf.reshape(h, (tf.shape(h)[0], -1))
    B, C = int(h.shape[0]), int(h.shape[1])
    if C > max_outputs:
        raise ValueError(f"output_jacobian_gram forms a (B·C)² Gram and B·C Jacobian rows; C must be "
                         f"at most {max_outputs} outputs per sample; received C = {C}. Pass "
                         "max_outputs=C if the memory allows")
    dt = tf.as_dtype(dtype) if dtype is not None else h.dtype
    gram = None
    for v in variables:
        jac = tape.jacobian(h, v, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                            experimental_use_pfor=True)
        rows = tf.cast(tf.reshape(jac, (B * C, -1)), dt)
        block = tf.matmul(rows, rows, transpose_b=True)
        gram = block if gram is None else gram + block
    del tape
    gram = gram.numpy()
    if weighted_by is None:
        return gram
    if weighted_by == "mse":
        return gram * (2.0 / C)
    p = tf.nn.softmax(tf.cast(h, tf.float64), axis=-1).numpy()
    lam = np.einsum("ia,ab->iab", p, np.eye(C)) - p[:, :, None] * p[:, None, :]
    w, V = np.linalg.eigh(lam)
    # Λ is singular (Λ1 = 0): eigenvalues at rounding level are zeros, not sqrt(eps)-sized roots
    w = np.where(w > C * np.finfo(w.dtype).eps * w.max(axis=-1, keepdims=True), w, 0.0)
    root = ((V * np.sqrt(w)[:, None, :]) @ np.swapaxes(V, 1, 2)).astype(gram.dtype)
    g4 = np.einsum("iab,ibjc,jcd->iajd", root, gram.reshape(B, C, B, C), root)
    return g4.reshape(B * C, B * C)
