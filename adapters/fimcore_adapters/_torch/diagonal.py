r"""``diagonal_fisher``: Î1, Î2, exact and empirical Fisher diagonals with V1/V2 (PyTorch).

Per chunk of inputs the output Jacobian columns :math:`u = \partial h/\partial\theta_i` come from
``torch.func.vmap(jacrev(·))`` of one sample's forward (C×P per input, never N×P at once), the
second derivatives :math:`w = \partial^2 h/\partial\theta_i^2` from
:class:`~fimcore_adapters._torch.diagonal_hessian.SecondDerivatives` (``"i2"`` only), and
:func:`fimcore.diagonal.diagonal_sums` turns them into the estimates, variances and bounds.
Labels are drawn once for all inputs before chunking, so results do not depend on the chunk size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from fimcore.diagonal import (
    DiagonalFisher,
    check_options,
    check_outputs,
    chunk_size_for,
    estimate,
    given_labels,
    label_residuals,
)

from .._errors import coupled_layer
from .diagonal_hessian import SecondDerivatives, dense_layers, perturbed

__all__ = ["diagonal_fisher"]

def _check_modes(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            raise coupled_layer(name, type(m).__name__,
                                "in training mode it mixes the batch or draws random masks, so "
                                "the per-input Fisher is not defined",
                                "Call model.eval() before diagonal_fisher")


def _residuals(outputs, labels, targets, *, likelihood, estimator, mc_samples, generator):
    """(N, M, C) residuals s = t(y) − η, or None for ``"exact"``."""
    given = given_labels(estimator, labels, targets)
    if estimator == "exact":
        return None
    if given is None:
        n, c = outputs.shape
        if likelihood == "categorical":
            p = torch.softmax(outputs, dim=1)
            given = torch.multinomial(p, mc_samples, replacement=True, generator=generator)
        else:
            noise = torch.randn((n, mc_samples, c), generator=generator, dtype=outputs.dtype,
                                device=outputs.device)
            given = outputs[:, None, :] + noise
    return label_residuals(outputs, torch.as_tensor(given, device=outputs.device), likelihood)


def diagonal_fisher(model: nn.Module, inputs: torch.Tensor, *, likelihood: str = "categorical",
                    estimator: str = "i1", labels=None, targets=None, mc_samples: int = 1,
                    generator: torch.Generator | None = None, variance: bool = False,
                    chunk_size: int | None = None) -> DiagonalFisher:
    r"""Diagonal Fisher estimate of ``model`` on ``inputs``, averaged over the inputs.

    With :math:`u = \partial h/\partial\theta_i`, :math:`w = \partial^2 h/\partial\theta_i^2` and
    :math:`s = t(y) - \eta(x)` (see :mod:`fimcore.diagonal` for the formulas):

    * ``"i1"``: :math:`\frac1{NM}\sum_{n,m}(s_{nm}^\top u_n)^2`, labels drawn from the model;
    * ``"i2"``: :math:`\frac1{NM}\sum_{n,m}(u_n^\top\mathcal I(h_n)u_n - s_{nm}^\top w_n)`;
    * ``"exact"``: :math:`\frac1N\sum_n u_n^\top\mathcal I(h_n)u_n` (the GGN diagonal);
    * ``"empirical"``: :math:`\frac1N\sum_n(s_n^\top u_n)^2` at the data labels ``targets``.

    Args:
        model: maps a batch (N, ...) to outputs (N, C): logits for ``"categorical"``, the mean of
            a unit-variance Gaussian for ``"gaussian"``. BatchNorm/Dropout must be in eval mode.
        inputs: (N, ...) tensor.
        likelihood: ``"categorical"`` or ``"gaussian"``.
        estimator: ``"i1"``, ``"i2"``, ``"exact"`` or ``"empirical"``.
        labels: for ``"i1"``/``"i2"``, labels to evaluate at instead of drawing them: class
            indices (N,) or (N, M); Gaussian values (N, C) or (N, M, C).
        targets: data labels for ``"empirical"`` (same shapes as ``labels``).
        mc_samples: labels drawn per input when ``labels`` is None (M).
        generator: ``torch.Generator`` for the label draws.
        variance: also return the closed-form V1 (``"i1"``) or V2 (``"i2"``) averaged over the
            inputs, and its bounds.
        chunk_size: inputs per chunk (default: about 2**24 entries of u and w per chunk).

    Returns:
        :class:`fimcore.diagonal.DiagonalFisher` with ``values``, ``variance``, ``bounds`` and
        ``groups()``, keyed by ``model.named_parameters()`` names (trainable ones).

    Raises:
        ValueError: an unknown option, ``mc_samples < 1``, outputs that do not fit the
            likelihood, labels of the wrong shape, a module in training mode that mixes samples.
        NotImplementedError: ``"i2"`` on a model with a module the exact second-derivative route
            does not cover (named with its path and type).
        FloatingPointError: NaN/inf outputs or derivatives.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> exact = diagonal_fisher(model, x, estimator="exact")
        >>> i2 = diagonal_fisher(model, x, estimator="i2", variance=True)
        >>> bool(torch.allclose(i2.variance["2.weight"], torch.zeros(2, 4, dtype=torch.float64)))
        True
        >>> bool(torch.allclose(i2.values["2.weight"], exact.values["2.weight"]))
        True
    """
    mc_samples = check_options(likelihood, estimator, mc_samples)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
        raise TypeError(f"inputs must be a tensor with the batch on axis 0; received "
                        f"{type(inputs).__name__}.")
    _check_modes(model)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters; there is no Fisher diagonal to "
                         "estimate.")
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        outputs = model(inputs)
    check_outputs(outputs, likelihood)
    s = _residuals(outputs, labels, targets, likelihood=likelihood, estimator=estimator,
                   mc_samples=mc_samples, generator=generator)
    n, c = outputs.shape
    dense = dense_layers(model, params, inputs)
    if dense is not None:                    # an MLP: the factored per-unit route
        def chunks():
            widest = max(m.out_features ** (2 if estimator == "i2" else 1) + m.in_features
                         for m in dense.values())
            step = chunk_size_for(n, c, widest, chunk_size)
            for start in range(0, n, step):
                sl = slice(start, min(n, start + step))
                parts = {}
                for name, module in dense.items():
                    a, j, hd = perturbed(model, params, buffers, module, inputs[sl],
                                         hessian=estimator == "i2")
                    if hd is not None:
                        hd = hd.diagonal(dim1=2, dim2=3)
                    prefix = f"{name}." if name else ""
                    bias = prefix + "bias" if module.bias is not None else None
                    parts[prefix + "weight"] = (bias, j, hd, a)
                yield sl, {}, {}, parts
    else:
        second = SecondDerivatives(model, params, buffers, inputs) if estimator == "i2" else None

        def one(p, xi):
            return functional_call(model, (p, buffers), (xi.unsqueeze(0),)).squeeze(0)

        jac = vmap(jacrev(one), in_dims=(None, 0))
        detached = {k: p.detach() for k, p in params.items()}
        step = chunk_size_for(n, c, sum(p.numel() for p in params.values()), chunk_size)

        def chunks():
            for start in range(0, n, step):
                sl = slice(start, min(n, start + step))
                yield sl, jac(detached, inputs[sl]), (second(inputs[sl]) if second else {}), {}

    return estimate(chunks(), outputs, s, {k: tuple(p.shape) for k, p in params.items()},
                    likelihood=likelihood, estimator=estimator, variance=variance)
