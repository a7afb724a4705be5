"""Keras integration: a ``train_step`` that returns the Gram every n-th step, and callbacks.

The Gram is formed inside the compiled step (``tf.function``, XLA allowed); the callback
turns it into measures on the host with :class:`fimcore.MeasureTracker` (the core does not
run inside a compiled function) and writes ``c_k``, ``I_k``, ``C_bar``, ``L`` into the logs
that ``fit`` hands to its ``History``.
"""

from __future__ import annotations


import keras
import numpy as np
import tensorflow as tf

from .functional import _KERAS_REDUCTIONS
from .recorder import GramTape, check_memory_budget, resolve_options

GRAM_KEYS = ("fimcore_gram", "fimcore_measured", "fimcore_lr", "fimcore_blocks")


class GramStepMixin:
    """Mixin for ``keras.Model`` subclasses whose ``train_step`` also returns the Gram.

    Every ``gram_every``-th step (within-epoch index n with n % gram_every == 0, the counter
    being reset by :class:`GramMeasureCallback` at each epoch) the step runs under a
    :class:`GramTape`: one forward, one backward, the optimizer update from the same
    gradients, and extra logs ``fimcore_gram`` (B×B), ``fimcore_measured`` and ``fimcore_lr``
    (the learning rate in force). Other steps run the plain step. Regularisation losses
    enter the gradients, not J. Place it before ``keras.Model`` in the bases:
    ``class Net(GramStepMixin, keras.Model): ...``; set options with :meth:`set_gram_options`.
    """

    gram_every = 1
    gram_params = None
    gram_dtype = None
    gram_memory_budget = None
    gram_strategy = "auto"
    gram_keep_blocks = False
    gram_fisher = "empirical"

    def set_gram_options(self, *, every: int = 1, params=None, strategy="auto", dtype=None,
                         memory_budget: int | None = None,
                         layers=None, mode: str | None = None, keep_blocks: bool = False,
                         fisher: str = "empirical", mc_samples: int = 1, seed: int | None = None,
                         likelihood=None):
        """Measure every ``every`` steps over ``params`` with ``strategy`` and ``memory_budget``
        (see :class:`GramTape`;
        ``layers`` and ``mode`` are their deprecated spellings); with
        ``keep_blocks`` the step also logs the per-layer Grams (``fimcore_blocks``, (n, B, B)),
        which the ``per_layer`` statistic of :class:`GramMeasureCallback` reads.

        ``fisher="sampled"`` logs the sampled-label Gram instead (labels drawn from the model,
        ``mc_samples`` draws from a ``tf.random.Generator`` seeded with ``seed``, one more
        backward per draw; the optimizer still gets the data-label gradients). The likelihood is
        read from the compiled loss (a Keras cross-entropy with ``from_logits=True`` or
        ``MeanSquaredError``) unless ``likelihood`` (``"cross_entropy"``/``"mse"``) is given."""
        from .._fisher import check_fisher_options

        if not isinstance(keep_blocks, bool):
            raise ValueError(f"keep_blocks must be True or False; received {keep_blocks!r}")
        check_fisher_options(fisher, mc_samples, seed)
        object.__setattr__(self, "gram_keep_blocks", keep_blocks)
        object.__setattr__(self, "gram_fisher", fisher)
        object.__setattr__(self, "gram_mc_samples", mc_samples)
        object.__setattr__(self, "gram_likelihood", likelihood)
        generator = None
        if fisher == "sampled":
            generator = (tf.random.Generator.from_seed(seed) if seed is not None else
                         tf.random.Generator.from_non_deterministic_state())
        object.__setattr__(self, "_fimcore_generator", generator)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int; received {every!r}. Use 1 to "
                             "measure every step, 50 for the paper's sampling.")
        params, strategy = resolve_options(params, strategy, layers, mode, where="set_gram_options")
        object.__setattr__(self, "gram_every", every)
        object.__setattr__(self, "gram_params", params)
        object.__setattr__(self, "gram_dtype", dtype)
        object.__setattr__(self, "gram_memory_budget", check_memory_budget(memory_budget))
        object.__setattr__(self, "gram_strategy", strategy)
        return self

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        if getattr(self, "_fimcore_counter", None) is None:
            object.__setattr__(self, "_fimcore_counter",
                               tf.Variable(0, dtype=tf.int64, trainable=False, name="fimcore_step",
                                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA))
        object.__setattr__(self, "_fimcore_grad_dtype", None)
        object.__setattr__(self, "_fimcore_gram_dtype", None)

    def _gram_loss_reduction(self) -> str:
        loss = getattr(self, "loss", None)
        if isinstance(loss, keras.losses.Loss):
            return _KERAS_REDUCTIONS.get(loss.reduction, "mean")
        return "mean"

    @tf.autograph.experimental.do_not_convert
    def _one_step(self, x, y, sample_weight, with_gram: bool):
        variables = self.trainable_variables
        split = type(self).compute_loss is keras.Model.compute_loss and self._compile_loss is not None
        context = (GramTape(self, params=self.gram_params, dtype=self.gram_dtype,
                            strategy=self.gram_strategy, memory_budget=self.gram_memory_budget)
                   if with_gram else tf.GradientTape())
        with context as tape:
            y_pred = self(x, training=True) if self._call_has_training_arg else self(x)
            if split:
                data_loss = self._compile_loss(y, y_pred, sample_weight)
                extra = [tf.cast(self._aggregate_additional_loss(v), data_loss.dtype)
                         for v in self.losses]
                extra = tf.add_n(extra) if extra else None
            else:
                data_loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                               sample_weight=sample_weight, training=True)
                extra = None
            total = data_loss if extra is None else data_loss + extra
        batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        # Keras losses are divided by the replica count under a strategy; the tracker shows the mean
        self._loss_tracker.update_state(total * replicas if replicas > 1 else total,
                                        sample_weight=batch)
        lr = tf.cast(self.optimizer.learning_rate, tf.float64)
        if with_gram:
            reduction = self._gram_loss_reduction() if split else "mean"
            sampled = {}
            if self.gram_fisher == "sampled":
                sampled = dict(fisher="sampled", outputs=y_pred, mc_samples=self.gram_mc_samples,
                               loss_fn=self.gram_likelihood or getattr(self, "loss", None),
                               seed=self._fimcore_generator)
            grads, gram = tape.gradient_and_gram(data_loss, variables, loss_reduction=reduction,
                                                 extra_loss=extra, **sampled)
            object.__setattr__(self, "_fimcore_grad_dtype", tape.grad_dtype.name)
            # the logs carry G as float64; the host casts it back to this (exact round trip), so
            # the core sees the dtype G was accumulated in (its symmetry and rank tolerances)
            object.__setattr__(self, "_fimcore_gram_dtype", gram.dtype.name)
            if self.gram_keep_blocks:            # names fixed at trace time; blocks scaled like G
                scale = (tf.cast(tf.shape(gram)[0], tf.float64) ** 2  # B: global under a strategy
                         if reduction == "mean" else 1.0)
                object.__setattr__(self, "_fimcore_block_names", list(tape.layer_grams))
                object.__setattr__(self, "_fimcore_blocks", tf.stack(
                    [tf.cast(b, tf.float64) * scale for b in tape.layer_grams.values()]))
        else:
            grads = tape.gradient(total, variables)
            gram = None
        self.optimizer.apply_gradients(zip(grads, variables))
        logs = dict(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))
        return logs, gram, lr, batch

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        counter = getattr(self, "_fimcore_counter", None)
        if counter is None:
            raise ValueError("compile() the model before training; the Gram step counter is "
                             "created by GramStepMixin.compile.")
        measure = tf.equal(counter % self.gram_every, 0)
        counter.assign_add(1)

        def with_gram():
            logs, gram, lr, _ = self._one_step(x, y, sample_weight, True)
            out = {**logs, "fimcore_gram": tf.cast(gram, tf.float64),
                   "fimcore_measured": tf.constant(1.0, tf.float64), "fimcore_lr": lr}
            if self.gram_keep_blocks:
                out["fimcore_blocks"] = self._fimcore_blocks
            return out

        def plain():
            logs, _, lr, batch = self._one_step(x, y, sample_weight, False)
            out = {**logs, "fimcore_gram": tf.zeros(tf.stack([batch, batch]), tf.float64),
                   "fimcore_measured": tf.constant(0.0, tf.float64), "fimcore_lr": lr}
            if self.gram_keep_blocks:           # the measured branch is traced first
                n = len(self._fimcore_block_names)
                out["fimcore_blocks"] = tf.zeros(tf.stack([n, batch, batch]), tf.float64)
            return out

        if self.gram_every == 1:
            return with_gram()
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            raise ValueError(
                f"under a tf.distribute strategy with {replicas} replicas the Gram is measured on "
                f"every step; received every={self.gram_every}. The all-gather of the global Gram "
                "and the optimizer's gradient all-reduce are synchronisation points that cannot sit "
                "inside a branch taken every n-th step. Use GramModel(..., every=1) under the "
                "strategy, or a custom loop that runs GramTape only on the steps to measure.")
        return tf.cond(measure, with_gram, plain)


class GramModel(GramStepMixin, keras.Model):
    """Wrap a built Keras model so that ``fit`` also returns the Gram every ``every`` steps.

    Args:
        model: the built model to train (its layers and variables are used as they are).
        every: measure the within-epoch steps n with n % every == 0.
        params, strategy, dtype, memory_budget: as for :class:`GramTape` (``layers``,
            ``mode``: their deprecated spellings).
        keep_blocks, fisher, mc_samples, seed, likelihood: see :meth:`set_gram_options`.

    Under ``strategy.scope()`` of a multi-replica ``tf.distribute`` strategy, ``fit`` runs the
    train step per replica and the logged Gram is that of the global batch (see
    :class:`GramTape`); there ``every`` must be 1 (the all-gather cannot sit in the branch of an
    every-n-th step).

    Example:
        >>> import numpy as np, keras
        >>> from fimcore_adapters.tensorflow import GramModel, GramMeasureCallback
        >>> net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> model = GramModel(net, every=2)
        >>> model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        >>> x, y = np.ones((8, 3), "float32"), np.zeros((8, 2), "float32")
        >>> h = model.fit(x, y, batch_size=4, epochs=2, verbose=0,
        ...               callbacks=[GramMeasureCallback()])
        >>> sorted(k for k in h.history if k in ("c_k", "I_k", "C_bar", "L"))
        ['C_bar', 'I_k', 'L', 'c_k']
    """

    def __init__(self, model, *, every: int = 1, params=None, strategy="auto", dtype=None,
                 memory_budget: int | None = None,
                 layers=None, mode: str | None = None, keep_blocks: bool = False,
                 fisher: str = "empirical", mc_samples: int = 1, seed: int | None = None,
                 likelihood=None, **kwargs):
        super().__init__(**kwargs)
        if not getattr(model, "built", False):
            raise ValueError(
                f"model {getattr(model, 'name', model)!r} must be built before wrapping; "
                "received an unbuilt model. Give it an Input or call model.build(input_shape)."
            )
        self.inner = model
        self.set_gram_options(every=every, params=params, strategy=strategy, dtype=dtype,
                              memory_budget=memory_budget, layers=layers, mode=mode,
                              keep_blocks=keep_blocks, fisher=fisher,
                              mc_samples=mc_samples, seed=seed, likelihood=likelihood)
        self.built = True

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)


class GramMeasureCallback(keras.callbacks.Callback):
    """Feed the Grams of a :class:`GramStepMixin` model to a :class:`fimcore.MeasureTracker`.

    On each measured step it calls ``tracker.update(G, lr=α_k, weight=w_k, batch_size=B_k,
    grad_dtype=...)`` with :math:`w_k` the iterations the measurement stands for (itself and
    the unmeasured steps up to the next measurement or the epoch's end), removes the Gram from
    the logs, adds ``c_k``, ``I_k``, ``C_bar``, ``L`` (and ``C_bar_jacobian``) to the batch
    logs and puts the epoch's last values into the epoch logs (so into ``History``; NaN
    when undefined). Put it before other callbacks that read the logs.

    Args:
        tracker: a :class:`fimcore.MeasureTracker` (default: a new one with ``rtol``,
            ``on_nonfinite`` and ``statistics``); it persists across ``fit`` calls.
        statistics: extra statistics of :mod:`fimcore.stats` for a new tracker: a comma list or
            iterable of names or record fields (``"noise_scale,norm_test,stable_rank"``,
            ``"all"``; see :func:`fimcore.stats.statistics_from_names`) or Statistic instances.
            Every scalar field they record is added to the logs under its field name (NaN when
            undefined), for every statistic the tracker holds; ``per_layer`` adds
            ``per_layer/<layer>/<measure>`` from the per-layer Grams of the step. P for the
            Fisher-spectrum fields is the model's trainable parameter count.

    Raises:
        TypeError: when the model does not use :class:`GramStepMixin`.
        ValueError: when ``steps_per_execution`` > 1 (only the last step's logs would reach
            the host).
    """

    def __init__(self, tracker=None, *, rtol=None, on_nonfinite: str = "raise",
                 statistics=None) -> None:
        super().__init__()
        import fimcore

        if tracker is not None and statistics is not None:
            raise ValueError("statistics= configures a new tracker; received both tracker= and "
                             "statistics=. Build the tracker with MeasureTracker(statistics=...) or "
                             "drop tracker=")
        if tracker is None:
            extra = ()
            if statistics is not None:
                given = [statistics] if isinstance(statistics, fimcore.stats.Statistic) else statistics
                if isinstance(given, str) or all(isinstance(g, str) for g in given):
                    extra = fimcore.stats.statistics_from_names(given)
                else:
                    extra = tuple(given)
            if extra:
                base = (fimcore.stats.DEFAULT if rtol is None else
                        (fimcore.stats.Condition(rtol=rtol), fimcore.stats.Energy()))
                tracker = fimcore.MeasureTracker(on_nonfinite=on_nonfinite, statistics=(*base, *extra))
            else:
                tracker = fimcore.MeasureTracker(rtol=rtol, on_nonfinite=on_nonfinite)
        self.tracker = tracker
        self.last = None
        self._pending = None

    def on_train_begin(self, logs=None):
        if not isinstance(self.model, GramStepMixin):
            raise TypeError(
                "GramMeasureCallback needs a model whose train_step returns the Gram; received "
                f"{type(self.model).__name__}. Wrap it: GramModel(model, every=...), or mix "
                "GramStepMixin into its class."
            )
        if (any(s.name == "per_layer" for s in self.tracker.statistics)
                and not self.model.gram_keep_blocks):
            raise ValueError("the per_layer statistic needs the per-layer Grams of each measured step; "
                             "received a model that does not log them. Build it with "
                             "GramModel(model, keep_blocks=True) or call "
                             "set_gram_options(keep_blocks=True)")
        spe = getattr(self.model, "steps_per_execution", 1)
        if int(spe) != 1:
            raise ValueError(
                f"steps_per_execution must be 1 for per-step measures; received {spe}. "
                "Compile with steps_per_execution=1."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self.model._fimcore_counter.assign(0)
        self._pending, self._last_batch = None, -1
        self._epoch_last = None

    def _update(self, gram, lr, weight, blocks=None):
        grad_dtype = getattr(self.model, "_fimcore_grad_dtype", None)
        num_params = int(sum(np.prod(v.shape) for v in self.model.trainable_variables))
        self.last = self.tracker.update(gram, lr=lr, weight=weight, batch_size=gram.shape[0],
                                        grad_dtype=np.dtype(grad_dtype) if grad_dtype else None,
                                        num_params=num_params, blocks=blocks)
        self._epoch_last = self.last

    def _measures(self):
        m = self._epoch_last
        nan = float("nan")
        if m is None:
            return {}
        out = {"c_k": nan if m.c_k is None else m.c_k, "I_k": nan if m.I_k is None else m.I_k,
               "C_bar": nan if m.C_bar is None else m.C_bar, "L": m.L,
               "C_bar_jacobian": nan if m.C_bar_jacobian is None else m.C_bar_jacobian}
        for name, fields in m.values.items():
            if name in ("condition", "energy"):
                continue
            for field, value in fields.items():
                if isinstance(value, dict):          # per_layer: {layer: {measure: value}}
                    for layer, measures in value.items():
                        for measure, v in measures.items():
                            out[f"{field}/{layer}/{measure}"] = nan if v is None else float(v)
                else:
                    out[field] = nan if value is None else float(value)
        return out

    def on_train_batch_end(self, batch, logs=None):
        logs = logs if logs is not None else {}
        gram = logs.pop("fimcore_gram", None)
        measured = logs.pop("fimcore_measured", 0.0)
        lr = logs.pop("fimcore_lr", None)
        stacked = logs.pop("fimcore_blocks", None)
        self._last_batch = batch
        if not measured or gram is None:
            return
        acc = np.dtype(getattr(self.model, "_fimcore_gram_dtype", None) or "float64")
        gram = np.asarray(gram).astype(acc)
        blocks = None
        if stacked is not None:
            blocks = dict(zip(self.model._fimcore_block_names, np.asarray(stacked).astype(acc)))
        steps = (self.params or {}).get("steps")
        every = self.model.gram_every
        if steps:
            self._update(gram, float(lr), min(every, steps - batch), blocks)
        else:  # unknown epoch length: weight known at the next measurement or epoch end
            self._flush(batch)
            self._pending = (gram, float(lr), batch, blocks)
        logs.update(self._measures())

    def _flush(self, end):
        if self._pending is not None:
            gram, lr, start, blocks = self._pending
            self._pending = None
            self._update(gram, lr, max(end - start, 1), blocks)

    def on_epoch_end(self, epoch, logs=None):
        self._flush(self._last_batch + 1)
        if logs is not None:
            for key in GRAM_KEYS:
                logs.pop(key, None)
            logs.update(self._measures())


class StagedBatchSize(keras.callbacks.Callback):
    """Apply a :class:`fimcore.StagedBatchSchedule` between epochs.

    Keras ``fit`` fixes the batch size of one call, so the switch is a loop of ``fit``
    calls, one per stage (:func:`fit_staged` runs it): this callback stops ``fit`` after
    the last epoch of a stage, records ``batch_size`` and ``stage`` in the epoch logs, and
    tells the loop the next epoch and batch size. Model, optimizer state, BatchNorm
    statistics and trackers carry over unchanged, as in the paper's stop-and-resume runs.

    The callback cannot see the batch size ``fit`` uses (Keras does not pass it to
    callbacks): batch the data with :attr:`batch_size` before each ``fit`` call.
    """

    def __init__(self, schedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.next_epoch = 0
        self.stage_end = False

    @property
    def batch_size(self) -> int:
        """Batch size for ``next_epoch``."""
        return self.schedule.batch_size(self.next_epoch)

    @property
    def done(self) -> bool:
        """Whether every epoch of the schedule has run."""
        return self.next_epoch >= self.schedule.total_epochs

    def on_train_begin(self, logs=None):
        self.stage_end = False

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["batch_size"] = float(self.schedule.batch_size(epoch))
            logs["stage"] = float(self.schedule.stage(epoch))
        self.next_epoch = epoch + 1
        if not self.done and self.schedule.batch_size(epoch + 1) != self.schedule.batch_size(epoch):
            self.stage_end = True
            self.model.stop_training = True


def fit_staged(model, x, y=None, *, schedule, callbacks=(), **fit_kwargs):
    """Train with a :class:`fimcore.StagedBatchSchedule`: one ``model.fit`` per stage.

    Args:
        model: a compiled Keras model.
        x: arrays (batched by ``fit`` with the stage's ``batch_size``), or an **unbatched**
            ``tf.data.Dataset`` (re-batched per stage; shuffle it before passing, e.g.
            ``ds.shuffle(n, reshuffle_each_iteration=True)``).
        y: targets when ``x`` is an array.
        schedule: the batch-size schedule; its ``total_epochs`` is the number of epochs.
        callbacks: further callbacks (e.g. :class:`GramMeasureCallback`), shared by all stages.
        **fit_kwargs: passed to every ``fit`` call (not ``epochs``/``initial_epoch``/``batch_size``).

    Returns:
        ``keras.callbacks.History`` whose ``history`` spans all epochs (with ``batch_size`` and
        ``stage`` per epoch).

    Raises:
        ValueError: when ``fit_kwargs`` sets ``epochs``, ``initial_epoch`` or ``batch_size``.
    """
    for key in ("epochs", "initial_epoch", "batch_size"):
        if key in fit_kwargs:
            raise ValueError(f"fit_staged sets {key} from the schedule; received {key}="
                             f"{fit_kwargs[key]!r}. Remove it (the schedule has total_epochs).")
    stages = StagedBatchSize(schedule)
    return _fit_in_stages(model, x, y, stages, schedule.total_epochs, [stages, *callbacks], fit_kwargs)


def _fit_in_stages(model, x, y, stages, total_epochs, callbacks, fit_kwargs):
    """One ``fit`` per batch size: ``stages`` (``batch_size``, ``done``, ``next_epoch``,
    ``stage_end``) stops each call where the size changes; the histories are merged."""
    merged = keras.callbacks.History()
    merged.history = {}
    merged.epoch = []
    dataset = isinstance(x, tf.data.Dataset)
    while not stages.done:
        size = stages.batch_size
        data = x.batch(size) if dataset else x
        extra = {"shuffle": False} if dataset and "shuffle" not in fit_kwargs else {}
        if not dataset:
            extra["batch_size"] = size
        history = model.fit(data, y, initial_epoch=stages.next_epoch, epochs=total_epochs,
                            callbacks=list(callbacks), **extra, **fit_kwargs)
        for key, values in history.history.items():
            merged.history.setdefault(key, []).extend(values)
        merged.epoch.extend(history.epoch)
        if not stages.stage_end:  # stopped by another callback (or finished)
            break
    merged.set_model(model)
    return merged


class PolicyBatchSize(keras.callbacks.Callback):
    """Let a :class:`fimcore.policy.BatchSizePolicy` set the batch size between epochs.

    Keras ``fit`` fixes the batch size of one call, so the policy's size changes at *epoch
    boundaries* (:func:`fit_policy` runs one ``fit`` per size): after each measured step the
    callback feeds the measurement of ``measures`` (a :class:`GramMeasureCallback`, which must
    run before it) to the policy; at the end of an epoch whose policy size differs from the one
    ``fit`` is using, it stops ``fit``, and the loop continues at the new size. The epoch logs
    get ``batch_size`` (the size the epoch ran with). Model, optimizer and tracker carry over.

    Args:
        policy: the :class:`fimcore.policy.BatchSizePolicy`.
        measures: the :class:`GramMeasureCallback` whose tracker holds the statistics the
            policy's rule reads (e.g. ``fimcore.stats.BatchTests()`` for ``NormTestRule``).
        epochs: the number of epochs in all.
    """

    def __init__(self, policy, measures: GramMeasureCallback, epochs: int) -> None:
        super().__init__()
        if not isinstance(measures, GramMeasureCallback):
            raise TypeError(f"measures must be a GramMeasureCallback; received {type(measures).__name__}")
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int; received {epochs!r}")
        self.policy, self.measures, self.total_epochs = policy, measures, epochs
        self.next_epoch = 0
        self.stage_end = False
        self._running = int(policy.batch_size)
        self._seen = None

    @property
    def batch_size(self) -> int:
        """Batch size for ``next_epoch`` (the policy's size in force)."""
        return int(self.policy.batch_size)

    @property
    def done(self) -> bool:
        return self.next_epoch >= self.total_epochs

    def on_train_begin(self, logs=None):
        self.stage_end = False
        self._running = self.batch_size

    def on_train_batch_end(self, batch, logs=None):
        last = self.measures.last
        if last is not None and last is not self._seen:
            self._seen = last
            self.policy.update(last)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["batch_size"] = float(self._running)
        self.next_epoch = epoch + 1
        if not self.done and self.batch_size != self._running:
            self.stage_end = True
            self.model.stop_training = True


def fit_policy(model, x, y=None, *, policy, measures: GramMeasureCallback, epochs: int,
               callbacks=(), **fit_kwargs):
    """Train with a batch-size policy: one ``model.fit`` per batch size, switching at epoch ends.

    Args:
        model: a compiled :class:`GramModel` (or a model with :class:`GramStepMixin`).
        x, y: as for :func:`fit_staged` (arrays, or an unbatched ``tf.data.Dataset``).
        policy: a :class:`fimcore.policy.BatchSizePolicy`; its initial size starts the run.
        measures: the :class:`GramMeasureCallback` feeding the policy (runs first).
        epochs: epochs in all.
        callbacks: further callbacks, shared by all ``fit`` calls.
        **fit_kwargs: passed to every ``fit`` call (not ``epochs``/``initial_epoch``/``batch_size``).

    Returns:
        ``keras.callbacks.History`` over all epochs, with ``batch_size`` per epoch.

    Raises:
        ValueError: when ``fit_kwargs`` sets ``epochs``, ``initial_epoch`` or ``batch_size``.
    """
    for key in ("epochs", "initial_epoch", "batch_size"):
        if key in fit_kwargs:
            raise ValueError(f"fit_policy sets {key} itself; received {key}={fit_kwargs[key]!r}. "
                             "Pass epochs= as its own argument and let the policy set the batch size.")
    stages = PolicyBatchSize(policy, measures, epochs)
    return _fit_in_stages(model, x, y, stages, epochs, [measures, stages, *callbacks], fit_kwargs)
