"""``per_sample_gram``: the one-off functional form, with input validation."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from .recorder import GramTape, check_built, check_reduction, resolve_options

_KERAS_REDUCTIONS = {"sum_over_batch_size": "mean", "mean": "mean", "sum": "sum",
                     "none": "none", None: "none", "mean_with_sample_weight": "mean"}


def _batch_size(x, name: str) -> int:
    sizes = []
    for leaf in tf.nest.flatten(x):
        if isinstance(leaf, tf.RaggedTensor) or (
                isinstance(leaf, tf.SparseTensor)):
            raise ValueError(
                f"{name} must hold dense, rectangular batches; received a "
                f"{type(leaf).__name__}. Pad the samples to one shape (e.g. "
                "ragged.to_tensor() with a mask) before taking the Gram."
            )
        if isinstance(leaf, np.ndarray) and leaf.dtype == object:
            raise ValueError(
                f"{name} must hold dense, rectangular batches; received a ragged "
                "(object-dtype) array whose samples differ in shape. Pad them to one shape first."
            )
        shape = getattr(leaf, "shape", None)
        if shape is None or len(shape) == 0:
            raise ValueError(f"{name} must be batched arrays with a leading batch axis; received "
                             f"{type(leaf).__name__} without one.")
        sizes.append(int(shape[0]))
    if not sizes:
        raise ValueError(f"{name} must not be empty; received {x!r}.")
    if len(set(sizes)) != 1:
        raise ValueError(
            f"every array in {name} must have the same batch size; received batch sizes "
            f"{sizes}. Slice them to one batch."
        )
    return sizes[0]


def _dense(x, name: str):
    """Nested Python lists of numbers become one array; lists of arrays stay a structure."""
    if isinstance(x, (list, tuple)) and not all(hasattr(e, "shape") for e in x):
        try:
            return np.asarray(x)
        except ValueError:
            raise ValueError(
                f"{name} must hold dense, rectangular batches; received nested lists whose "
                "samples differ in length. Pad them to one shape (with a mask) first."
            ) from None
    return x


def check_loss_reduction(loss_fn, loss_reduction: str) -> None:
    """Refuse a Keras loss whose own reduction contradicts ``loss_reduction``."""
    if isinstance(loss_fn, keras.losses.Loss):
        declared = _KERAS_REDUCTIONS.get(loss_fn.reduction, loss_fn.reduction)
        if declared != loss_reduction:
            raise ValueError(
                f"loss_fn reduces the batch with reduction={loss_fn.reduction!r} "
                f"({declared!r}) but loss_reduction={loss_reduction!r} was passed; they must "
                f"agree. Pass loss_reduction={declared!r} or build the loss with a matching "
                "reduction."
            )


def per_sample_gram(model, loss_fn, x, y, *, loss_reduction: str = "mean", training: bool = True,
                    params=None, strategy="auto", dtype=None, memory_budget: int | None = None,
                    layers=None,
                    mode: str | None = None, fisher: str = "empirical", mc_samples: int = 1,
                    seed=None) -> np.ndarray:
    r"""The (B, B) Gram ``G = J Jᵀ`` of one batch's per-sample gradients, as a NumPy array.

    TensorFlow has no array-API namespace yet, so the Gram is handed over as NumPy (the B×B
    copy is free); everything P-sized stays in TensorFlow on the model's device. Row i of J
    is B × sample i's contribution to the gradient of ``loss_fn(y, model(x))`` for
    ``loss_reduction="mean"`` (its own gradient when no layer couples samples; behind a
    train-mode BatchNormalization the batch statistics are kept), hence
    :math:`\mathbf 1^\top G\mathbf 1 = B^2\|\nabla L\|^2`. Non-trainable state that the
    forward pass updates (BatchNormalization moving statistics) is restored afterwards.

    Args:
        model: a built Keras model.
        loss_fn: ``loss_fn(y, y_pred)``; a batch mean (default), a sum or per-sample values,
            as declared by ``loss_reduction``.
        x, y: one batch (arrays or tensors, nested structures allowed for ``x``).
        loss_reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample losses of shape (B,)).
        training: the ``training`` flag of the forward pass (True: BatchNorm uses batch
            statistics, as in a training step).
        params: restrict G to these layers (see :class:`GramTape`).
        strategy: ``"auto"`` (default), ``"factored"``, ``"materialize"``, ``"generic"``
            (per-layer jacobian reference path) or a dict by layer name (see :class:`GramTape`).
        dtype: dtype in which the Gram is formed; default the gradients' dtype (its dtype is
            then the ``grad_dtype`` to give :class:`fimcore.MeasureTracker`).
        memory_budget: None or bytes: cap on each layer's Gram temporaries (see :class:`GramTape`).
        layers, mode: deprecated spellings of ``params`` and ``strategy``.
        fisher, mc_samples, seed: ``fisher="sampled"`` gives the Gram at labels drawn from the
            model (likelihood read from ``loss_fn``; see :meth:`GramTape.gradient_and_gram`).

    Returns:
        ``np.ndarray`` of shape (B, B).

    Raises:
        ValueError: unbuilt model; ragged, empty or mismatched batches; a loss whose shape or
            Keras reduction contradicts ``loss_reduction``; non-finite per-sample gradients
            (the message names the first layer affected); a variable read outside the call
            of the layer that owns it (the rows would not sum to the batch gradient).
        TypeError: a model that is not a Keras layer/model.

    Example:
        >>> import numpy as np, keras
        >>> from fimcore_adapters.tensorflow import per_sample_gram
        >>> model = keras.Sequential([keras.Input((3,), dtype="float32"),
        ...                           keras.layers.Dense(2, dtype="float32")])
        >>> x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
        >>> G = per_sample_gram(model, keras.losses.MeanSquaredError(), x, y)
        >>> G.shape, G.dtype, bool(np.allclose(G, G.T))
        ((4, 4), dtype('float32'), True)
    """
    check_built(model)
    params, strategy = resolve_options(params, strategy, layers, mode, where="per_sample_gram")
    check_reduction(loss_reduction)
    check_loss_reduction(loss_fn, loss_reduction)
    x, y = _dense(x, "x"), (None if y is None else _dense(y, "y"))
    batch = _batch_size(x, "x")
    if batch == 0:
        raise ValueError("x must hold at least one sample; received an empty batch (B = 0).")
    if y is not None and _batch_size(y, "y") != batch:
        raise ValueError(
            f"x and y must have the same batch size; received {batch} inputs and "
            f"{_batch_size(y, 'y')} targets."
        )
    state = [(v, tf.identity(v.value)) for v in model.non_trainable_variables]
    try:
        with GramTape(model, params=params, strategy=strategy, dtype=dtype,
                      memory_budget=memory_budget) as tape:
            y_pred = model(x, training=training)
            loss = loss_fn(y, y_pred)
        _, gram = tape.gradient_and_gram(loss, loss_reduction=loss_reduction, check=True,
                                         fisher=fisher, outputs=y_pred, loss_fn=loss_fn,
                                         mc_samples=mc_samples, seed=seed)
    finally:
        for v, value in state:
            v.assign(value)
    gram = gram.numpy()
    if not np.all(np.isfinite(gram)):
        bad = [name for name, g in tape.layer_grams.items() if not np.all(np.isfinite(g.numpy()))]
        where = f"layer {bad[0]!r}" if bad else "the loss"
        raise ValueError(
            f"per-sample gradients must be finite; received NaN/inf in the Gram, first in "
            f"{where} (loss = {float(tf.reduce_sum(loss))!r}). Check the inputs, the loss "
            "(e.g. log of 0) and the weights for overflow."
        )
    return gram
