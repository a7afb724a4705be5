"""Layer-factored Gram for ``flax.linen`` models: ``FlaxGram`` and its functional forms."""

from __future__ import annotations

from collections import defaultdict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fimcore.layers import LayerRecord, PerLayerSink, check_strategy

from .._compat import LegacyReportDict, deprecated
from ._checks import (accumulation_dtype, batch_size, check_finite_if_concrete, check_params,
                      gradient_dtype)
from .capture import Recorder
from .cost import choose_dense_form, choose_embed_form
from .dense import budget_chunk, chunked_gram, dense_block, materialised_block
from .embedding import embed_block
from .rows import call_rows, dense_operands, per_sample
from .report import StepInfo
from .sharding import grouped_conv_in, mesh_of, replicate, warn_replicated

#: ``strategy`` value -> the dense/embedding form it forces
_FORMS = {"auto": "auto", "factored": "factored", "materialize": "materialised"}

__all__ = ["FlaxGram", "flax_per_sample_gram", "flax_value_grad_and_gram"]


class FlaxGram:
    """One training step's mean loss, mean gradient and per-sample Gram for a Flax model.

    ``FlaxGram(model, loss_fn)(variables, inputs, *targets)`` runs ONE batch forward and
    backward of ``model.apply(variables, inputs)``, capturing each recognised layer's input
    and output cotangent, and returns ``(mean_loss, mean_grad, gram)``:

    - ``loss_fn(outputs, *targets)`` returns the per-example losses (shape (B,));
      ``mean_loss`` is their mean (the batch loss ``L``);
    - ``mean_grad = ∇ L`` with respect to ``variables["params"]`` (same pytree), for the step;
    - ``gram = J Jᵀ`` (B×B), rows ``J_i = B ×`` sample i's contribution to ``∇ L``
      (``1ᵀ G 1 = B²·‖∇L‖²``; without cross-sample layers ``J_i = ∇ ℓ_i``).

    Per layer, the cheaper of two exact forms: ``Dense``/``DenseGeneral`` use the factored form
    ``G_ij = Σ_{t,s}(a_it·a_js)(g_it·g_js)`` (``(A Aᵀ)⊙(Gₒ Gₒᵀ)`` for T = 1) or materialised
    per-sample weights, whichever costs fewer multiply-adds (``strategy`` overrides);
    ``Conv`` materialises per-sample kernel gradients (``vmap`` of the convolution's VJP,
    which JAX lowers to a feature-grouped convolution), then ``J_l J_lᵀ``; ``Embed`` uses the
    factored id-equality form or a one-hot materialisation; ``LayerNorm``, ``GroupNorm``,
    ``BatchNorm``, ``RMSNorm``, ``InstanceNorm`` get per-sample affine blocks
    ``(Σ_t x̂_it δ_it, Σ_t δ_it)``. BatchNorm in train mode keeps its batch statistics: its rows
    are the per-sample contributions read off the batch backward (δ carries the coupling).
    Any other module that owns parameters is handled exactly (``fallback="vmap"``): its rows are
    ``(∂f(θ, X)_i/∂θ)ᵀ δ_i`` for its batch forward ``f`` and output cotangent ``δ``, formed by
    ``vmap`` of the VJP of the module on one sample when its parameter Jacobian is separable
    across samples, else (a module coupling samples: batch statistics, ``h − mean_b h``, a
    softmax over the batch) by the batch VJP at the cotangent masked to each sample's slice,
    at B times the module's backward; the check is made at each call's values (under ``jit``
    by ``lax.cond``). ``fallback="error"`` rejects such modules instead. A recognised layer
    whose parameters are also used through another method (a tied embedding's ``attend``)
    has that call re-run the same way, and its per-sample gradients summed over the calls
    before its Gram is formed. After a call, ``report()`` lists the path each parameterised
    module took (a :class:`fimcore.layers.Report`, paths of ``fimcore.layers.PATHS``).

    Data-parallel: jitted with the batch sharded over a mesh axis (``NamedSharding``) and the
    variables replicated, the step returns the global batch's Gram (rows in global order, sharded
    by rows unless ``out_shardings`` replicates it), the unsharded gradient and, for BatchNorm in
    train mode, the global batch statistics (the batch is one array; XLA inserts the reductions).
    There is no ``axis_name``: inside ``shard_map`` the loss mean and the batch statistics would be
    the shard's own, so use the ``jit`` route. Tested on CPU with 4 host devices.

    With ``keep_blocks=True`` the call returns one more output, last: the per-layer blocks
    ``{module path: (B, B) block}`` (``"Dense_0"``, ``"block/Conv_0"``), whose sum is the Gram
    exactly. ``result(gram, blocks=None)`` turns a step's outputs into a
    :class:`fimcore.GramResult` for ``fimcore.MeasureTracker.update`` (on the host; the step
    itself stays jit-able).

    Args:
        model: a ``flax.linen.Module``.
        loss_fn: ``loss_fn(outputs, *targets) -> (B,)`` per-example losses.
        mutable: collections the forward pass updates (e.g. ``["batch_stats"]``); when
            given, a fourth output holds the updated collections.
        apply_kwargs: extra keyword arguments for ``model.apply`` (e.g. ``{"train": True}``).
        dtype: Gram dtype; ``None`` = float64 when ``jax_enable_x64`` is on, else float32.
        strategy: ``"auto"`` (cost model for dense and embedding layers), ``"factored"`` or
            ``"materialize"`` (forced on every layer that has both forms), ``"generic"`` (every
            parameterised module through the exact re-run of the fallback; slow, for
            checking), or a dict ``{module path: strategy}`` with ``"auto"`` elsewhere.
        keep_blocks: also return the per-layer blocks (see above).
        params: None (every parameterised module) or module paths (``"Dense_0"``; a path
            also selects the modules under it) whose parameters are the columns of J; the
            others still get their batch gradient.
        dense_form: deprecated spelling of ``strategy`` (``"materialised"`` is
            ``"materialize"``).
        fallback: for unrecognised parameterised modules, ``"vmap"`` (exact rows from a re-run
            of the module: per sample, or masked batch VJPs when it couples samples) or
            ``"error"``.
        check_finite: outside ``jit``, raise if a parameter is NaN/Inf.
        memory_budget: None or bytes: the largest per-layer temporaries of the Gram (the PyTorch
            ``GramRecorder`` option). A layer whose temporaries exceed it is processed in chunks
            of c samples (exact): a factored dense/embedding layer builds c rows of its
            ``A Aᵀ``/``Gₒ Gₒᵀ`` factors at a time (``2·c·B·T²`` entries of the Gram dtype), a
            materialised one (dense, embedding, conv, norm) holds two chunks of per-sample
            gradients (``2·c·P_l`` entries; off-diagonal chunk blocks recomputed). With
            ``strategy="auto"`` a layer whose cheaper form cannot hold one sample within the
            budget takes the other form if that one can. Not counted: the captured layer
            inputs and cotangents (the forward's own memory) and the (B, B) Gram. Fallback
            modules and registered layer rules form all B rows at once, so the budget must
            hold ``B·P_l`` entries for them.

    Raises:
        TypeError: integer parameters; non-float ``dtype``.
        ValueError: per-example losses not of shape (B,); inputs/targets with different
            leading sizes; a layer not receiving the batch on axis 0, or an unrecognised
            module returning an output without it that the loss uses; non-finite parameters
            (outside ``jit``); bad ``strategy``/``fallback``; a ``strategy`` dict naming no
            parameterised module; a ``memory_budget`` that cannot hold one sample's temporaries
            of some layer (the error names the layer and the bytes it needs).
        NotImplementedError: unrecognised parameterised module with ``fallback="error"``, or
            one that draws random numbers; with ``fallback="error"``, a recognised layer used
            through another method (tied embeddings).

    Example:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from fimcore_adapters.jax import FlaxGram
        >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
        >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
        >>> variables = model.init(jax.random.key(0), x)
        >>> def loss_fn(logits, y):
        ...     return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]
        >>> step = FlaxGram(model, loss_fn)
        >>> loss, grads, gram = jax.jit(step)(variables, x, y)
        >>> gram.shape, step.report().paths()
        ((4, 4), {'layers_0': 'factored', 'layers_2': 'factored'})
    """

    def __init__(self, model, loss_fn, *, mutable=False, apply_kwargs=None, dtype=None,
                 strategy="auto", keep_blocks=False, params=None, fallback="vmap",
                 check_finite=True, dense_form=None, memory_budget=None):
        if dense_form is not None:
            deprecated("FlaxGram(dense_form=...)", "FlaxGram(strategy=...) with 'auto', "
                       "'factored' or 'materialize'")
            if dense_form not in ("auto", "factored", "materialised"):
                raise ValueError(
                    f"dense_form must be 'auto', 'factored' or 'materialised'; received {dense_form!r}."
                )
            if strategy != "auto":
                raise ValueError(f"pass strategy or its old spelling dense_form, not both; received "
                                 f"strategy={strategy!r} and dense_form={dense_form!r}.")
            strategy = {"materialised": "materialize"}.get(dense_form, dense_form)
        self._default, self._strategies = check_strategy(strategy)
        if memory_budget is not None and (isinstance(memory_budget, bool)
                                          or not isinstance(memory_budget, int) or memory_budget <= 0):
            raise ValueError(f"memory_budget must be None or a positive number of bytes; received "
                             f"{memory_budget!r}")
        self.memory_budget = memory_budget
        if not isinstance(keep_blocks, bool):
            raise ValueError(f"keep_blocks must be True or False; received {keep_blocks!r}.")
        if params is not None:
            params = (params,) if isinstance(params, str) else tuple(params)
            bad = [p for p in params if not isinstance(p, str)]
            if bad or not params:
                raise TypeError(f"params must be None or module paths (strings such as 'Dense_0' or "
                                f"'block/Conv_0'); received {bad or params!r}.")
        self.params = params
        if fallback not in ("vmap", "error"):
            raise ValueError(f"fallback must be 'vmap' or 'error'; received {fallback!r}.")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a flax.linen.Module; received {type(model).__name__}. "
                "For other JAX models use value_grad_and_gram with a per-example loss."
            )
        self.model, self.loss_fn = model, loss_fn
        self.mutable = mutable
        self.apply_kwargs = dict(apply_kwargs or {})
        self.dtype, self.strategy, self.fallback = dtype, strategy, fallback
        self.keep_blocks = keep_blocks
        self.check_finite = check_finite
        self._how: dict[str, str] = {}
        self._info = StepInfo()

    def _strategy(self, name: str) -> str:
        return self._strategies.get(name, self._default)

    def _selected(self, name: str) -> bool:
        return self.params is None or any(name == p or name.startswith(p + "/") for p in self.params)

    @property
    def dense_form(self) -> str:
        """Deprecated: the dense-layer form ``strategy`` forces (``"materialised"`` etc.)."""
        return _FORMS.get(self._default, "auto")

    @property
    def report(self):
        """``report()``: the per-layer :class:`fimcore.layers.Report` of the last traced step.

        (Reading ``report`` without calling it gives the old ``{module path: description}``
        dict, with a ``DeprecationWarning``.)
        """
        return LegacyReportDict(self._how, self._info.report(), "FlaxGram")

    def result(self, gram, blocks=None):
        """The step's :class:`fimcore.GramResult` from its outputs ``gram`` (and ``blocks``):
        gradient dtype, B, P and the report recorded when the step was traced."""
        if blocks is None and self.keep_blocks and self._info.blocks is not None:
            blocks = self._info.blocks
        return self._info.result(gram, blocks, what="the FlaxGram step")

    # -- forward with capture -------------------------------------------------------------
    def _forward(self, recorder, variables, inputs, rngs):
        with nn.intercept_methods(recorder):
            result = self.model.apply(variables, inputs, mutable=self.mutable, rngs=rngs, **self.apply_kwargs)
        return result if self.mutable else (result, None)

    def __call__(self, variables, inputs, *targets, rngs=None):
        if not self._guarding:
            inputs, targets = self._replicate_if_grouped_conv(variables, inputs, targets, rngs)
        params = variables["params"]
        check_params(params, what='variables["params"]')
        if self.check_finite:
            check_finite_if_concrete(params, what='variables["params"]')
        size = batch_size((inputs, targets), what="(inputs, *targets)")
        acc = accumulation_dtype(self.dtype, params)

        generic = lambda name: self._strategy(name) == "generic"  # noqa: E731
        discover = Recorder(size, None, self.fallback, generic)
        out_shape = jax.eval_shape(lambda v, x: self._forward(discover, v, x, rngs)[0], variables, inputs)
        loss_shape = jax.eval_shape(lambda o, *t: self.loss_fn(o, *t), out_shape, *targets)
        if getattr(loss_shape, "shape", None) != (size,):
            raise ValueError(
                f"loss_fn(outputs, *targets) must return the per-example losses, shape ({size},); "
                f"received {jax.tree_util.tree_map(jnp.shape, loss_shape)}. Do not reduce over the "
                "batch: FlaxGram takes the mean itself."
            )
        zeros = [jnp.zeros(s.shape, s.dtype) for s in discover.out_shapes]
        unknown = set(self._strategies) - {"/".join(c.path) or "<root>" for c in discover.calls}
        if unknown:
            raise ValueError(
                f"strategy names modules that own no parameters used in the step: {sorted(unknown)}; "
                f"parameterised modules are {sorted({'/'.join(c.path) or '<root>' for c in discover.calls})}."
            )

        labels = {"/".join(c.path) or "<root>" for c in discover.calls}
        if self.params is not None:
            missing = [p for p in self.params if not any(n == p or n.startswith(p + "/") for n in labels)]
            if missing:
                raise ValueError(f"params names no parameterised module used in the step: {missing}; "
                                 f"parameterised modules are {sorted(labels)}.")

        rec = Recorder(size, None, self.fallback, generic)

        def batch_loss(perturbations):
            rec.perturbations = perturbations
            out, state = self._forward(rec, variables, inputs, rngs)
            return jnp.mean(self.loss_fn(out, *targets)), (rec.arrays, state)

        (mean_loss, (arrays, state)), deltas = jax.value_and_grad(batch_loss, has_aux=True)(zeros)
        mean_grad, gram, blocks = self._assemble(rec.calls, arrays, deltas, params, size, acc)
        info = self._info
        info.grad_dtype, info.batch_size = gradient_dtype(params), size
        info.num_params = (sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
                           if self.params is None else sum(r.params for r in info.records))
        concrete = blocks is not None and not any(isinstance(b, jax.core.Tracer) for b in blocks.values())
        info.blocks = blocks if concrete else None
        out = (mean_loss, mean_grad, gram) + ((state,) if self.mutable else ())
        return out + ((blocks,) if self.keep_blocks else ())

    _guarding = False

    def _replicate_if_grouped_conv(self, variables, inputs, targets, rngs):
        """The batch replicated when it lies on a multi-device mesh and the step would contain a
        grouped convolution (what ``vmap`` makes of a per-sample convolution gradient: fallback
        modules, registered rules, the ``vmap`` conv route), which XLA's partitioner splits
        wrongly with a sharded batch (see ``_jax/generic.py``); otherwise the arguments as given."""
        mesh = mesh_of((inputs, targets))
        if mesh is None:
            return inputs, targets
        self._guarding = True
        try:
            text = str(jax.make_jaxpr(lambda v, x, t: self(v, x, *t, rngs=rngs))(
                variables, inputs, tuple(targets)))
        finally:
            self._guarding = False
        if not grouped_conv_in(text):
            return inputs, targets
        warn_replicated("FlaxGram", mesh, "a grouped convolution (a vmapped per-sample "
                        "convolution gradient, e.g. of a fallback module)")
        return replicate((inputs, tuple(targets)), mesh)

    # -- per-layer Gram blocks ------------------------------------------------------------
    def _assemble(self, calls, arrays, deltas, params, size, acc):
        groups, k = defaultdict(list), 0
        for call in calls:
            groups[call.path].append((call, arrays[call.index], deltas[k:k + call.n_out]))
            k += call.n_out
        grads = jax.tree_util.tree_map(jnp.zeros_like, nn.meta.unbox(params))
        grads = _to_dict(grads)
        gram = jnp.zeros((size, size), acc)
        how, records = {}, []
        sink = PerLayerSink() if self.keep_blocks else None   # the core's per-layer sink
        scale = jnp.asarray(size * size, acc)
        for path, items in groups.items():
            label = "/".join(path) or "<root>"
            block, layer_grads, reason = self._group(items, size, acc, self._strategy(label))
            selected = self._selected(label)
            if selected:
                how[label] = reason
            if selected and self.keep_blocks:
                sink.add_block(label, block * scale)
            elif selected:
                gram = gram + block
            node = grads
            for name in path:
                node = node[name]
            for name, value in layer_grads.items():
                node[name] = value.astype(node[name].dtype).reshape(node[name].shape)
            if not selected:
                continue
            call = items[0][0]
            own = {k: v for k, v in call.module.variables.get("params", {}).items()
                   if not hasattr(v, "items")}
            records.append(LayerRecord(label, type(call.module).__name__, _path_of(how[label]),
                                       how[label], sum(int(np.size(nn.meta.unbox(v))) for v in own.values()),
                                       len(items)))
        self._how, self._info.records = how, records
        if self.keep_blocks:
            return grads, sink.gram(), sink.blocks()
        return grads, gram * scale, None

    def _group(self, items, size, acc, strategy="auto"):
        call = items[0][0]
        module, kind = call.module, call.kind
        form_of = _FORMS.get(strategy, "auto")
        label = "/".join(call.path) or "<root>"
        where = f"layer {label!r} ({type(module).__name__})"
        budget, itemsize = self.memory_budget, jnp.dtype(acc).itemsize
        n_params = sum(int(np.size(nn.meta.unbox(v))) for v in
                       module.variables.get("params", {}).values() if not hasattr(v, "items"))

        def pick(form, need, auto):
            """The form to take under the budget and the samples per chunk (None: all at once)."""
            other = {"factored": "materialised", "materialised": "factored"}[form]
            if auto and budget is not None and need[form] > budget and need[other] <= budget:
                form = other
            return form, budget_chunk(budget, need[form], size, f"{where} on the {form} form")

        def whole_batch(what):
            need = size * n_params * itemsize
            if budget is not None and need > budget:
                raise ValueError(
                    f"memory_budget must hold the per-sample gradients of all B = {size} samples of "
                    f"{where} at once ({what} forms them for the whole batch): {need} bytes; received "
                    f"memory_budget={budget!r}. Raise memory_budget to at least {need}, or pass None")

        if len({c.kind for c, _, _ in items}) > 1:   # parameters used through several methods
            whole_batch("a layer used through several methods")
            summed, forms = {}, set()
            for c, captured, d in items:
                ps, form = call_rows(c, captured, d, size)
                forms.add(form or c.kind)
                for k, v in ps.items():
                    summed[k] = v if k not in summed else summed[k] + v
            block, grads = materialised_block(summed, acc)
            methods = sorted({c.method for c, _, _ in items})
            return block, grads, ("tied: materialised per-sample gradients summed over the calls "
                                  f"through {', '.join(methods)} ({'; '.join(sorted(forms))})")
        if kind in ("dense", "dense_general"):
            a_parts, g_parts = [], []
            for c, x, (d,) in items:
                x2, d2 = dense_operands(c, x, d, size)
                a_parts.append(x2)
                g_parts.append(d2)
            a, g = jnp.concatenate(a_parts, 1), jnp.concatenate(g_parts, 1)
            t, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
            form = choose_dense_form(size, t, d_in, d_out, form_of)
            need = {"factored": (2 * size * t * t + size) * itemsize,
                    "materialised": 2 * (d_in * d_out + d_out) * itemsize}
            form, chunk = pick(form, need, form_of == "auto")
            block, grads = dense_block(a, g, has_bias=module.use_bias, form=form, dtype=acc, chunk=chunk)
            return block, grads, (f"{kind.split('_')[0] if kind == 'dense' else kind}: {form} (T={t})"
                                  + _chunked_note(chunk))
        if kind == "embed":
            ids = jnp.concatenate([x.reshape(size, -1) for _, x, _ in items], 1)
            g = jnp.concatenate([d.reshape(size, -1, module.features) for _, _, (d,) in items], 1)
            t, v, f = ids.shape[1], module.num_embeddings, module.features
            form = choose_embed_form(size, t, v, f, form_of)
            need = {"factored": 2 * size * t * t * itemsize, "materialised": 2 * v * f * itemsize}
            form, chunk = pick(form, need, form_of == "auto")
            block, grads = embed_block(ids, g, num_embeddings=v, form=form, dtype=acc,
                                       param_dtype=module.param_dtype, chunk=chunk)
            return block, grads, f"embed: {form} (T={t})" + _chunked_note(chunk)
        chunk = None
        if kind in ("conv", "norm"):
            chunk = budget_chunk(budget, 2 * n_params * itemsize, size,
                                 f"{where} (two samples' per-sample gradients)")
        else:
            whole_batch("the registered layer rule" if kind == "user" else "the fallback")
        if chunk is not None:
            forms = set()

            def rows(ops):
                total = None
                for (c, _, _), (captured, d) in zip(items, ops):
                    ps, form = per_sample(c, captured, d, chunk)
                    forms.add(form)
                    total = ps if total is None else jax.tree_util.tree_map(jnp.add, total, ps)
                return total

            block, grads = chunked_gram(rows, [(captured, d) for _, captured, d in items], size,
                                        chunk, acc)
            note = _chunked_note(chunk)
            if kind == "conv":
                grads = {k: v.astype(nn.meta.unbox(module.variables["params"][k]).dtype)
                         for k, v in grads.items()}
                return block, grads, ("conv: materialised per-sample kernel gradients by "
                                      + " and ".join(sorted(forms)) + note)
            return block, grads, "norm: per-sample affine" + note
        summed, forms = None, set()
        for c, captured, d in items:
            ps, form = per_sample(c, captured, d, size)
            forms.add(form)
            summed = ps if summed is None else jax.tree_util.tree_map(jnp.add, summed, ps)
        block, grads = materialised_block(summed, acc)
        if kind == "conv":
            return block, grads, "conv: materialised per-sample kernel gradients by " + " and ".join(sorted(forms))
        if kind == "user":
            return block, grads, f"{call.static['rule'].name} rule (registered): materialised per-sample gradients"
        if kind == "fallback":
            return block, grads, "; ".join(sorted(forms))
        return block, grads, "norm: per-sample affine"


def _chunked_note(chunk) -> str:
    return "" if chunk is None else f", in chunks of {chunk} sample(s) (memory_budget)"


def _path_of(how: str) -> str:
    """The :data:`fimcore.layers.PATHS` name of a path description."""
    if " rule (registered): " in how:
        return "materialize"
    if how.startswith("fallback"):
        coupled = "masked batch VJP" in how and "if the module is separable" not in how
        return "generic-coupled" if coupled else "generic"
    if how.startswith("norm"):
        return "norm"
    if ": factored" in how:
        return "factored"
    return "materialize"


def _to_dict(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def flax_value_grad_and_gram(model, loss_fn, **options):
    """Functional form of :class:`FlaxGram`: ``fn(variables, inputs, *targets) -> (loss, grad, gram)``."""
    return FlaxGram(model, loss_fn, **options)


def flax_per_sample_gram(model, loss_fn, variables, inputs, *targets, **options):
    """Gram ``G = J Jᵀ`` (B×B) of a Flax model's per-sample gradients in one call (see :class:`FlaxGram`)."""
    return FlaxGram(model, loss_fn, **options)(variables, inputs, *targets)[2]
