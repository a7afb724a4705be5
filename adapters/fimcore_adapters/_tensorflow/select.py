"""``params=``: which variables are the columns of J (layers, names, variables, paths)."""

from __future__ import annotations

import keras
import tensorflow as tf

from . import registry

__all__ = ["resolve_params"]


def _variable_path(v) -> str:
    return getattr(v, "path", None) or v.name


def resolve_params(model, params):
    """``(layer predicate, ids of single variables selected)`` from ``params``: None (every
    trainable variable), a predicate ``layer -> bool``, or an iterable of layers, layer names,
    ``tf.Variable`` objects and variable paths (``variable.path``, e.g. ``"dense/kernel"``).

    Raises:
        ValueError: an entry that is neither a layer nor a trainable variable of ``model``
            (named, with the names that would be accepted).
    """
    if params is None:
        return (lambda layer: True), set()
    if callable(params) and not isinstance(params, (keras.layers.Layer, tf.Variable)):
        return params, set()
    if isinstance(params, (str, keras.layers.Layer, tf.Variable)) or not hasattr(params, "__iter__"):
        params = [params]
    layers = list(model._flatten_layers(include_self=True, recursive=True))
    variables = {}
    for layer in layers:
        for v in registry.own_trainable_variables(layer):
            variables[id(v)] = v
    by_path = {_variable_path(v): v for v in variables.values()}
    layer_names = {layer.name for layer in layers}
    layer_ids = {id(layer) for layer in layers}
    names, ids, chosen, unknown = set(), set(), set(), []
    for entry in params:
        if isinstance(entry, str):
            if entry in layer_names:
                names.add(entry)
            elif entry in by_path:
                chosen.add(id(by_path[entry]))
            else:
                unknown.append(entry)
        elif isinstance(entry, keras.layers.Layer) and id(entry) in layer_ids:
            ids.add(id(entry))
        elif id(entry) in variables:
            chosen.add(id(entry))
        else:
            unknown.append(getattr(entry, "path", None) or getattr(entry, "name", None)
                           or type(entry).__name__)
    if unknown:
        raise ValueError(
            f"params must name layers or trainable variables of model {model.name!r}; received "
            f"{unknown}, which are neither. Layers: {sorted(layer_names)}; variables (by path): "
            f"{sorted(by_path)}. Pass layers, layer names, tf.Variable objects of the model or "
            "their .path.")
    return (lambda layer: layer.name in names or id(layer) in ids), chosen
