"""Exception types and messages shared by the PyTorch, JAX and TensorFlow adapters.

One condition, one built-in exception type and one message in all three adapters. Messages
follow the project's pattern: what must hold, what was received, how to fix it; a layer is
always named by its path in the model and its type.

=====================================  ======================  ================================
condition                              exception               builder
=====================================  ======================  ================================
bad option value                       ``ValueError``          :func:`bad_option`
option of the wrong type               ``TypeError``           :func:`bad_option_type`
a layer no rule or generic path takes  ``NotImplementedError`` :func:`unsupported_layer`
batch not on axis 0 / sizes disagree   ``ValueError``          :func:`batch_mismatch`
non-finite per-sample gradients        ``FloatingPointError``  :func:`nonfinite_gradients`
no backward recorded / wrong order     ``RuntimeError``        :func:`no_gram_recorded`
a layer that mixes samples, refused    ``ValueError``          :func:`coupled_layer`
a parameter used outside its layer     ``ValueError``          :func:`untracked_use`
=====================================  ======================  ================================
"""

from __future__ import annotations

from typing import Any

__all__ = ["bad_option", "bad_option_type", "batch_mismatch", "coupled_layer", "layer_label",
           "no_gram_recorded", "nonfinite_gradients", "unsupported_layer", "untracked_use"]


def layer_label(name: str, layer_type: str) -> str:
    """``'block.conv1' (Conv2d)``; the model itself is ``'<model>'``.

    Example:
        >>> layer_label("", "Sequential")
        "'<model>' (Sequential)"
    """
    return f"{name or '<model>'!r} ({layer_type})"


def bad_option(option: str, allowed: Any, received: Any, fix: str = "") -> ValueError:
    """``option must be one of <allowed>; received <value>. <fix>``"""
    return ValueError(f"{option} must be one of {allowed}; received {received!r}."
                      + (f" {fix}" if fix else ""))


def bad_option_type(option: str, expected: str, received: Any) -> TypeError:
    """``option must be <expected>; received <type>.``"""
    return TypeError(f"{option} must be {expected}; received {type(received).__name__} "
                     f"{received!r}.")


def unsupported_layer(name: str, layer_type: str, why: str, fix: str) -> NotImplementedError:
    """A layer that neither a rule nor the generic path can take exactly."""
    return NotImplementedError(f"layer {layer_label(name, layer_type)}: {why}. {fix}")


def batch_mismatch(name: str, layer_type: str, expected: int, received: Any, fix: str) -> ValueError:
    """The batch (axis 0) of a layer's input disagrees with the step's batch size."""
    return ValueError(f"every covered layer must see the batch on axis 0 with the step's size "
                      f"B = {expected}; layer {layer_label(name, layer_type)} received {received}. "
                      f"{fix}")


def nonfinite_gradients(name: str, layer_type: str) -> FloatingPointError:
    """Per-sample gradients with NaN/inf in a layer (the Gram is undefined)."""
    return FloatingPointError(
        f"non-finite per-sample gradients in layer {layer_label(name, layer_type)} at this step; "
        "the Gram matrix is undefined. Check the loss and learning rate, or skip this step's "
        "measurement")


def no_gram_recorded(why: str, fix: str) -> RuntimeError:
    """The step recorded no Gram (measuring off, no backward, wrong order of calls)."""
    return RuntimeError(f"no Gram matrix was recorded: {why}. {fix}")


def coupled_layer(name: str, layer_type: str, why: str, fix: str) -> ValueError:
    """A layer that mixes samples where the path in use would treat them independently."""
    return ValueError(f"layer {layer_label(name, layer_type)} couples the samples of the batch "
                      f"({why}); per-sample rows that ignore this would be wrong. {fix}")


def untracked_use(parameter: str, where: str, fix: str) -> ValueError:
    """A selected parameter used outside the layer that covers it (its gradient would be missed)."""
    return ValueError(f"parameter {parameter!r} is used {where}, outside the layer that covers it, "
                      f"so its contribution would be missing from G. {fix}")
