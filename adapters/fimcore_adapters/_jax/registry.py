"""User-written Flax layer rules: :class:`LayerRule` and :func:`register_layer_rule`.

A :class:`LayerRule` knows one ``flax.linen`` module type's ``__call__`` well enough to capture,
during the one batch forward of :class:`FlaxGram`, the arrays its per-sample gradients are made of
(typically the module input ``a``), and turns them and the cotangent ``δ`` of the batch loss at
the module's output into the per-sample gradient blocks of the module's own parameters. The
module's share of ``G = J Jᵀ`` is then ``J_l J_lᵀ`` (J_l: those blocks, flattened per sample),
and the batch gradients of its parameters are the blocks summed over the batch.

Row i of J_l is B × sample i's contribution to the gradient of the batch-mean loss (for a module
without cross-sample coupling, the gradient of sample i's own loss ℓ_i): a rule computes it from
sample i's slice of the captured arrays and of δ (which already carries the 1/B of the mean; the
Gram is rescaled by B²).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

from .._rules import nearest_rule, registration

__all__ = ["LayerRule", "register_layer_rule", "rule_for"]

# the types FlaxGram has its own exact rules for (overridable with override=True)
_BUILT_IN = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.LayerNorm, nn.GroupNorm,
             nn.BatchNorm, nn.RMSNorm, nn.InstanceNorm)

_RULES: dict[type, "LayerRule"] = {}


class LayerRule:
    """How one Flax module type contributes to the Gram.

    Subclasses implement :meth:`forward` and :meth:`per_sample`.
    """

    #: name shown in ``FlaxGram.report()``
    name = "rule"

    def supports(self, module: nn.Module) -> bool:
        """Whether this rule is exact for ``module`` (else the exact re-run fallback is taken)."""
        return True

    def forward(self, module: nn.Module, call: Callable, args: tuple, kwargs: dict):
        """Run the module (``call(*args, **kwargs)`` is its own ``__call__``); return
        ``(output, capture)``.

        ``output`` must be one array with the batch on its leading axis; ``capture`` is any pytree
        of arrays :meth:`per_sample` needs (e.g. ``{"x": args[0]}``). The loss cotangent δ of
        ``output`` is what :meth:`per_sample` receives as ``deltas[0]``.
        """
        raise NotImplementedError

    def per_sample(self, module: nn.Module, capture, deltas: list) -> dict:
        """Per-sample gradients ``{parameter name: (B, *shape)}``, one entry for every parameter
        the module owns directly (its ``module.variables["params"]`` leaves, read here)."""
        raise NotImplementedError


def register_layer_rule(module_type: type, rule: LayerRule | None = None, *,
                        override: bool = False):
    """Register ``rule`` for the ``flax.linen`` module type ``module_type`` (usable as a class
    decorator on the rule).

    The rule applies to ``module_type`` and to subclasses that do not override ``__call__``, for
    calls through ``__call__``. Registering a type that already has a rule (a layer FlaxGram
    handles itself, or one registered before) raises unless ``override=True``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from fimcore_adapters.jax import FlaxGram, LayerRule, register_layer_rule
        >>> class Scale(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return x * self.param("w", nn.initializers.ones, (x.shape[-1],))
        >>> @register_layer_rule(Scale)
        ... class ScaleRule(LayerRule):
        ...     name = "scale"
        ...     def forward(self, module, call, args, kwargs):
        ...         return call(*args, **kwargs), {"x": args[0]}
        ...     def per_sample(self, module, capture, deltas):
        ...         return {"w": capture["x"] * deltas[0]}     # dℓ_i/dw = x_i ⊙ δ_i
        >>> x = jnp.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
        >>> step = FlaxGram(Scale(), lambda out: jnp.sum(out ** 2, axis=1))
        >>> loss, grad, gram = step(Scale().init(jax.random.PRNGKey(0), x), x)
        >>> J = 2 * x * x                                      # ℓ_i = Σ (x_i w)², at w = 1
        >>> bool(jnp.allclose(gram, J @ J.T)), step.report()[0].reason.split()[0]
        (True, 'scale')
    """
    def store(instance):
        if not override and module_type in _RULES:
            raise ValueError(f"{module_type.__name__} already has the rule "
                             f"{_RULES[module_type].name!r}; pass override=True to replace it")
        if not override and module_type in _BUILT_IN:
            raise ValueError(f"{module_type.__name__} already has a built-in rule; pass "
                             "override=True to replace it")
        _RULES[module_type] = instance

    return registration(module_type, rule, override=override, owner_base=nn.Module,
                        owner_kind="module", base_name="flax.linen.Module", rule_base=LayerRule,
                        framework="jax", store=store)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The registered rule that applies exactly to ``module``, or None."""
    return nearest_rule(_RULES, module, "__call__")
