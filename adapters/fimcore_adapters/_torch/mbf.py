r"""``MBF``: the Mini-Block Fisher method as a ``torch.optim.Optimizer``.

Bahamou, Goldfarb & Ren, AISTATS 2023 (arXiv 2202.04124). The algorithm, partition and
defaults are documented in :mod:`fimcore.mbf`; this file holds the PyTorch state, the batched
Cholesky factorisations (``torch.linalg.cholesky_ex`` / ``cholesky_solve``, never an explicit
inverse) and the hooks of ``curvature="per_sample"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fimcore.mbf import MBFOptions, ema

from .mbf_units import (Unit, conv_padding, discover_units, install_capture, minibatch_estimate,
                        per_sample_estimate, split_rows, unit_rows)

__all__ = ["MBF", "MBFLayerRecord", "MBFReport", "sampled_label_loss"]

_GROUP_KEYS = ("lr", "damping", "momentum", "weight_decay", "eps")
_BLOCK_KINDS = ("dense", "dense_averaged", "conv", "conv_averaged")


@dataclass(frozen=True)
class MBFLayerRecord:
    """One line of :meth:`MBF.report`: a unit, how it is preconditioned and what it stores."""

    name: str
    module: str
    kind: str
    block_size: int
    num_blocks: int
    stored_entries: int
    reason: str


class MBFReport(list):
    """The :class:`MBFLayerRecord` list; ``str()`` is a table, ``diagonal`` the Adam-like names."""

    @property
    def diagonal(self) -> list[str]:
        return [r.name for r in self if r.kind == "diagonal"]

    def __str__(self) -> str:
        lines = [f"{'unit':30s} {'module':14s} {'kind':15s} {'block':>6s} {'blocks':>8s} {'stored':>10s}"]
        for r in self:
            lines.append(f"{r.name:30s} {r.module:14s} {r.kind:15s} {r.block_size:6d} "
                         f"{r.num_blocks:8d} {r.stored_entries:10d}" + (f"  ({r.reason})" if r.reason else ""))
        return "\n".join(lines)


def sampled_label_loss(outputs: torch.Tensor, family: str = "categorical", *,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Mean negative log-likelihood at labels drawn from the model's own predictive distribution.

    The ``curvature_loss`` of ``curvature="sampled_labels"`` (MBF-True): its gradient is
    :math:`\bar g` with :math:`\hat y_n \sim p(\cdot\mid x_n;\theta)`, one label per input.

    Args:
        outputs: logits (``"categorical"``: (m, C); ``"bernoulli"``: any shape, sigmoid
            outputs) or means (``"gaussian"``, unit variance).
        family: ``"categorical"``, ``"bernoulli"`` or ``"gaussian"``.
        generator: random generator for the draws.

    Raises:
        ValueError: unknown family.
    """
    with torch.no_grad():
        if family == "categorical":
            y = torch.multinomial(torch.softmax(outputs.reshape(-1, outputs.shape[-1]), -1), 1,
                                  generator=generator).reshape(outputs.shape[:-1])
        elif family == "bernoulli":
            y = torch.bernoulli(torch.sigmoid(outputs), generator=generator)
        elif family == "gaussian":
            y = outputs + torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype,
                                      device=outputs.device)
        else:
            raise ValueError(f"family must be 'categorical', 'bernoulli' or 'gaussian'; received {family!r}.")
    if family == "categorical":
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), y.reshape(-1))
    if family == "bernoulli":
        return F.binary_cross_entropy_with_logits(outputs, y, reduction="sum") / outputs.shape[0]
    return 0.5 * ((outputs - y) ** 2).sum() / outputs.shape[0]


class MBF(torch.optim.Optimizer):
    r"""Mini-Block Fisher preconditioned SGD (Bahamou, Goldfarb & Ren, AISTATS 2023).

    Per iteration t, with ḡ the mini-batch gradient (mean loss, no weight decay inside):
    :math:`\mu \leftarrow \beta_1\mu + \bar g`; every T1 iterations
    :math:`\bar F_j \leftarrow \beta_2\bar F_j + (1-\beta_2)\hat F_j`; every T2 iterations the
    Cholesky factor of :math:`\bar F_j + \lambda I`; then :math:`p_j = (\bar F_j+\lambda I)^{-1}\mu_j`
    on the mini-blocks, :math:`\mu/(\sqrt v+\epsilon)` elsewhere, :math:`p \leftarrow p + \gamma\theta`,
    :math:`\theta \leftarrow \theta - \alpha p`. Mini-blocks: ``nn.Linear`` one (d_in+1) block per
    output neuron (one shared averaged block above ``average_above`` entries
    :math:`d_{out}(d_{in}+1)^2`); ``nn.Conv1d/2d/3d`` one κ×κ block per (output, input-within-group)
    channel pair, size-1 blocks :math:`\mu_b/(\bar F_b+\lambda)` for its bias; everything else
    (norm layers, embeddings, unsupported modules) Adam-like, listed in :meth:`report`.

    Args:
        model: the network; its ``nn.Linear``/convolution modules define the blocks.
        lr: learning rate α.
        damping: λ (> 0). The paper's CNN default 0.003 is tuned for ``"minibatch_outer"``.
        momentum: β1, undamped (μ ← β1 μ + ḡ).
        curvature_decay: β2 of the curvature EMA.
        weight_decay: γ, decoupled.
        curvature_every: T1. inverse_every: T2 (≥ T1).
        curvature: ``"minibatch_outer"`` (ḡ_j ḡ_jᵀ), ``"per_sample"`` (exact empirical-Fisher
            blocks from hooked layer inputs and output gradients; other parameters use ḡ²) or
            ``"sampled_labels"`` (pass ``curvature_loss`` to :meth:`step`, e.g.
            :func:`sampled_label_loss`, after ``loss.backward(retain_graph=True)``).
        average_above: spatial-averaging threshold in block entries (``math.inf``: never).
        eps: ε of the Adam-like direction.
        conv_average: one averaged κ×κ block per convolution (MBF-CNN-Avg).
        params: ``None`` (all trainable parameters of ``model``), an iterable of tensors, or
            parameter-group dicts overriding ``lr``, ``damping``, ``momentum``, ``weight_decay``
            or ``eps``; a layer's weight and bias must share a group.
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces over the batch (scales
            the per-sample gradients of ``"per_sample"``).
        on_nonfinite: ``"raise"`` (default) or ``"skip"``: a non-finite gradient, curvature
            estimate or direction leaves parameters and state unchanged and is counted in
            ``skipped_steps``.

    Raises:
        ValueError: an option out of range, no trainable Linear/Conv weight, or a layer split
            across parameter groups.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 1))
        >>> opt = MBF(model, lr=0.1, curvature_every=1, inverse_every=1)
        >>> [r.kind for r in opt.report()]
        ['dense', 'dense', 'diagonal', 'diagonal']
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> for _ in range(3):
        ...     opt.zero_grad(); nn.functional.mse_loss(model(x), y).backward(); opt.step()
        >>> opt.state_dict()["mbf"]["step"]
        3
    """

    def __init__(self, model: nn.Module, lr: float, *, damping: float = 0.003,
                 momentum: float = 0.9, curvature_decay: float = 0.9, weight_decay: float = 0.0,
                 curvature_every: int = 10, inverse_every: int = 100,
                 curvature: str = "minibatch_outer", average_above: float = 2 ** 24,
                 eps: float = 1e-8, conv_average: bool = False, params=None,
                 loss_reduction: str = "mean", on_nonfinite: str = "raise") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; received {type(model).__name__}.")
        self.options = MBFOptions(lr=lr, damping=damping, momentum=momentum,
                                  curvature_decay=curvature_decay, weight_decay=weight_decay,
                                  curvature_every=curvature_every, inverse_every=inverse_every,
                                  curvature=curvature, average_above=average_above, eps=eps,
                                  conv_average=conv_average)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum'; received {loss_reduction!r}.")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip'; received {on_nonfinite!r}.")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay, eps=eps)
        super().__init__(params, defaults)
        for g in self.param_groups:        # validate per-group overrides with the same rules
            MBFOptions(**{**self.options.to_dict(), **{k: g[k] for k in _GROUP_KEYS}})
        self.model = model
        self.loss_reduction = loss_reduction
        self.on_nonfinite = on_nonfinite
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._units = discover_units(model, set(group_of), average_above=average_above,
                                     conv_average=conv_average)
        self._group = {}
        for u in self._units:
            gs = {group_of[id(p)] for p in u.params}
            if len(gs) != 1:
                raise ValueError(f"the weight and bias of {u.name!r} must be in the same parameter "
                                 f"group (they share mini-blocks); received groups {sorted(gs)}.")
            self._group[u.name] = self.param_groups[gs.pop()]
        self._t = 0
        self.skipped_steps = 0
        self.warm_started = False
        self._capturing = False
        self._handles = []
        if curvature == "per_sample":
            for u in self._units:
                if u.kind in ("conv", "conv_averaged"):
                    conv_padding(u.module)                # refuse unsupported padding now
                if u.kind != "diagonal":
                    self._handles.append(install_capture(u, self._wants_capture))

    # ------------------------------------------------------------------------------ public
    @property
    def needs_curvature(self) -> bool:
        """True when the next :meth:`step` refreshes the curvature (t mod T1 = 0)."""
        return self._t % self.options.curvature_every == 0

    def report(self) -> MBFReport:
        """How every optimised parameter is preconditioned (Adam-like ones included)."""
        return MBFReport(MBFLayerRecord(u.name, type(u.module).__name__ if u.module is not None else "-",
                                        u.kind, u.layout.block_size, u.layout.num_blocks,
                                        u.layout.stored_entries, u.reason) for u in self._units)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for u in self._units:
            u.captures.clear()

    def state_dict(self):
        sd = super().state_dict()
        sd["mbf"] = {"step": self._t, "skipped_steps": self.skipped_steps,
                     "warm_started": self.warm_started}
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("mbf", None)
        if extra is None:
            raise ValueError("state_dict has no 'mbf' entry; load a dict made by MBF.state_dict().")
        super().load_state_dict(state_dict)
        self._t = int(extra["step"])
        self.skipped_steps = int(extra["skipped_steps"])
        self.warm_started = bool(extra["warm_started"])

    @torch.no_grad()
    def warm_start(self, batches, loss_fn, *, curvature_loss_fn=None) -> int:
        """One pass over ``batches``: F̄ and v := arithmetic mean of the per-batch estimates.

        Args:
            batches: iterable of ``(inputs, targets)``.
            loss_fn: ``loss_fn(model(inputs), targets)`` → scalar loss.
            curvature_loss_fn: for ``"sampled_labels"``, ``curvature_loss_fn(outputs)`` → the
                sampled-label loss (default :func:`sampled_label_loss` with ``"categorical"``).

        Returns:
            The number of batches used. Parameters and momentum are not changed; ``.grad`` is
            cleared.

        Raises:
            ValueError: ``batches`` is empty; FloatingPointError: a non-finite estimate.
        """
        sums, count = {}, 0
        self._capturing = True
        try:
            for inputs, targets in batches:
                self.zero_grad()
                with torch.enable_grad():
                    out = self.model(inputs)
                    if self.options.curvature == "sampled_labels":
                        fn = curvature_loss_fn or sampled_label_loss
                        fn(out).backward()
                    else:
                        loss_fn(out, targets).backward()
                grads = {id(p): p.grad for p in self._all_params() if p.grad is not None}
                est = self._estimates(grads, grads)
                self._check_finite(est, f"warm-start batch {count}", raise_anyway=True)
                for k, v in est.items():
                    sums[k] = v.clone() if k not in sums else sums[k].add_(v)
                count += 1
                for u in self._units:
                    u.captures.clear()
        finally:
            self._capturing = False
            self.zero_grad()
        if count == 0:
            raise ValueError("warm_start needs at least one batch; received an empty iterable.")
        for u in self._units:
            if u.name in sums:
                self.state[u.key]["curvature"] = sums[u.name] / count
                self._factor(u)
        self.warm_started = True
        return count

    @torch.no_grad()
    def step(self, closure=None, *, curvature_loss=None):
        """One MBF iteration; returns ``closure()`` if given.

        Args:
            closure: re-evaluates the model and returns the loss (as for other optimisers).
            curvature_loss: ``"sampled_labels"`` only, on refreshing steps
                (:attr:`needs_curvature`): the sampled-label loss tensor on a live graph, or a
                zero-argument callable returning it.

        Raises:
            FloatingPointError: non-finite gradient/curvature/direction with ``on_nonfinite="raise"``.
            ValueError: ``"sampled_labels"`` on a refreshing step without ``curvature_loss``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        o = self.options
        t = self._t
        refresh = t % o.curvature_every == 0
        grads = {id(p): p.grad for p in self._all_params() if p.grad is not None}
        if not self._check_finite({f"gradient of {u.name}": grads[id(p)] for u in self._units
                                   for p in u.params if id(p) in grads}, f"step {t}"):
            return loss
        est = {}
        if refresh:
            cgrads = grads
            if o.curvature == "sampled_labels":
                cgrads = self._sampled_grads(curvature_loss)
            est = self._estimates(grads, cgrads)
            if not self._check_finite(est, f"step {t} (curvature)"):
                return loss
        # directions are computed from new state copies so a skip leaves everything unchanged
        new_state, updates = {}, {}
        for u in self._units:
            if not any(id(p) in grads for p in u.params):
                continue
            st = self.state[u.key]
            g = self._group[u.name]
            rows = unit_rows(u, grads)
            mu = rows.clone() if "momentum_buffer" not in st else st["momentum_buffer"] * g["momentum"] + rows
            curv = st.get("curvature")
            if u.name in est:
                curv = est[u.name] * (1.0 - o.curvature_decay) if curv is None \
                    else ema(curv, est[u.name], o.curvature_decay)
            if curv is None:     # no refresh yet (first step not a multiple of T1): zero curvature
                curv = torch.zeros_like(minibatch_estimate(u, rows))
            factor = st.get("factor")
            if factor is None or t % o.inverse_every == 0:
                factor = self._factor_of(u, curv, g["damping"])
            p = self._direction(u, mu, curv, factor, g["eps"])
            new_state[u.name] = (mu, curv, factor)
            updates[u.name] = p
        if not self._check_finite({f"direction of {k}": v for k, v in updates.items()}, f"step {t}"):
            return loss
        for u in self._units:
            if u.name not in updates:
                continue
            st = self.state[u.key]
            st["momentum_buffer"], st["curvature"], st["factor"] = new_state[u.name]
            g = self._group[u.name]
            for pid, d in split_rows(u, updates[u.name]).items():
                param = next(q for q in u.params if id(q) == pid)
                if id(param) not in grads:
                    continue
                if g["weight_decay"]:
                    d = d + g["weight_decay"] * param
                param.sub_(g["lr"] * d)
        self._t += 1
        for u in self._units:
            u.captures.clear()
        return loss

    # ----------------------------------------------------------------------------- private
    def _wants_capture(self) -> bool:
        return self._capturing or self.needs_curvature

    def _all_params(self):
        return [p for u in self._units for p in u.params]

    def _estimates(self, grads, cgrads) -> dict[str, torch.Tensor]:
        out = {}
        for u in self._units:
            if not any(id(p) in grads for p in u.params):
                continue
            if self.options.curvature == "per_sample" and u.kind != "diagonal":
                out[u.name] = per_sample_estimate(u, loss_reduction=self.loss_reduction)
            else:
                out[u.name] = minibatch_estimate(u, unit_rows(u, cgrads))
        return out

    def _sampled_grads(self, curvature_loss):
        if curvature_loss is None:
            raise ValueError("curvature='sampled_labels' needs step(curvature_loss=...) on refreshing "
                             f"steps (t mod curvature_every == 0, now t = {self._t}): pass the loss "
                             "at labels sampled from the model, e.g. sampled_label_loss(outputs), "
                             "after loss.backward(retain_graph=True).")
        params = self._all_params()
        with torch.enable_grad():
            value = curvature_loss() if callable(curvature_loss) else curvature_loss
            gs = torch.autograd.grad(value, params, allow_unused=True)
        return {id(p): g for p, g in zip(params, gs) if g is not None}

    def _check_finite(self, tensors: dict, where: str, raise_anyway: bool = False) -> bool:
        # one reduction per tensor: a NaN or inf makes the sum non-finite; a sum that overflows
        # from finite entries is re-checked entry by entry, so the test is exact
        bad = [k for k, v in tensors.items()
               if not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all())]
        if not bad:
            return True
        if self.on_nonfinite == "skip" and not raise_anyway:
            self.skipped_steps += 1
            for u in self._units:
                u.captures.clear()
            return False
        raise FloatingPointError(
            f"MBF needs finite gradients and curvature; at {where} non-finite values in "
            f"{', '.join(map(str, bad[:5]))}{' …' if len(bad) > 5 else ''}. Lower the learning rate, "
            "check the loss, or pass on_nonfinite='skip' to skip such steps.")

    def _factor(self, u: Unit) -> None:
        st = self.state[u.key]
        st["factor"] = self._factor_of(u, st["curvature"], self._group[u.name]["damping"])

    def _factor_of(self, u: Unit, curv: torch.Tensor, damping: float) -> torch.Tensor:
        if u.kind == "diagonal":
            return curv.new_zeros(())       # Adam-like: v is used directly
        if u.kind == "conv_bias":
            return curv + damping
        k = curv.shape[-1]
        eye = torch.eye(k, dtype=curv.dtype, device=curv.device)
        L, info = torch.linalg.cholesky_ex(0.5 * (curv + curv.mT) + damping * eye)
        if bool((info != 0).any()):
            raise FloatingPointError(
                f"the damped mini-blocks of {u.name!r} are not numerically positive definite "
                f"(F̄ + λI with λ = {damping:g}, largest |F̄| entry {float(curv.abs().max()):.3g}, "
                f"{curv.dtype}); raise damping or train in float64.")
        return L

    @staticmethod
    def _direction(u: Unit, mu, curv, factor, eps):
        if u.kind == "diagonal":
            return mu / (curv.sqrt() + eps)
        if u.kind == "conv_bias":
            return mu / factor
        if u.kind in ("dense", "conv"):
            return torch.cholesky_solve(mu.unsqueeze(-1), factor).squeeze(-1)
        k = mu.shape[-1]                                   # averaged: one shared factor
        flat = mu.reshape(-1, k)
        return torch.cholesky_solve(flat.T, factor).T.reshape(mu.shape)
