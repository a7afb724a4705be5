"""GramTape: a ``tf.GradientTape`` that also returns the per-sample Gram of the step.

Inside the context every trainable Keras layer's ``call`` is temporarily replaced (on the
instance, for the duration of the ``with`` block) by a recorder: registered layers run their
rule's forward and keep the tensors the rule needs, other layers with own trainable
variables run unchanged and keep their outputs for the exact generic path. One backward
to the recorded pre-activation outputs then yields, per layer, the Gram contribution *and*
the batch weight gradient (the weight gradient is never computed twice).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

from fimcore.layers import LayerRecord, PerLayerSink, Report, check_strategy

from .._compat import LegacyReportList, deprecated
from .._fisher import check_fisher_options
from . import _linalg, _rules, _sampled
from ._norms import _AffineNormRule

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


class _Generic(_rules.LayerRule):
    """Exact fallback for layers without a rule: the rows of a layer's own variables θ are
    :math:`\\partial_\\theta \\sum_t y_{it}\\cdot\\delta_{it}` (y its outputs, δ their loss
    gradient held fixed), taken with ``GradientTape.jacobian`` through the recorded forward."""

    name = "generic"

    def variables(self, layer):
        return _rules.own_trainable_variables(layer)

    def forward(self, layer, call, args, kwargs):
        out = call(*args, **kwargs)
        return out, generic_capture(out, call, args, kwargs)


def _float_tensors(out):
    return [t for t in tf.nest.flatten(out) if isinstance(t, tf.Tensor) and t.dtype.is_floating]


def generic_capture(out, call, args, kwargs):
    """What the generic path keeps of one call: its floating outputs, and the call itself with
    its arguments (re-run with inputs held fixed when the layer is called more than once)."""
    return {"watch": _float_tensors(out), "rerun": (call, args, kwargs)}


GENERIC = _Generic()


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


def _layer_selector(layers) -> Callable[[Any], bool]:
    if layers is None:
        return lambda layer: True
    if callable(layers):
        return layers
    names = {x for x in layers if isinstance(x, str)}
    ids = {id(x) for x in layers if not isinstance(x, str)}
    return lambda layer: layer.name in names or id(layer) in ids


class GramTape:
    r"""A gradient tape that returns the batch gradients *and* the per-sample Gram ``G = J Jᵀ``.

    Rows of J are B × each sample's contribution to the gradient of the batch loss
    (``loss_reduction="mean"``), so :math:`\mathbf 1^\top G \mathbf 1 = B^2\|\nabla L\|^2`.
    Works eagerly and inside ``tf.function`` / a Keras ``train_step`` (also under XLA);
    the Gram stays a (B, B) tensor on the step's device.

    Args:
        model: a built Keras model (or layer) whose layers are called inside the block.
        params: which layers' variables enter G (the columns of J): None (all trainable), a
            list of layers or layer names, or a predicate ``layer -> bool``. Other variables
            still get their ordinary gradient.
        strategy: ``"auto"`` (registered rules, each choosing its cheaper exact form by its
            cost model; the generic path for layers without a rule), ``"factored"`` or
            ``"materialize"`` (forced on every layer whose rule has both forms),
            ``"generic"`` (every layer through the generic ``GradientTape.jacobian`` path; a
            reference), or a dict ``{layer name: strategy}`` with ``"auto"`` elsewhere.
        keep_blocks: also keep each layer's own block :math:`J_l J_l^\top` of G
            (:meth:`blocks`, :meth:`result`); G is then their sum, so they add up to it exactly.
        dtype: dtype of the Gram (factors are cast before the products); default the
            per-sample gradients' dtype.
        layers: deprecated spelling of ``params``.
        mode: deprecated spelling of ``strategy`` (``"registry"`` is ``"auto"``).

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
                 dtype=None, layers=None, mode: str | None = None) -> None:
        check_built(model)
        params, strategy = resolve_options(params, strategy, layers, mode, where="GramTape")
        if not isinstance(keep_blocks, bool):
            raise ValueError(f"keep_blocks must be True or False; received {keep_blocks!r}.")
        self.model = model
        self.strategy = strategy
        self._default, self._strategies = check_strategy(strategy)
        self.keep_blocks = keep_blocks
        self.dtype = tf.as_dtype(dtype) if dtype is not None else None
        self._select = _layer_selector(params)
        self._tape: tf.GradientTape | None = None
        self._records: list[tuple[Any, _rules.LayerRule, dict]] = []
        self._patched: list[Any] = []
        self._recording = False
        self._rows: list[tuple[str, str, str]] = []
        self._layer_records: list[LayerRecord] = []
        self._last: dict | None = None
        self.layer_grams: dict[str, Any] = {}
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
        for layer in self.model._flatten_layers(include_self=True, recursive=True):
            own = _rules.own_trainable_variables(layer)
            if not own:
                continue
            if not self._select(layer):
                excluded.update(id(v) for v in own)
                continue
            rule = _rules.rule_for(layer) if self._strategy(layer.name) != "generic" else None
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
                ``"mean"`` so that they are per-sample gradients, not 1/B of them.
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
                that a rule covers this is detected with ``check=True``, eagerly).
            TypeError: on a non-floating loss.
        """
        check_fisher_options(fisher, mc_samples,
                             None if isinstance(seed, tf.random.Generator) else seed)
        if fisher == "sampled" and outputs is None:
            raise ValueError("fisher='sampled' draws labels from the model output; received "
                             "outputs=None. Pass outputs=y_pred, the model(x) computed in the block")
        if fisher == "sampled":
            _sampled.resolve_likelihood(loss_fn)     # refuse before any work
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
                      _rules.own_trainable_variables(layer)):
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
        batch = tf.shape(watched[0])[0]
        gram, grads_by_id, rows, self.layer_grams, records = self._contributions(by_layer, starts, deltas)
        if fisher == "sampled":
            self.empirical_gram = gram * (tf.cast(batch, gram.dtype) ** 2
                                          if loss_reduction == "mean" else 1)
            cots, self.sampled_labels = _sampled.output_cotangents(
                outputs, _sampled.resolve_likelihood(loss_fn), mc_samples, loss_reduction, seed)
            total, per_layer = None, {}
            for k in range(mc_samples):
                found_k = self._tape.gradient(outputs, watched,
                                              output_gradients=tf.cast(cots[k], outputs.dtype))
                deltas_k = [tf.zeros_like(t) if d is None else d for t, d in zip(watched, found_k)]
                g_k, _, _, lg_k, _ = self._contributions(by_layer, starts, deltas_k)
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
                      "num_params": sum(int(np.prod(v.shape)) for v in claimed.values()),
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

    def _contributions(self, by_layer, starts, deltas):
        """Per layer: its Gram contribution and batch gradients, from the output cotangents
        (``starts``: where each call's watched outputs begin in ``deltas``, in call order)."""
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
                contribution, grads, path = self._layer(layer, rule, calls, per_call)
            rows.append((layer.name, type(layer).__name__, path))
            owned = rule.variables(layer)
            common = ("norm" if isinstance(rule, _AffineNormRule) and path == "materialised"
                      else _PATHS.get(path, path))
            records.append(LayerRecord(layer.name, type(layer).__name__, common,
                                       f"{rule.name} rule: {path}" if rule is not GENERIC else
                                       "GradientTape.jacobian of the layer's own outputs",
                                       sum(int(np.prod(v.shape)) for v in owned), len(calls)))
            layer_grams[layer.name] = contribution
            gram = contribution if gram is None else gram + contribution
            for v, g in zip(owned, grads):
                grads_by_id[id(v)] = tf.cast(g, v.dtype)
        return gram, grads_by_id, rows, layer_grams, records

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
            return self._generic(layer, calls, per_call)
        if len(per_call) == 1:
            strategy = self._strategy(layer.name)
            if strategy == "materialize":
                return _rules.LayerRule.gram_and_grads(rule, layer, *per_call[0])
            if strategy == "factored":
                out = rule.factored(layer, *per_call[0])
                if out is not None:
                    return out
            return rule.gram_and_grads(layer, *per_call[0])
        blocks = None
        for capture, ds in per_call:  # a layer called several times: sum per-sample blocks
            b = rule.per_sample(layer, capture, ds)
            blocks = b if blocks is None else [x + y for x, y in zip(blocks, b)]
        rows = tf.concat([_linalg.flat_rows(b) for b in blocks], axis=1)
        return _linalg.gram_of_rows(rows), [tf.reduce_sum(b, 0) for b in blocks], "materialised"

    def _generic(self, layer, calls, per_call):
        own = _rules.own_trainable_variables(layer)
        with self._tape:  # re-enter the persistent tape: s_i = Σ_t y_it·δ_it
            s = None
            for (_, _, capture), (_, ds) in zip(calls, per_call):
                outputs = capture["watch"]
                if len(calls) > 1:
                    # a later call's input may depend on an earlier call's output, hence on θ:
                    # δ already carries that path, so differentiate each call with its inputs fixed
                    call, args, kwargs = capture["rerun"]
                    fixed = tf.nest.map_structure(
                        lambda t: tf.stop_gradient(t) if isinstance(t, tf.Tensor) else t, (args, kwargs))
                    outputs = _float_tensors(call(*fixed[0], **fixed[1]))
                for y, d in zip(outputs, ds):
                    term = y * tf.stop_gradient(tf.cast(d, y.dtype))
                    term = tf.reduce_sum(tf.reshape(term, tf.stack([tf.shape(term)[0], -1])), axis=1)
                    s = term if s is None else s + term
        blocks = self._tape.jacobian(s, own, unconnected_gradients=tf.UnconnectedGradients.ZERO,
                                     experimental_use_pfor=True)
        blocks = [self._cast_t(b) for b in blocks]
        rows = tf.concat([_linalg.flat_rows(b) for b in blocks], axis=1)
        return _linalg.gram_of_rows(rows), [tf.reduce_sum(b, 0) for b in blocks], "generic"
