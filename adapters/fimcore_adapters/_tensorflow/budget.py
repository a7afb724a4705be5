r"""``memory_budget``: each layer's Gram formed with its temporaries under a byte cap.

Factored layers (:meth:`LayerRule.factors`) form rows i0:i1 of
:math:`G_{ij}=\sum_{t,s}(a_{it}\cdot a_{js}+\beta)(g_{it}\cdot g_{js})` at a time: n·B·T² entries
alive for each of a and g, so n = budget // (2·B·T²·itemsize). Materialised layers (rules whose
capture is batch-major, :attr:`LayerRule.batch_major`) recompute their per-sample rows on
slices of the batch and form block (I, J) as :math:`R_I R_J^\top`, two chunks alive:
n = budget // (2·P_l·itemsize). ``strategy="auto"`` keeps the cost model's form when it fits,
else takes the other; when neither fits with n = 1 the layer is refused. The generic path's
Jacobian is not chunked: its (B, P_l) rows must fit whole.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from . import cost, dense, generic, kernels, registry
from .generic import GENERIC

__all__ = ["check_memory_budget", "gram_and_grads"]


def check_memory_budget(memory_budget):
    """``memory_budget`` if it is None or a positive int of bytes, else ValueError."""
    if memory_budget is not None and (isinstance(memory_budget, bool)
                                      or not isinstance(memory_budget, int) or memory_budget <= 0):
        raise ValueError(f"memory_budget must be None or a positive number of bytes; received "
                         f"{memory_budget!r}")
    return memory_budget


def gram_and_grads(rec, layer, rule, calls, per_call):
    """One layer's ``(gram, batch gradients, path)`` with its temporaries under
    ``rec.memory_budget`` bytes (``rec``: the :class:`~.recorder.GramTape`)."""
    budget, label = rec.memory_budget, f"{layer.name!r} ({type(layer).__name__})"
    capture0, deltas0 = per_call[0]
    dtype = deltas0[0].dtype
    item = dtype.size
    batch = tf.shape(deltas0[0])[0]
    static_b = deltas0[0].shape[0]
    keep = rec._partial.get(id(layer))
    variables = rule.variables(layer) if rule is not GENERIC else registry.own_trainable_variables(layer)
    p_l = sum(int(np.prod(v.shape)) for v in variables if keep is None or id(v) in keep)
    if rule is GENERIC:
        if static_b is None or static_b * p_l * item > budget:
            need = "?" if static_b is None else static_b * p_l * item
            raise ValueError(
                f"memory_budget={budget} bytes cannot hold the generic path's per-sample rows of "
                f"layer {label}: (B, P_l) = ({static_b}, {p_l}) need {need} bytes at once (the "
                "generic Jacobian is not chunked). Raise memory_budget, register a rule for "
                "this layer type (register_layer_rule), or leave it out with params=...")
        return generic.gram_and_grads(rec._tape, layer, calls, per_call, rec._cast_t) if keep is None \
            else rec._layer_partial(layer, rule, calls, per_call, None)
    strategy = rec._strategy(layer.name)
    found = (rule.factors(layer, capture0, deltas0)
             if len(per_call) == 1 and keep is None and strategy != "materialize" else None)
    row_bytes = 2 * p_l * item                 # two chunks of rows alive, per sample
    fits_rows = row_bytes <= budget and rule.batch_major
    if found is not None:
        a, g, bias = found
        positions = 1 if a.shape.rank == 2 else a.shape[1]
        per_row = None if static_b is None or positions is None else 2 * static_b * positions ** 2 * item
        fits_factors = per_row is None or per_row <= budget
        b_cost = static_b or 128
        prefer = strategy == "factored" or (positions is not None and (positions == 1 or cost.factored_cost(
            b_cost, positions, a.shape[-1], g.shape[-1]) < cost.materialised_cost(
            b_cost, positions, a.shape[-1], g.shape[-1])))
        if fits_factors and (prefer or not fits_rows or strategy == "factored"):
            t2 = 1 if positions is None else positions ** 2
            size = tf.maximum(tf.constant(budget, batch.dtype) // (2 * batch * t2 * item), 1)
            rec._notes[layer.name] = (f"memory_budget: factored rows in chunks of "
                                       f"{'?' if per_row is None else max(1, budget // per_row)} samples")
            gram = kernels.factored_gram_chunked(a, g, bias=bias, size=size)
            return gram, dense.factor_grads(layer, a, g), "factored"
    if not fits_rows:
        need = [f"{row_bytes} bytes for materialised rows" if rule.batch_major else
                "materialised rows (not offered: the rule's capture is not batch-major)"]
        if found is not None:
            need.append(f"{per_row} bytes for one factored row")
        raise ValueError(
            f"memory_budget={budget} bytes is too small for layer {label}: with one sample per "
            f"chunk it needs {' or '.join(need)}. Raise memory_budget (or leave the layer "
            "out with params=...).")
    size = max(1, budget // row_bytes)
    rec._notes[layer.name] = f"memory_budget: rows in chunks of {size} samples, two alive"

    def sliced(i0, i1):
        out = []
        for capture, ds in per_call:
            cut = {k: (v[i0:i1] if isinstance(v, tf.Tensor) and k != "watch" else v)
                   for k, v in capture.items()}
            out.append(rule.per_sample(layer, cut, [d[i0:i1] for d in ds]))
        return [tf.add_n(list(group)) for group in zip(*out)]

    def rows(i0, i1):
        blocks = sliced(i0, i1)
        return tf.concat([kernels.flat_rows(b) for v, b in zip(variables, blocks)
                          if keep is None or id(v) in keep], axis=1)

    gram = kernels.rows_gram_chunked(batch, size, rows, dtype)
    count = (batch + size - 1) // size

    def body(c, sums):
        blocks = sliced(c * size, tf.minimum(c * size + size, batch))
        return c + 1, tuple(s + tf.reduce_sum(b, 0) for s, b in zip(sums, blocks))

    zeros = tuple(tf.zeros(v.shape, dtype) for v in variables)
    _, grads = tf.while_loop(lambda c, _: c < count, body, (tf.constant(0, batch.dtype), zeros))
    return gram, list(grads), "materialised"
