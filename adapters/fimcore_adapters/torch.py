"""PyTorch adapter: the exact per-sample Gram matrix ``G = J Jᵀ`` of a training step.

Importing this module imports torch (that import is the opt-in). Two roles:

* :class:`GramRecorder` — ``with recorder:`` around your own forward and ``loss.backward()``;
  ``recorder.gram()`` then returns the (B, B) Gram matrix on the model's device, with no extra
  forward or backward pass and never the whole B×P Jacobian;
* :func:`per_sample_gram` — one call that runs forward and backward on a batch and returns G.

Rows of J are B × each sample's contribution to the gradient of the batch
loss (the gradient of its own loss ℓ_i unless a layer couples samples; under BatchNorm in train
mode, the per-sample contributions of the ordinary batch backward), so ``1ᵀ G 1 = B²‖∇L‖²``.
Layers with an exact rule: ``nn.Linear`` (any leading dimensions), ``nn.Conv1d/2d/3d``,
``nn.Embedding``, BatchNorm/GroupNorm/LayerNorm/InstanceNorm affine parameters; any other module
with parameters takes an exact generic ``torch.func`` path, split along the batch dimension the
module declares (``batch_first`` of RNN/GRU/LSTM, MultiheadAttention and Transformer modules,
packed sequences). A custom module type gets an exact rule of its own with
:func:`register_layer_rule` (a :class:`LayerRule`: what to capture in the forward, and the
per-sample gradient blocks from it and the output gradient). ``recorder.report()`` lists which
path each layer took and why.
"""

from __future__ import annotations

import torch
from torch import nn

from ._torch.cost import STRATEGIES
from ._torch.custom import LayerRule, register_layer_rule
from ._torch.diagonal import diagonal_fisher
from ._torch.distributed import mean_over_ranks
from ._torch.mbf import MBF, MBFLayerRecord, MBFReport, sampled_label_loss
from ._torch.ntk import output_jacobian_gram
from ._torch.policy import PolicyBatchSampler
from ._torch.recorder import GramRecorder
from ._torch.report import LayerRecord, Report

__all__ = ["GramRecorder", "per_sample_gram", "LayerRecord", "LayerRule", "MBF", "MBFLayerRecord",
           "MBFReport", "PolicyBatchSampler", "Report", "STRATEGIES", "diagonal_fisher", "mean_over_ranks",
           "output_jacobian_gram", "register_layer_rule", "sampled_label_loss"]


def per_sample_gram(model: nn.Module, loss_fn, inputs, targets, *, loss_reduction: str = "mean",
                    **recorder_options) -> torch.Tensor:
    """Run one forward and backward of ``loss_fn(model(inputs), targets)`` and return G (B×B).

    ``.grad`` is left as a normal step leaves it (gradients accumulate into existing ``.grad``).

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar loss, reduced over the batch as
            ``loss_reduction`` says.
        inputs: a tensor, or a tuple/list of tensors passed as positional arguments.
        targets: whatever ``loss_fn`` takes.
        loss_reduction: ``"mean"`` or ``"sum"``.
        **recorder_options: passed to :class:`GramRecorder` (``params``, ``strategy``, ``dtype``,
            ``memory_budget``, ``conv_method``, ``fisher``, ``mc_samples``, ``seed``; with
            ``fisher="sampled"`` the likelihood is read from ``loss_fn`` unless ``loss=`` is given).

    Returns:
        The (B, B) Gram matrix on the model's device.

    Raises:
        ValueError: the loss is not a scalar, or a :class:`GramRecorder` option is invalid.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
        >>> G = per_sample_gram(model, nn.MSELoss(), x, y)
        >>> r = 2 * (model(x) - y).detach()            # d ℓ_i / d output
        >>> a = torch.cat([x, torch.ones(4, 1, dtype=torch.float64)], 1)
        >>> bool(torch.allclose(G, (r @ r.T) * (a @ a.T)))
        True
    """
    if recorder_options.get("fisher") == "sampled":
        recorder_options.setdefault("loss", loss_fn)
    recorder = GramRecorder(model, loss_reduction=loss_reduction, **recorder_options)
    with recorder:
        out = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
        loss = loss_fn(out, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (reduced over the batch with "
                             f"{loss_reduction!r}); received {shape}. Use reduction='{loss_reduction}'")
        loss.backward()
    return recorder.gram()
