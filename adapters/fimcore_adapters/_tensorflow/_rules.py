"""The built-in layer rules, registered on import (the registry itself is :mod:`._registry`)."""

from __future__ import annotations

import keras

from ._layers import ConvRule, DenseRule, EinsumDenseRule, EmbeddingRule
from ._norms import BatchNormalizationRule, GroupNormalizationRule, LayerNormalizationRule
from ._registry import (  # noqa: F401  (re-exported)
    LayerRule,
    own_trainable_variables,
    register_layer_rule,
    rule_for,
)

for _cls, _rule in (
    (keras.layers.Dense, DenseRule()),
    (keras.layers.EinsumDense, EinsumDenseRule()),
    (keras.layers.Conv1D, ConvRule()),
    (keras.layers.Conv2D, ConvRule()),
    (keras.layers.Conv3D, ConvRule()),
    (keras.layers.Embedding, EmbeddingRule()),
    (keras.layers.BatchNormalization, BatchNormalizationRule()),
    (keras.layers.LayerNormalization, LayerNormalizationRule()),
    (keras.layers.GroupNormalization, GroupNormalizationRule()),
):
    register_layer_rule(_cls, _rule)
