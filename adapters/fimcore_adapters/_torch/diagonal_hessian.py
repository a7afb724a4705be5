r"""Exact per-parameter second derivatives w = ∂²h/∂θ_i² of the network outputs (PyTorch).

For a layer whose output is linear in its parameters, :math:`z = L(a;\theta_l)` with input
:math:`a` independent of :math:`\theta_l`, the chain rule leaves one term:

.. math::  w_c(\theta_i) = \delta z_i^\top H_c\, \delta z_i, \qquad
           \delta z_i = \partial z/\partial\theta_i, \quad H_c = \partial^2 h_c/\partial z^2 .

:math:`H_c` is the Hessian of output c with respect to a perturbation added to the layer's output
(a forward hook adds a zero tensor δ and ``torch.func.jacfwd(jacrev(·))`` differentiates twice in δ),
so any parameter-free computation after the layer (activations, pooling, flatten, residual sums)
is differentiated exactly. ``nn.Linear`` on one feature vector per sample uses
:math:`w_c(W_{jk}) = (H_c)_{jj}\,a_k^2`, :math:`w_c(b_j) = (H_c)_{jj}`; ``nn.Conv1d/2d/3d`` (and
Linear over extra axes) contract :math:`H_c` with the layer's own Jacobian
:math:`\partial z/\partial\theta` (``torch.func.jacrev`` of the layer alone).

Refused, with the module's path and type: modules with parameters other than Linear/Conv (their
output is not linear in their parameters, or not in the form used here), a parameter shared by two
modules, a parametrised module called other than once per forward, and parameters owned by a
container module.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacfwd, jacrev, vmap

from .._errors import unsupported_layer

__all__ = ["SecondDerivatives", "dense_layers", "perturbed"]

_LINEAR_IN_PARAMS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FIX = ("The exact Î2/V2 route covers networks of Linear/Conv1-3d layers with parameter-free "
        "modules between them (activations, pooling, flatten); use estimator='i1' or 'exact', "
        "which need first derivatives only")


def perturbed(model, params, buffers, module, x, *, hessian: bool):
    """Layer inputs a (n, *in), J = ∂h/∂z (n, C, *z) and (if asked) H = ∂²h/∂z² (n, C, *z, *z).

    A forward hook adds a perturbation δ (zero) to the module's output; derivatives in δ at 0
    are the derivatives in the layer output z.
    """
    state = {}
    params = {k: p.detach() for k, p in params.items()}    # derivatives in δ only

    def hook(mod, inputs, output):
        state["a"] = inputs[0]
        return output + state["delta"].unsqueeze(0) if "delta" in state else output

    def h_of_delta(delta, xi):
        state["delta"] = delta
        try:
            return functional_call(model, (params, buffers), (xi.unsqueeze(0),)).squeeze(0)
        finally:
            del state["delta"]

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
            a = state.pop("a").detach()
            zero = torch.zeros(module(a[:1]).shape[1:], dtype=x.dtype, device=x.device)
        jac = vmap(jacrev(h_of_delta), in_dims=(None, 0))(zero, x).detach()
        hess = None
        if hessian:
            hess = vmap(jacfwd(jacrev(h_of_delta)), in_dims=(None, 0))(zero, x).detach()
    finally:
        handle.remove()
    return a, jac, hess


def dense_layers(model: nn.Module, params: dict[str, torch.Tensor], probe: torch.Tensor):
    """``{name: nn.Linear}`` when every trainable parameter is the weight or bias of an
    ``nn.Linear`` called once per forward on (N, features) inputs (an MLP), else None."""
    layers = {}
    covered = set()
    for name, module in model.named_modules():
        own = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        if type(module) is not nn.Linear:
            return None
        layers[name] = module
        covered |= {f"{name}.{n}" if name else n for n in own}
    if covered != set(params):
        return None
    seen: dict[str, list] = {name: [] for name in layers}
    handles = [m.register_forward_hook(lambda mod, i, o, n=name: seen[n].append(i[0].dim()))
               for name, m in layers.items()]
    try:
        with torch.no_grad():
            model(probe[:1])
    finally:
        for h in handles:
            h.remove()
    return layers if all(v == [2] for v in seen.values()) else None


class SecondDerivatives:
    """Plan the per-layer second-derivative computation of ``model``; refuse what it cannot do."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], probe: torch.Tensor):
        self.model, self.params, self.buffers = model, params, buffers
        owners: dict[int, str] = {}
        self.layers: dict[str, nn.Module] = {}
        for mname, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False, remove_duplicate=False)
                   if p.requires_grad]
            if not own:
                continue
            if type(module) not in _LINEAR_IN_PARAMS:
                raise unsupported_layer(mname, type(module).__name__,
                                        "Î2 and V2 need ∂²h/∂θ² of its parameters, which this "
                                        "route computes only for Linear and Conv1d/2d/3d", _FIX)
            for n, p in own:
                if id(p) in owners:
                    raise unsupported_layer(mname, type(module).__name__,
                                            f"parameter {n!r} is shared with {owners[id(p)]!r}",
                                            _FIX)
                owners[id(p)] = f"{mname}.{n}"
            self.layers[mname] = module
        self._count_calls(probe)

    def _count_calls(self, probe):
        calls = {name: 0 for name in self.layers}
        handles = [m.register_forward_hook(lambda mod, i, o, n=name: calls.__setitem__(n, calls[n] + 1))
                   for name, m in self.layers.items()]
        try:
            with torch.no_grad():
                self.model(probe[:1])
        finally:
            for h in handles:
                h.remove()
        for name, count in calls.items():
            if count != 1:
                module = self.layers[name]
                raise unsupported_layer(name, type(module).__name__,
                                        f"it runs {count} times in one forward (its input would "
                                        "depend on its own parameters, or it is unused)", _FIX)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{parameter name: (n, C, *shape)}`` second derivatives for a chunk of inputs x."""
        out = {}
        for name, module in self.layers.items():
            a, _, hess = perturbed(self.model, self.params, self.buffers, module, x, hessian=True)
            out.update(self._contract(name, module, a, hess))
        return out

    def _contract(self, name, module, a, hess):
        n, c = hess.shape[:2]
        local = dict(module.named_parameters(recurse=False))
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear) and a.dim() == 2:
            o = module.out_features
            diag = hess.reshape(n, c, o, o).diagonal(dim1=2, dim2=3)          # (n, C, O)
            res = {prefix + "weight": diag[:, :, :, None] * (a * a)[:, None, None, :]}
            if "bias" in local:
                res[prefix + "bias"] = diag
            return {k: v for k, v in res.items() if k in self.params}

        def layer(p, ai):
            return functional_call(module, p, (ai.unsqueeze(0),)).squeeze(0)

        jac = vmap(jacrev(layer), in_dims=(None, 0))(dict(local), a)         # {p: (n, *z, *shape)}
        t = hess[0, 0].numel() ** 0.5
        t = int(round(t))
        h = hess.reshape(n, c, t, t)
        res = {}
        for pname, j in jac.items():
            full = prefix + pname
            if full not in self.params:
                continue
            jf = j.detach().reshape(n, t, -1)                                   # (n, T, K)
            w = torch.einsum("ntk,nctu,nuk->nck", jf, h, jf)
            res[full] = w.reshape(n, c, *local[pname].shape)
        return res
