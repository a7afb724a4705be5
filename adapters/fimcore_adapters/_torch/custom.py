"""User-written layer rules: :class:`LayerRule` and :func:`register_layer_rule`.

A :class:`LayerRule` knows one module type's forward well enough to capture, during the ordinary
forward pass, the tensors its per-sample gradients are made of (typically the module input ``a``
and its output, whose loss gradient ``δ`` the ordinary backward provides), and turns them into
the per-sample gradient blocks of the module's own parameters. The recorder then adds the
module's share ``J_l J_lᵀ`` of ``G = J Jᵀ`` (J_l: the B rows of those blocks, flattened).

Row i of J_l must be B × sample i's contribution to the gradient of the batch loss for a mean
loss: for a module without cross-sample coupling, the gradient of sample i's own loss ℓ_i, which
is what a rule computes from sample i's slice of the captured tensors and of ``δ`` (the ordinary
batch backward already carries the 1/B of a mean loss, and the recorder rescales by B²).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .._rules import registration
from .registry import Unit, override_forward, register_unit, registered_unit

__all__ = ["LayerRule", "register_layer_rule"]


class LayerRule:
    """How one module type contributes to the Gram matrix.

    Subclasses implement :meth:`forward` and :meth:`per_sample`; :meth:`parameters` defaults to
    the module's own trainable parameters.
    """

    #: name shown in ``GramRecorder.report()``
    name = "rule"

    def supports(self, module: nn.Module) -> bool:
        """Whether this rule is exact for ``module`` (else the generic path is taken)."""
        return True

    def parameters(self, module: nn.Module) -> list:
        """The parameters of ``module`` this rule covers, in a fixed order (default: the module's
        own trainable parameters, not those of its submodules)."""
        return [p for p in module.parameters(recurse=False) if p.requires_grad]

    def forward(self, module: nn.Module, call: Callable, args: tuple, kwargs: dict):
        """Run the module (``call(*args, **kwargs)`` is its own forward); return
        ``(output, capture)``.

        ``capture`` is a dict whose ``"watch"`` entry lists the tensors whose loss gradient
        :meth:`per_sample` needs (each must reach the loss); return ``capture=None`` for a call
        that contributes nothing.
        """
        raise NotImplementedError

    def per_sample(self, module: nn.Module, capture: dict, deltas: list) -> list:
        """Per-sample gradient blocks, shape (B, *p.shape), one per :meth:`parameters` entry.

        ``deltas[k]`` is the loss gradient of ``capture["watch"][k]`` in the ordinary backward.
        """
        raise NotImplementedError


class _RuleUnit(Unit):
    """Drives a user's :class:`LayerRule` inside a recorder step."""

    kind = "user"

    def __init__(self, name, module, params, selected_ids, strategy, rule: LayerRule):
        own = {id(p): n for n, p in params}
        covered = rule.parameters(module)
        stray = [p for p in covered if id(p) not in own]
        if stray:
            raise ValueError(
                f"layer rule {rule.name!r} for {type(module).__name__} lists a parameter that is not "
                f"a trainable parameter of the module itself (shape {tuple(stray[0].shape)}); "
                "parameters() must return parameters registered on the module, not on its submodules")
        left = [n for n, p in params if id(p) in selected_ids and id(p) not in {id(q) for q in covered}]
        if left:
            raise ValueError(
                f"layer rule {rule.name!r} for {type(module).__name__} does not cover its selected "
                f"parameters {left}; return them from parameters() (with their per-sample blocks), "
                "or leave them out of G with GramRecorder(..., params=...)")
        super().__init__(name, module, [(own[id(p)], p) for p in covered], selected_ids, strategy)
        self.rule = rule

    def install(self, rec):
        self.rec = rec
        m = self.module
        call = m.forward

        def forward(*args, **kwargs):
            x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if x is None or x.dim() == 0:
                raise ValueError(
                    f"layer rule {self.rule.name!r} for {_where(self)} needs a batched tensor "
                    "argument (batch in dim 0); received none")
            dtype = self.params[0][1].dtype if self.params else x.dtype
            rec._forward(self, x.shape[0], dtype)
            try:
                out, capture = self.rule.forward(m, call, args, kwargs)
            finally:
                rec._forward_done(self)
            if capture is not None and rec._active and torch.is_grad_enabled():
                self._watch(capture, x.shape[0])
            return out

        return [override_forward(m, forward)]

    def _watch(self, capture: dict, batch: int) -> None:
        watch = list(capture.get("watch", ()))
        if not watch or not all(isinstance(t, torch.Tensor) and t.requires_grad for t in watch):
            raise ValueError(
                f"layer rule {self.rule.name!r} for {_where(self)}: capture['watch'] must list the "
                "tensors (requiring grad, e.g. the output) whose loss gradient per_sample needs; "
                f"received {[type(t).__name__ for t in watch]}")
        got: list = [None] * len(watch)

        def hook(k):
            def receive(g):
                got[k] = g
                if all(d is not None for d in got):
                    deltas = list(got)
                    got[:] = [None] * len(watch)
                    self._grad(capture, deltas, batch)
                return None
            return receive

        for k, t in enumerate(watch):
            t.register_hook(hook(k))

    def _grad(self, capture, deltas, batch) -> None:
        rec = self.rec
        rec._backward(self)
        m = self.module
        with torch.no_grad():
            blocks = list(self.rule.per_sample(m, capture, deltas))
            if len(blocks) != len(self.params):
                raise ValueError(
                    f"layer rule {self.rule.name!r} for {_where(self)} returned {len(blocks)} "
                    f"per-sample blocks; it covers {len(self.params)} parameters, so per_sample must "
                    "return one (B, *p.shape) block per parameters() entry")
            rows = []
            for (pname, p), J in zip(self.params, blocks):
                if not isinstance(J, torch.Tensor) or tuple(J.shape) != (batch, *p.shape):
                    shape = tuple(J.shape) if isinstance(J, torch.Tensor) else type(J).__name__
                    raise ValueError(
                        f"layer rule {self.rule.name!r} for {_where(self)}: the per-sample block of "
                        f"{pname!r} must have shape (B, *p.shape) = {(batch, *p.shape)}; "
                        f"received {shape}")
                if self.is_selected(p):
                    rows.append((p, J.reshape(batch, -1)))
            n = sum(J.shape[1] for _, J in rows)
            self.set_path("materialize", f"{self.rule.name} rule (registered): per-sample "
                                         f"gradients B×{n}")
            rec._add_rows(self, rows)


class _RuleFactory:
    """The registry entry of a user rule: builds its unit, answers ``supports``."""

    def __init__(self, rule: LayerRule):
        self.rule = rule

    def supports(self, module: nn.Module) -> bool:
        return bool(self.rule.supports(module))

    def __call__(self, name, module, params, selected_ids, strategy) -> _RuleUnit:
        return _RuleUnit(name, module, params, selected_ids, strategy, self.rule)


def register_layer_rule(module_type: type, rule: LayerRule | None = None, *,
                        override: bool = False):
    """Register ``rule`` for ``module_type`` (usable as a class decorator on the rule).

    The rule applies to ``module_type`` and to subclasses that do not override ``forward``.
    Registering a type that already has a rule (one of the built-in types, or one registered
    before) raises unless ``override=True``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from fimcore_adapters.torch import GramRecorder, LayerRule, register_layer_rule
        >>> class Scale(nn.Module):
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.ones(d, dtype=torch.float64))
        ...     def forward(self, x):
        ...         return x * self.w
        >>> @register_layer_rule(Scale)
        ... class ScaleRule(LayerRule):
        ...     name = "scale"
        ...     def forward(self, module, call, args, kwargs):
        ...         y = call(*args, **kwargs)
        ...         return y, {"x": args[0], "watch": [y]}
        ...     def per_sample(self, module, capture, deltas):
        ...         return [capture["x"] * deltas[0]]     # dℓ_i/dw = x_i ⊙ δ_i
        >>> model = Scale(3)
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> with GramRecorder(model, loss_reduction="sum") as rec:
        ...     model(x).pow(2).sum().backward()
        >>> J = 2 * x * x                                 # ℓ_i = Σ (x_i w)², at w = 1
        >>> bool(torch.allclose(rec.gram(), J @ J.T)), rec.report()[0].reason.split()[0]
        (True, 'scale')
    """
    def store(instance):
        existing = registered_unit(module_type)
        if existing is not None and not override:
            what = (f"the rule {existing.rule.name!r}" if isinstance(existing, _RuleFactory)
                    else "a built-in rule")
            raise ValueError(
                f"{module_type.__name__} already has {what}; pass override=True to replace it")
        register_unit(module_type, _RuleFactory(instance))

    return registration(module_type, rule, override=override, owner_base=nn.Module,
                        owner_kind="module", base_name="torch.nn.Module", rule_base=LayerRule,
                        framework="torch", store=store)


def _where(unit) -> str:
    return f"layer {unit.name or '<model>'!r} ({type(unit.module).__name__})"
