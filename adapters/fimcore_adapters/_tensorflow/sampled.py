r"""Labels drawn from the model for the sampled-label Fisher Gram (TensorFlow / Keras).

Class axis last (Keras). Formulas and the mean-of-K choice: :mod:`fimcore_adapters._fisher`.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from .._fisher import LIKELIHOODS, unsampled_loss

__all__ = ["resolve_likelihood", "output_cotangents"]


def resolve_likelihood(loss) -> str:
    """``"cross_entropy"`` or ``"mse"`` for a loss the sampled Fisher can draw labels for.

    Raises:
        ValueError: a Keras cross-entropy on probabilities (``from_logits=False``) or with label
            smoothing, ``loss=None``, or any other loss (named), each with the fix.
    """
    if isinstance(loss, str) and loss in LIKELIHOODS:
        return loss
    if isinstance(loss, (keras.losses.SparseCategoricalCrossentropy,
                         keras.losses.CategoricalCrossentropy)):
        config = loss.get_config()
        if not config.get("from_logits", False):
            raise ValueError(
                f"fisher='sampled' draws labels from softmax(logits); received {type(loss).__name__} "
                "with from_logits=False (the model outputs probabilities). Drop the final softmax "
                "and build the loss with from_logits=True, or use fisher='empirical'")
        if config.get("label_smoothing", 0.0):
            raise ValueError(
                f"fisher='sampled' reads the cross-entropy as a log-likelihood; received "
                f"{type(loss).__name__} with label_smoothing={config['label_smoothing']}, which is "
                "not one. Build it without label smoothing, or use fisher='empirical'")
        return "cross_entropy"
    if isinstance(loss, keras.losses.MeanSquaredError):
        return "mse"
    if loss is None:
        raise ValueError("fisher='sampled' needs the likelihood; received loss_fn=None. Pass "
                         "loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True) (or "
                         "'cross_entropy') or keras.losses.MeanSquaredError() (or 'mse')")
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
    raise unsampled_loss(repr(name))


def _generator(seed):
    if isinstance(seed, tf.random.Generator):
        return seed
    if seed is None:
        return tf.random.get_global_generator()
    return tf.random.Generator.from_seed(seed)


def output_cotangents(h, likelihood: str, mc_samples: int, reduction: str, seed):
    """K cotangents ``∂L/∂h`` (K, *h.shape) at labels drawn from the model, and the labels.

    ``reduction``: ``"mean"`` (the Keras ``sum_over_batch_size``), ``"sum"`` or ``"none"``
    (per-sample losses summed). Draws are made in float64.
    """
    gen = _generator(seed)
    hd = tf.cast(tf.stop_gradient(h), tf.float64)
    shape = h.shape
    B = int(shape[0])
    if likelihood == "cross_entropy":
        C = int(shape[-1])
        positions = math.prod(int(n) for n in shape[1:-1])
        p = tf.nn.softmax(hd, axis=-1)
        flat = tf.reshape(p, (-1, C))                                     # (B·positions, C)
        u = gen.uniform((mc_samples, flat.shape[0], 1), dtype=tf.float64)
        # inverse CDF: the first class whose cumulative probability exceeds u
        below = tf.cast(tf.math.cumsum(flat, axis=-1)[None] <= u, tf.int64)
        labels = tf.minimum(tf.reduce_sum(below, axis=-1), C - 1)        # (K, B·positions)
        labels = tf.reshape(labels, (mc_samples,) + tuple(int(n) for n in shape[:-1]))
        v = p[None] - tf.one_hot(labels, C, dtype=tf.float64)
        if reduction == "mean":
            v = v / (B * positions)
    elif likelihood == "mse":
        D = math.prod(int(n) for n in shape[1:])
        c = 1.0 / D if reduction == "mean" else 1.0
        eps = gen.normal((mc_samples,) + tuple(int(n) for n in shape), dtype=tf.float64)
        labels = hd[None] + math.sqrt(1.0 / (2.0 * c)) * eps
        v = 2.0 * c * (hd[None] - labels)
        if reduction == "mean":
            v = v / B
        labels = tf.cast(labels, h.dtype)
    else:                                                      # pragma: no cover
        raise unsampled_loss(repr(likelihood))
    return tf.cast(v, h.dtype), labels
