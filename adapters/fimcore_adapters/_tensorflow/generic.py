r"""The generic path: exact rows of a layer without a rule, by ``GradientTape.jacobian``.

For a layer with own variables θ, outputs y and their loss gradients δ (held fixed), row i is
:math:`\partial_\theta \sum_t y_{it}\cdot\delta_{it}`: one Jacobian of a (B,) vector through the
recorded forward (vectorised with ``pfor``). Exact for any layer whose samples do not mix.
"""

from __future__ import annotations

import tensorflow as tf

from . import kernels, registry


class _Generic(registry.LayerRule):
    """Exact fallback for layers without a rule: the rows of a layer's own variables θ are
    :math:`\\partial_\\theta \\sum_t y_{it}\\cdot\\delta_{it}` (y its outputs, δ their loss
    gradient held fixed), taken with ``GradientTape.jacobian`` through the recorded forward."""

    name = "generic"

    def variables(self, layer):
        return registry.own_trainable_variables(layer)

    def forward(self, layer, call, args, kwargs):
        out = call(*args, **kwargs)
        return out, generic_capture(out, call, args, kwargs)


def _float_tensors(out):
    return [t for t in tf.nest.flatten(out) if isinstance(t, tf.Tensor) and t.dtype.is_floating]


def generic_capture(out, call, args, kwargs):
    """What the generic path keeps of one call: its floating outputs, and the call itself with
    its arguments (re-run with inputs held fixed when the layer is called more than once)."""
    return {"watch": _float_tensors(out), "rerun": (call, args, kwargs)}


GENERIC = _Generic()


def gram_and_grads(tape, layer, calls, per_call, cast):
    """``(gram, batch gradients, "generic")`` of one layer over its recorded ``calls``; ``cast``
    casts the per-sample blocks to the Gram dtype."""
    rows, grads = rows_and_grads(tape, layer, calls, per_call, cast)
    return kernels.gram_of_rows(rows), grads, "generic"


def rows_and_grads(tape, layer, calls, per_call, cast, keep=None):
    """The layer's per-sample rows (B, P_l) and its batch gradients (see :func:`gram_and_grads`);
    ``keep``: ids of the variables whose columns the rows hold (default all)."""
    own = registry.own_trainable_variables(layer)
    with tape:  # re-enter the persistent tape: s_i = Σ_t y_it·δ_it
        s = None
        for (_, _, capture), (_, ds) in zip(calls, per_call):
            outputs = capture["watch"]
            if len(calls) > 1:
                # a later call's input may depend on an earlier call's output, hence on θ:
                # δ already carries that path, so differentiate each call with its inputs fixed
                call, args, kwargs = capture["rerun"]
                fixed = tf.nest.map_structure(
                    lambda t: tf.stop_gradient(t) if isinstance(t, tf.Tensor) else t, (args, kwargs))
                outputs = _float_tensors(call(*fixed[0], **fixed[1]))
            for y, d in zip(outputs, ds):
                term = y * tf.stop_gradient(tf.cast(d, y.dtype))
                term = tf.reduce_sum(tf.reshape(term, tf.stack([tf.shape(term)[0], -1])), axis=1)
                s = term if s is None else s + term
    blocks = tape.jacobian(s, own, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                           experimental_use_pfor=True)
    blocks = [cast(b) for b in blocks]
    rows = tf.concat([kernels.flat_rows(b) for v, b in zip(own, blocks)
                      if keep is None or id(v) in keep], axis=1)
    return rows, [tf.reduce_sum(b, 0) for b in blocks]
