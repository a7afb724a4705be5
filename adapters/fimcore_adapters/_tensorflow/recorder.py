"""GramTape: a ``tf.GradientTape`` that also returns the per-sample Gram of the step.

Inside the context every trainable Keras layer's ``call`` is temporarily replaced (on the
instance, for the duration of the ``with`` block) by a recorder: registered layers run their
rule's forward and keep the tensors the rule needs, other layers with own trainable
variables run unchanged and keep their outputs for the exact generic path. One backward
to the recorded pre-activation outputs then yields, per layer, the Gram contribution *and*
the batch weight gradient (the weight gradient is never computed twice).
"""

from __future__ import annotations

from typing import Any, Iterable

import keras
import numpy as np
import tensorflow as tf

from fimcore.layers import LayerRecord, PerLayerSink, Report, check_strategy

from .._compat import LegacyReportList, deprecated
from .._fisher import check_fisher_options
# the rule modules register their layer types on import
from . import (budget, convps, dense, embedding, generic, kernels, mirrored, norm,  # noqa: F401
               registry, sampled)
from .budget import check_memory_budget
from .select import resolve_params
from .generic import GENERIC, generic_capture
from .norm import _AffineNormRule

REDUCTIONS = ("mean", "sum", "none")
_PATHS = {"factored": "factored", "materialised": "materialize", "generic": "generic"}


def resolve_options(params, strategy, layers, mode, *, where: str):
    """``(params, strategy)`` from the common spellings and the deprecated ``layers``/``mode``."""
    if layers is not None:
        deprecated(f"{where}(layers=...)", f"{where}(params=...)", stacklevel=4)
        if params is not None:
            raise ValueError(f"pass params or its old spelling layers, not both; received both "
                             f"to {where}.")
        params = layers
    if mode is not None:
        deprecated(f"{where}(mode=...)", f"{where}(strategy=...) with 'auto' for 'registry'",
                   stacklevel=4)
        if mode not in ("registry", "generic"):
            raise ValueError(f"mode must be 'registry' or 'generic'; received {mode!r}.")
        if strategy != "auto":
            raise ValueError(f"pass strategy or its old spelling mode, not both; received "
                             f"strategy={strategy!r} and mode={mode!r}.")
        strategy = "auto" if mode == "registry" else "generic"
    check_strategy(strategy)
    return params, strategy




def check_built(model) -> None:
    """Raise ValueError unless ``model`` is a built Keras layer/model."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"model must be a keras.Model or keras.layers.Layer; received {type(model).__name__}. "
            "Wrap plain functions in a keras.Model."
        )
    if not model.built:
        raise ValueError(
            f"model {model.name!r} must be built before its per-sample Gram can be taken; "
            "received an unbuilt model (no variables yet). Call model.build(input_shape) or "
            "run the model once on a batch (e.g. model(x[:1])) first."
        )


def check_reduction(loss_reduction) -> None:
    """Raise ValueError unless ``loss_reduction`` is one of :data:`REDUCTIONS`."""
    if loss_reduction not in REDUCTIONS:
        raise ValueError(
            f"loss_reduction must be one of {REDUCTIONS}; received {loss_reduction!r}. Use "
            "'mean' for a batch-mean loss, 'sum' for a batch sum, 'none' for per-sample losses."
        )


def loss_target(loss, loss_reduction: str):
    """Validate ``loss`` against ``loss_reduction``; return the scalar to differentiate
    (None for per-sample losses, whose sum the caller forms on the tape)."""
    check_reduction(loss_reduction)
    loss = tf.convert_to_tensor(loss)
    if not loss.dtype.is_floating:
        raise TypeError(f"the loss must be a floating tensor; received dtype {loss.dtype.name}.")
    rank = loss.shape.rank
    if loss_reduction == "none":
        if rank != 1:
            raise ValueError(
                "loss_reduction='none' needs per-sample losses of shape (B,); received a loss "
                f"of shape {tuple(loss.shape)}. Pass the unreduced per-sample losses (a Keras "
                "loss with reduction='none'), or a scalar loss with loss_reduction='mean'."
            )
        return None
    if rank != 0:
        raise ValueError(
            f"loss_reduction={loss_reduction!r} needs a scalar loss; received a loss of shape "
            f"{tuple(loss.shape)} (per-sample values?). Reduce it over the batch "
            "(tf.reduce_mean, or a Keras loss with reduction='sum_over_batch_size'), or pass "
            "loss_reduction='none' to hand over per-sample losses."
        )
    return loss


class GramTape:
    r"""A gradient tape that returns the batch gradients *and* the per-sample Gram ``G = J Jᵀ``.

    Rows of J are B × each sample's contribution to the gradient of the batch loss
    (``loss_reduction="mean"``), so :math:`\mathbf 1^\top G \mathbf 1 = B^2\|\nabla L\|^2`.
    Works eagerly and inside ``tf.function`` / a Keras ``train_step`` (also under XLA);
    the Gram stays a (B, B) tensor on the step's device.

    Args:
        model: a built Keras model (or layer) whose layers are called inside the block.
        params: which variables enter G (the columns of J): None (all trainable), a
            predicate ``layer -> bool``, or a list mixing layers, layer names, ``tf.Variable``
            objects of the model and variable paths (``variable.path``, e.g.
            ``"dense_1/kernel"``). A layer given whole contributes all its variables; a layer
            with only some variables given contributes only those (its per-sample gradients
            are then materialised). Other variables still get their ordinary gradient. An
            entry that is neither a layer nor a trainable variable of the model is refused.
        strategy: ``"auto"`` (registered rules, each choosing its cheaper exact form by its
            cost model; the generic path for layers without a rule), ``"factored"`` or
            ``"materialize"`` (forced on every layer whose rule has both forms),
            ``"generic"`` (every layer through the generic ``GradientTape.jacobian`` path; a
            reference), or a dict ``{layer name: strategy}`` with ``"auto"`` elsewhere.
        keep_blocks: also keep each layer's own block :math:`J_l J_l^\top` of G
            (:meth:`blocks`, :meth:`result`); G is then their sum, so they add up to it exactly.
        dtype: dtype of the Gram (factors are cast before the products); default the
            per-sample gradients' dtype.
        memory_budget: None or bytes: the cap on each layer's Gram temporaries. Factored
            layers form G in row chunks of n samples (2·n·B·T² entries alive);
            materialised layers in chunks of n samples' rows, two chunks alive (2·n·P_l
            entries), each chunk's rows recomputed per row chunk; ``"auto"`` keeps the cost
            model's form when it fits, else the other. A layer for which no form fits with
            n = 1, or a generic-path layer whose (B, P_l) rows exceed it (the generic
            Jacobian is not chunked), is refused naming the layer and the bytes it needs.
            Not applied under a multi-replica strategy (refused there).
        layers: deprecated spelling of ``params``.
        mode: deprecated spelling of ``strategy`` (``"registry"`` is ``"auto"``).

    Data-parallel: inside ``strategy.run`` of a multi-replica ``tf.distribute`` strategy
    (``MirroredStrategy``), the Gram is that of the *global* batch of :math:`B=\sum_r b_r`
    samples (rows in replica order, then local order), the same on every replica: each layer's
    factors (a, δ) or rows are all-gathered across replicas before the products (see
    :mod:`.mirrored`), so the cross-replica blocks :math:`J_r J_s^\top` are exact. The loss is
    then the global mean (``tf.nn.compute_average_loss(..., global_batch_size=B)``, or a Keras
    loss) and rows are B × each sample's share: :math:`\mathbf 1^\top G\mathbf 1 =
    B^2\|\nabla L\|^2` with :math:`\nabla L` the sum over replicas of the returned gradients (what
    the strategy applies). The gradients returned are the replica's own. Tested on logical CPU
    devices; untested on GPUs/TPUs.

    After :meth:`gradient_and_gram`, :meth:`report` lists the path each layer took
    (a :class:`fimcore.layers.Report`), and :meth:`result` gives the step as a
    :class:`fimcore.GramResult` (eagerly; NumPy arrays) for ``fimcore.MeasureTracker.update``.

    Example:
        >>> import numpy as np, keras, tensorflow as tf
        >>> from fimcore_adapters.tensorflow import GramTape
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
        >>> with GramTape(model) as tape:
        ...     loss = tf.reduce_mean(tf.reduce_sum((model(x) - y) ** 2, axis=1))
        >>> grads, gram = tape.gradient_and_gram(loss, model.trainable_variables)
        >>> tuple(gram.shape), [tuple(g.shape) for g in grads]
        ((4, 4), [(3, 2), (2,)])
        >>> [(r.module, r.path) for r in tape.report()]
        [('Dense', 'factored')]
    """

    def __init__(self, model, *, params=None, strategy="auto", keep_blocks: bool = False,
                 dtype=None, memory_budget: int | None = None, layers=None,
                 mode: str | None = None) -> None:
        check_built(model)
        self.memory_budget = check_memory_budget(memory_budget)
        params, strategy = resolve_options(params, strategy, layers, mode, where="GramTape")
        if not isinstance(keep_blocks, bool):
            raise ValueError(f"keep_blocks must be True or False; received {keep_blocks!r}.")
        self.model = model
        self.strategy = strategy
        self._default, self._strategies = check_strategy(strategy)
        self.keep_blocks = keep_blocks
        self.dtype = tf.as_dtype(dtype) if dtype is not None else None
        self._select, self._chosen = resolve_params(model, params)
        self._partial: dict[int, set] = {}     # layer id -> ids of its selected variables
        self._tape: tf.GradientTape | None = None
        self._records: list[tuple[Any, registry.LayerRule, dict]] = []
        self._patched: list[Any] = []
        self._recording = False
        self._rows: list[tuple[str, str, str]] = []
        self._layer_records: list[LayerRecord] = []
        self._last: dict | None = None
        self.layer_grams: dict[str, Any] = {}
        self.replicas = 1
        self._gathered: dict | None = None
        self.grad_dtype = None
        self.empirical_gram = None
        self.sampled_labels = None

    @property
    def mode(self) -> str:
        """Deprecated: ``"generic"`` when ``strategy == "generic"``, else ``"registry"``."""
        return "generic" if self.strategy == "generic" else "registry"

    def _strategy(self, name: str) -> str:
        return self._strategies.get(name, self._default)

    @property
    def report(self):
        """``report()``: per layer, the path its share of G took in the last step (a
        :class:`fimcore.layers.Report`; eagerly with each layer's share of ``Tr G``).

        Under a multi-replica ``tf.distribute`` strategy each record's reason names what was
        gathered, and the report carries ``gathered_bytes_per_sample`` and ``gathered_bytes``
        (B × that: the bytes each replica holds after the step's all-gathers; None where a
        shape is only known at run time; 0 on one replica).

        (Reading ``report`` without calling it gives the old list of ``(layer name, layer
        type, path)`` tuples, with a ``DeprecationWarning``.)
        """
        traces = {}
        last = self._last or {}
        blocks, scale = last.get("blocks"), 1.0
        if blocks is None:             # unscaled per-layer contributions, kept in any case
            blocks, scale = self.layer_grams, last.get("scale", 1.0)
        values = list(blocks.values()) + ([scale] if isinstance(scale, tf.Tensor) else [])
        if blocks and not any(tf.is_symbolic_tensor(v) for v in values):   # eager values only
            scale = float(scale) ** 2 if isinstance(scale, tf.Tensor) else scale
            traces = {k: float(tf.linalg.trace(b)) * scale for k, b in blocks.items()}
        rep = Report(LayerRecord(r.name, r.module, r.path, r.reason, r.params, r.calls,
                                 traces.get(r.name)) for r in self._layer_records)
        # bytes each replica holds after the all-gathers of the step (0 on one replica)
        rep.gathered_bytes_per_sample, rep.gathered_bytes = 0, 0
        if self._gathered is not None:
            per = self._gathered.values()
            per = None if None in per else sum(per)
            size = last["gram"].shape[0] if last.get("gram") is not None else None
            rep.gathered_bytes_per_sample = per
            rep.gathered_bytes = None if per is None or size is None else per * int(size)
        return LegacyReportList(self._rows, rep, "GramTape")

    def blocks(self) -> dict:
        """``{layer name: (B, B) block}`` of the last step, summing to its Gram exactly
        (tensors; symbolic inside ``tf.function``).

        Raises:
            RuntimeError: the tape was built without ``keep_blocks=True``, or no
                :meth:`gradient_and_gram` ran yet.
        """
        if not self.keep_blocks:
            raise RuntimeError("per-layer blocks were not kept: build the tape with "
                               "GramTape(model, keep_blocks=True)")
        if self._last is None:
            raise RuntimeError("no Gram matrix was recorded: call gradient_and_gram(loss) after "
                               "the `with GramTape(...)` block first.")
        return dict(self._last["blocks"])

    def result(self):
        """The last step as a :class:`fimcore.GramResult`: the Gram (and, with
        ``keep_blocks=True``, the blocks) as NumPy, the gradients' dtype, B, P and the report.

        Raises:
            RuntimeError: no :meth:`gradient_and_gram` ran yet, or it ran inside a
                ``tf.function`` (return the Gram from the function and build the result
                from it with ``fimcore.GramResult`` instead).
        """
        from fimcore.results import GramResult

        last = self._last
        if last is None:
            raise RuntimeError("no Gram matrix was recorded: call gradient_and_gram(loss) after "
                               "the `with GramTape(...)` block first.")
        if tf.is_symbolic_tensor(last["gram"]):
            raise RuntimeError("result() needs the step's values, but the last gradient_and_gram "
                               "ran inside a tf.function; return the Gram (and tape.blocks()) "
                               "from the function and build fimcore.GramResult from them.")
        blocks = None if last["blocks"] is None else {k: v.numpy() for k, v in last["blocks"].items()}
        return GramResult(gram=last["gram"].numpy(), grad_dtype=np.dtype(self.grad_dtype.as_numpy_dtype),
                          batch_size=int(last["gram"].shape[0]), num_params=last["num_params"],
                          blocks=blocks, report=self.report(), loss_reduction=last["reduction"],
                          checked=True)  # the tape's Σ J Jᵀ: the core reads finiteness off Tr G

    # ----------------------------------------------------------------- recording

    def _plan(self):
        plan, excluded = [], set()
        self._partial = {}
        for layer in self.model._flatten_layers(include_self=True, recursive=True):
            own = registry.own_trainable_variables(layer)
            if not own:
                continue
            if not self._select(layer):
                keep = {id(v) for v in own if id(v) in self._chosen}
                excluded.update(id(v) for v in own if id(v) not in keep)
                if not keep:
                    continue
                if len(keep) < len(own):       # some of its variables: only those enter G
                    self._partial[id(layer)] = keep
            rule = registry.rule_for(layer) if self._strategy(layer.name) != "generic" else None
            plan.append((layer, rule or GENERIC))
        unknown = set(self._strategies) - {layer.name for layer, _ in plan}
        if unknown:
            raise ValueError(f"strategy names layers that hold no selected trainable variable: "
                             f"{sorted(unknown)}; covered layers are {[l.name for l, _ in plan]}.")
        return plan, excluded

    def _wrap(self, layer, rule):
        original = type(layer).call.__get__(layer)

        def call(*args, **kwargs):
            if not self._recording:
                return original(*args, **kwargs)
            out, capture = rule.forward(layer, original, args, kwargs)
            used = rule
            if capture is None:
                used, capture = GENERIC, generic_capture(out, original, args, kwargs)
            for t in capture["watch"]:
                self._tape.watch(t)
            self._records.append((layer, used, capture))
            return out

        return call

    def __enter__(self) -> "GramTape":
        self._records = []
        plan, self._excluded = self._plan()
        self._tape = tf.GradientTape(persistent=True)
        self._tape.__enter__()
        try:
            for layer, rule in plan:
                object.__setattr__(layer, "call", self._wrap(layer, rule))
                self._patched.append(layer)
        except BaseException:
            self._unpatch()
            self._tape.__exit__(None, None, None)
            raise
        self._recording = True
        return self

    def _unpatch(self):
        for layer in self._patched:
            layer.__dict__.pop("call", None)
        self._patched = []

    def __exit__(self, *exc) -> None:
        self._recording = False
        self._unpatch()
        self._tape.__exit__(*exc)

    def watch(self, tensor) -> None:
        """Watch an extra tensor (as ``tf.GradientTape.watch``)."""
        self._tape.watch(tensor)

    def gradient(self, target, sources, **kwargs):
        """Ordinary ``tf.GradientTape.gradient`` on the underlying (persistent) tape."""
        return self._tape.gradient(target, sources, **kwargs)

    # ----------------------------------------------------------------- gradient + Gram

    @tf.autograph.experimental.do_not_convert
    def gradient_and_gram(self, loss, variables: Iterable | None = None, *,
                          loss_reduction: str = "mean", extra_loss=None, check: bool = False,
                          fisher: str = "empirical", outputs=None, loss_fn=None,
                          mc_samples: int = 1, seed=None):
        r"""Batch gradients of ``loss (+ extra_loss)`` and the (B, B) per-sample Gram of ``loss``.

        Args:
            loss: the data loss: a scalar batch mean (``"mean"``, default), a scalar batch
                sum (``"sum"``), or per-sample losses of shape (B,) (``"none"``; the
                gradient is that of their sum).
            variables: variables to return gradients for (default the model's trainable
                variables), in this order; None where a variable does not affect the loss.
            loss_reduction: how ``loss`` reduces the batch; rows of J are scaled by B for
                ``"mean"`` so that they are per-sample gradients, not 1/B of them. Under a
                multi-replica strategy ``"mean"`` is the mean over the global batch (each
                replica's loss summed over its samples and divided by the global B, as
                ``tf.nn.compute_average_loss`` and Keras losses do) and the scale is that B.
            extra_loss: a scalar added to the loss for the gradients only (e.g. Keras
                regularisation losses); like weight decay it is not part of J.
            check: also run the ordinary backward and verify that the rows sum to it
                (catches a variable read outside its layer's ``call``, e.g. tied weights);
                costs one more backward, :func:`per_sample_gram` does it by default.
            fisher: ``"empirical"`` (rows at the data labels) or ``"sampled"``: the returned Gram
                has rows ``∇_θ ℓ(h_i, ŷ_i)`` at labels drawn from the model's predictive
                distribution (the Monte-Carlo "true" Fisher's Gram), from one more backward of
                ``outputs`` per draw on the same tape; the returned gradients stay the data-label
                ones. The data-label Gram is kept as ``tape.empirical_gram`` and the labels as
                ``tape.sampled_labels`` (K, B, …).
            outputs: with ``fisher="sampled"``, the model output h recorded in the block (logits
                with the class axis last, or the regression mean).
            loss_fn: with ``fisher="sampled"``, the likelihood: a Keras
                ``SparseCategoricalCrossentropy``/``CategoricalCrossentropy`` with
                ``from_logits=True``, ``MeanSquaredError``, or ``"cross_entropy"`` / ``"mse"``.
                Others are refused, named.
            mc_samples: K draws; the Gram is the mean of the K (B, B) Grams (trace unbiased;
                off-diagonal entries average to 0, so use K = 1 for Fisher spectra).
            seed: an int (the same draws on every call), a ``tf.random.Generator`` (fresh draws
                each call; pass one for training loops) or None (TensorFlow's global generator).

        Returns:
            ``(grads, gram)``: a list aligned with ``variables`` and a (B, B) tensor.

        Raises:
            ValueError: on a loss whose shape does not match ``loss_reduction``, when no
                layer was recorded, or when a variable that should enter G is read outside
                the ``call`` of the layer that owns it (the Gram would miss it; for variables
                that a rule covers this is detected with ``check=True``, eagerly); with a
                ``memory_budget`` too small for a layer (named, with the bytes it needs) or
                given under a multi-replica strategy.
            TypeError: on a non-floating loss.
        """
        check_fisher_options(fisher, mc_samples,
                             None if isinstance(seed, tf.random.Generator) else seed)
        if fisher == "sampled" and outputs is None:
            raise ValueError("fisher='sampled' draws labels from the model output; received "
                             "outputs=None. Pass outputs=y_pred, the model(x) computed in the block")
        if fisher == "sampled":
            sampled.resolve_likelihood(loss_fn)     # refuse before any work
        target = loss_target(loss, loss_reduction)
        if target is None:  # per-sample losses: differentiate their sum (recorded on the tape)
            with self._tape:
                target = tf.reduce_sum(loss)
        if self._recording:
            raise ValueError("gradient_and_gram must be called after the `with GramTape(...)` "
                             "block has closed; received a call inside it. Dedent the call.")
        if not self._records:
            raise ValueError(
                f"no trainable layer of model {self.model.name!r} was called inside the "
                "GramTape block; received nothing to take a Gram of. Call the model inside "
                "`with GramTape(model) as tape:`."
            )
        variables = list(self.model.trainable_variables if variables is None else variables)
        by_layer: dict[int, list] = {}
        starts: dict[int, list] = {}   # where each call's watched outputs begin, in call order
        position = 0
        for layer, rule, capture in self._records:
            by_layer.setdefault(id(layer), []).append((layer, rule, capture))
            starts.setdefault(id(layer), []).append(position)
            position += len(capture["watch"])
        claimed = {}
        for calls in by_layer.values():
            layer, rule = calls[0][0], calls[0][1]
            for v in (rule.variables(layer) if rule is not GENERIC else
                      registry.own_trainable_variables(layer)):
                claimed[id(v)] = v
        watched = [t for _, _, c in self._records for t in c["watch"]]
        unclaimed = [v for v in variables if id(v) not in claimed]
        found = self._tape.gradient(target, watched + unclaimed)
        deltas, free = found[:len(watched)], found[len(watched):]
        deltas = [tf.zeros_like(t) if d is None else d for t, d in zip(watched, deltas)]
        missed = [v.path if hasattr(v, "path") else v.name for v, g in zip(unclaimed, free)
                  if g is not None and id(v) not in self._excluded]
        if missed:
            raise ValueError(
                "every variable that enters the Gram must be used inside the call of the layer "
                f"that owns it; received variables used elsewhere: {missed}. Register a rule for "
                "the layer using them (register_layer_rule), or leave them out of G with "
                "GramTape(..., params=...)."
            )
        self.grad_dtype = deltas[0].dtype if deltas else None
        context = mirrored.replica_context()   # several replicas: the Gram of the global batch
        self.replicas = 1 if context is None else context.num_replicas_in_sync
        gram, grads_by_id, rows, self.layer_grams, records = self._contributions(
            by_layer, starts, deltas, context)
        batch = tf.shape(gram)[0]              # B: global under a multi-replica strategy
        if fisher == "sampled":
            self.empirical_gram = gram * (tf.cast(batch, gram.dtype) ** 2
                                          if loss_reduction == "mean" else 1)
            cots, self.sampled_labels = sampled.output_cotangents(
                outputs, sampled.resolve_likelihood(loss_fn), mc_samples, loss_reduction, seed)
            total, per_layer = None, {}
            for k in range(mc_samples):
                found_k = self._tape.gradient(outputs, watched,
                                              output_gradients=tf.cast(cots[k], outputs.dtype))
                deltas_k = [tf.zeros_like(t) if d is None else d for t, d in zip(watched, found_k)]
                g_k, _, _, lg_k, _ = self._contributions(by_layer, starts, deltas_k, context)
                total = g_k if total is None else total + g_k
                per_layer = {n: b + per_layer.get(n, 0) for n, b in lg_k.items()}
            gram = total / mc_samples
            self.layer_grams = {n: b / mc_samples for n, b in per_layer.items()}
        sink = None
        if self.keep_blocks:   # G is the sum of the scaled blocks, through the core's per-layer sink
            sink = PerLayerSink()
            for name, block in self.layer_grams.items():
                sink.add_block(name, block * tf.cast(batch, block.dtype) ** 2
                               if loss_reduction == "mean" else block)
            gram = sink.gram()
        elif loss_reduction == "mean":
            gram = gram * tf.cast(batch, gram.dtype) ** 2
        self._rows, self._layer_records = rows, records
        self._last = {"gram": gram, "blocks": sink.blocks() if sink is not None else None,
                      "scale": 1.0 if loss_reduction != "mean" else batch,
                      "num_params": sum(int(np.prod(v.shape)) for v in claimed.values()
                                        if id(v) not in self._excluded),
                      "reduction": "mean" if loss_reduction == "mean" else "sum"}
        if check:
            self._check_rows(target, claimed, grads_by_id)
        grads_by_id.update({id(v): g for v, g in zip(unclaimed, free)})
        result = [grads_by_id.get(id(v)) for v in variables]
        if extra_loss is not None:
            extra = self._tape.gradient(extra_loss, variables)
            result = [e if g is None else (g if e is None else g + tf.cast(e, g.dtype))
                      for g, e in zip(result, extra)]
        return result, gram

    def _contributions(self, by_layer, starts, deltas, context=None):
        """Per layer: its Gram contribution and batch gradients, from the output cotangents
        (``starts``: where each call's watched outputs begin in ``deltas``, in call order;
        ``context``: the replica context of a multi-replica step, whose global blocks are formed
        from operands gathered by a :class:`.mirrored.MirroredSink`)."""
        sink = None if context is None else mirrored.MirroredSink(context)
        self._notes = {}
        if sink is not None and self.memory_budget is not None:
            raise ValueError(f"memory_budget applies to one replica's step; received "
                             f"memory_budget={self.memory_budget} under a strategy with "
                             f"{sink.replicas} replicas. Drop memory_budget under the strategy.")
        grads_by_id: dict[int, Any] = {}
        gram = None
        rows, layer_grams, records = [], {}, []
        for calls in by_layer.values():
            layer, rule = calls[0][0], calls[0][1]
            per_call = []
            for (_, _, capture), start in zip(calls, starts[id(layer)]):
                n = len(capture["watch"])
                per_call.append((self._cast(capture), [self._cast_t(d) for d in deltas[start:start + n]]))
            with tf.name_scope(f"fimcore_{rule.name}"):
                if self.memory_budget is not None:
                    contribution, grads, path = budget.gram_and_grads(self, layer, rule, calls,
                                                                      per_call)
                elif id(layer) in self._partial:
                    contribution, grads, path = self._layer_partial(layer, rule, calls, per_call,
                                                                    sink)
                elif sink is None:
                    contribution, grads, path = self._layer(layer, rule, calls, per_call)
                else:
                    contribution, grads, path = self._layer_mirrored(layer, rule, calls, per_call, sink)
            rows.append((layer.name, type(layer).__name__, path))
            owned = rule.variables(layer)
            common = ("norm" if isinstance(rule, _AffineNormRule) and path == "materialised"
                      else _PATHS.get(path, path))
            reason = (f"{rule.name} rule: {path}" if rule is not GENERIC else
                      "GradientTape.jacobian of the layer's own outputs")
            if layer.name in self._notes:
                reason += "; " + self._notes[layer.name]
            if sink is not None:
                what = "factors" if path == "factored" else "rows"
                per = sink.bytes_per_sample.get(layer.name)
                reason += (f"; {what} gathered over {sink.replicas} replicas "
                           f"({'?' if per is None else per} bytes per sample)")
            records.append(LayerRecord(layer.name, type(layer).__name__, common, reason,
                                       sum(int(np.prod(v.shape)) for v in owned
                                           if id(v) not in self._excluded), len(calls)))
            layer_grams[layer.name] = contribution
            gram = contribution if gram is None else gram + contribution
            for v, g in zip(owned, grads):
                grads_by_id[id(v)] = tf.cast(g, v.dtype)
        self._gathered = None if sink is None else dict(sink.bytes_per_sample)
        return gram, grads_by_id, rows, layer_grams, records

    def _layer_partial(self, layer, rule, calls, per_call, sink):
        """A layer with only some of its variables in ``params``: its per-sample blocks, the
        rows of the selected variables only (batch gradients of all of them)."""
        keep = self._partial[id(layer)]
        if rule is GENERIC:
            rows, grads = generic.rows_and_grads(self._tape, layer, calls, per_call, self._cast_t,
                                                 keep)
            path = "generic"
        else:
            blocks = None
            for capture, ds in per_call:
                b = rule.per_sample(layer, capture, ds)
                blocks = b if blocks is None else [x + y for x, y in zip(blocks, b)]
            rows = tf.concat([kernels.flat_rows(b) for v, b in zip(rule.variables(layer), blocks)
                              if id(v) in keep], axis=1)
            grads, path = [tf.reduce_sum(b, 0) for b in blocks], "materialised"
        gram = kernels.gram_of_rows(rows) if sink is None else sink.add_rows(layer.name, rows)
        return gram, grads, path

    def _layer_mirrored(self, layer, rule, calls, per_call, sink):
        """One layer's global block under a multi-replica strategy: gathered factors where its
        rule has them and they are the smaller operand, else gathered rows."""
        if rule is GENERIC:
            rows, grads = generic.rows_and_grads(self._tape, layer, calls, per_call, self._cast_t)
            return sink.add_rows(layer.name, rows), grads, "generic"
        strategy = self._strategy(layer.name)
        if len(per_call) == 1 and strategy != "materialize":
            out = rule.mirrored(layer, *per_call[0], sink, strategy=strategy)
            if out is not None:
                return out
        blocks = None
        for capture, ds in per_call:
            b = rule.per_sample(layer, capture, ds)
            blocks = b if blocks is None else [x + y for x, y in zip(blocks, b)]
        rows = tf.concat([kernels.flat_rows(b) for b in blocks], axis=1)
        return sink.add_rows(layer.name, rows), [tf.reduce_sum(b, 0) for b in blocks], "materialised"

    def _check_rows(self, target, claimed, grads_by_id):
        variables = list(claimed.values())
        plain = self._tape.gradient(target, variables)
        pairs = [(v, tf.convert_to_tensor(g), grads_by_id.get(id(v))) for v, g in zip(variables, plain)
                 if g is not None and grads_by_id.get(id(v)) is not None]
        # one scale for all variables: a gradient that is zero up to rounding is not a miss
        scale = max([float(tf.reduce_max(tf.abs(g))) for _, g, _ in pairs] + [0.0])
        bad = []
        for v, g, ours in pairs:
            eps = 1e-4 if g.dtype in (tf.float32, tf.float16, tf.bfloat16) else 1e-9
            if float(tf.reduce_max(tf.abs(tf.cast(ours, g.dtype) - g))) > eps * scale + 1e-30:
                bad.append(v.path if hasattr(v, "path") else v.name)
        if bad:
            raise ValueError(
                "the per-sample rows of a layer must sum to its batch gradient; received "
                f"variables read outside the call of the layer that owns them: {bad} (tied "
                "weights?). Register a rule for the layer that reads them "
                "(register_layer_rule), or leave them out of G with GramTape(..., params=...)."
            )

    def _cast_t(self, t):
        if self.dtype is not None and t.dtype.is_floating and t.dtype != self.dtype:
            return tf.cast(t, self.dtype)
        return t

    def _cast(self, capture):
        return {k: (self._cast_t(v) if isinstance(v, tf.Tensor) else v) for k, v in capture.items()}

    def _layer(self, layer, rule, calls, per_call):
        if rule is GENERIC:
            return generic.gram_and_grads(self._tape, layer, calls, per_call, self._cast_t)
        if len(per_call) == 1:
            strategy = self._strategy(layer.name)
            if strategy == "materialize":
                return registry.LayerRule.gram_and_grads(rule, layer, *per_call[0])
            if strategy == "factored":
                out = rule.factored(layer, *per_call[0])
                if out is not None:
                    return out
            return rule.gram_and_grads(layer, *per_call[0])
        blocks = None
        for capture, ds in per_call:  # a layer called several times: sum per-sample blocks
            b = rule.per_sample(layer, capture, ds)
            blocks = b if blocks is None else [x + y for x, y in zip(blocks, b)]
        rows = tf.concat([kernels.flat_rows(b) for b in blocks], axis=1)
        return kernels.gram_of_rows(rows), [tf.reduce_sum(b, 0) for b in blocks], "materialised"
