"""Layer registry: the LayerRule interface, registration and lookup.

A :class:`LayerRule` knows one layer type's forward well enough to capture, during the
ordinary forward pass, the tensors its per-sample gradients are made of (the layer input
``a`` and the pre-activation output, whose loss gradient ``δ`` the ordinary backward
provides), and turns them into that layer's Gram contribution and its batch gradients.

Rows are B × the per-sample *contributions* to the gradient of the batch loss L (they sum to
B·∇L, so ``1ᵀ G 1 = B²‖∇L‖²``):
for a layer without cross-sample coupling row i is sample i's own gradient; behind a
train-mode BatchNormalization the coupling is already inside ``δ``.

Users extend the registry with :func:`register_layer_rule`.
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from .. import _rules
from . import kernels

_REGISTRY: dict[type, "LayerRule"] = {}


class LayerRule:
    """How one Keras layer type contributes to the Gram.

    Subclasses implement :meth:`variables`, :meth:`forward` and :meth:`per_sample`;
    :meth:`gram_and_grads` may be overridden with a cheaper exact form (e.g. factored).
    """

    #: name used in path reports
    name = "rule"

    #: every tensor of :meth:`forward`'s capture (except ``"watch"``) has the batch on axis 0, so
    #: :meth:`per_sample` may run on a slice of the batch (needed for ``memory_budget``)
    batch_major = False

    def supports(self, layer: keras.layers.Layer) -> bool:
        """Whether this rule is exact for ``layer`` (else the generic path is taken)."""
        return True

    def variables(self, layer: keras.layers.Layer) -> list:
        """The trainable variables of ``layer`` this rule covers, in a fixed order."""
        raise NotImplementedError

    def forward(self, layer, call: Callable, args: tuple, kwargs: dict):
        """Run the layer; return ``(outputs, capture)``.

        ``capture`` is a dict whose ``"watch"`` entry lists the tensors whose loss gradient
        :meth:`per_sample` needs; return ``capture=None`` to send this call to the generic path.
        """
        raise NotImplementedError

    def per_sample(self, layer, capture: dict, deltas: list) -> list:
        """Per-sample gradient blocks (B, *v.shape), one per :meth:`variables` entry."""
        raise NotImplementedError

    def factored(self, layer, capture: dict, deltas: list):
        """The factored form ``(gram, batch gradients, "factored")`` of one call, or None where
        the rule has none (``strategy="factored"`` then takes :meth:`gram_and_grads`)."""
        return None

    def factors(self, layer, capture: dict, deltas: list):
        """``(a, g, bias)`` with a (B, [T,] d_a), g (B, [T,] d_g) when the call's Gram is the
        factored form of :func:`.kernels.factored_gram` (and its batch gradients those of
        :func:`.dense.factor_grads`), else None."""
        return None

    def mirrored(self, layer, capture: dict, deltas: list, sink, *, strategy: str):
        """Under a multi-replica ``tf.distribute`` strategy: ``(global (B, B) block, local batch
        gradients, path)`` of one call from operands handed to ``sink`` (a
        :class:`~._tensorflow.mirrored.MirroredSink`, which gathers them across replicas), or
        None to have the rows of :meth:`per_sample` gathered instead. ``strategy`` is the
        layer's ``"auto"``/``"factored"`` choice (``"materialize"`` never reaches here)."""
        return None

    def gram_and_grads(self, layer, capture: dict, deltas: list):
        """``(gram contribution (B, B), batch gradients, path)`` of one call (this base form
        materialises :meth:`per_sample`; it is what ``strategy="materialize"`` takes)."""
        blocks = self.per_sample(layer, capture, deltas)
        rows = tf.concat([kernels.flat_rows(b) for b in blocks], axis=1)
        return kernels.gram_of_rows(rows), [tf.reduce_sum(b, axis=0) for b in blocks], "materialised"


def register_layer_rule(layer_type: type, rule: LayerRule | None = None, *, override: bool = False):
    """Register ``rule`` for ``layer_type`` (usable as a class decorator on the rule).

    The rule applies to ``layer_type`` and to subclasses that do not override ``call``.
    Registering a type that already has a rule (a built-in one, or one registered before) raises
    unless ``override=True``.

    Example:
        >>> import keras
        >>> from fimcore_adapters.tensorflow import LayerRule, register_layer_rule, rule_for
        >>> class Scale(keras.layers.Layer):
        ...     def build(self, shape):
        ...         self.w = self.add_weight(shape=(shape[-1],), initializer="ones")
        ...     def call(self, x):
        ...         return x * self.w
        >>> @register_layer_rule(Scale)
        ... class ScaleRule(LayerRule):
        ...     name = "scale"
        ...     def variables(self, layer):
        ...         return [layer.w]
        ...     def forward(self, layer, call, args, kwargs):
        ...         y = call(*args, **kwargs)
        ...         return y, {"x": args[0], "watch": [y]}
        ...     def per_sample(self, layer, capture, deltas):
        ...         return [capture["x"] * deltas[0]]
        >>> rule_for(Scale()).name
        'scale'
    """
    def store(instance):
        if layer_type in _REGISTRY and not override:
            raise ValueError(f"{layer_type.__name__} already has the rule "
                             f"{_REGISTRY[layer_type].name!r}; pass override=True to replace it")
        _REGISTRY[layer_type] = instance

    return _rules.registration(layer_type, rule, override=override, owner_base=keras.layers.Layer,
                        owner_kind="layer", base_name="keras.layers.Layer", rule_base=LayerRule,
                        framework="tensorflow", store=store)


def rule_for(layer: keras.layers.Layer) -> LayerRule | None:
    """The registered rule that applies exactly to ``layer``, or None (generic path)."""
    return _rules.nearest_rule(_REGISTRY, layer, "call")


def own_trainable_variables(layer: keras.layers.Layer) -> list:
    """Trainable variables created by ``layer`` itself (not by its sub-layers)."""
    if not layer.trainable:
        return []
    return [v for v in getattr(layer, "_trainable_variables", []) if v.trainable]


def _plain(layer) -> bool:
    return (not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None)


def _present(*variables):
    return [v for v in variables if v is not None and v.trainable]
