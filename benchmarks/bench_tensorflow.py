"""TensorFlow benchmark: a Keras ``train_step`` with the per-sample Gram G = J Jᵀ, against the plain one.

Run from the repository root::

    python -m benchmarks.bench_tensorflow            # full run, writes benchmarks/results/tensorflow.md
    python -m benchmarks.bench_tensorflow --quick    # B = 32 only, fewer repetitions, no memory

Models (Keras 3 on TensorFlow, float32, synthetic batches): MLP 784-512-256-10; the small CNN of
the PyTorch and JAX benchmarks (three 3×3 convolutions with 16/32/64 channels, each ReLU + 2×2 max
pool, dense head, 32×32×3 inputs, channels last). The plain step is Keras' own
``Model.train_step`` (mean cross-entropy, SGD) under ``tf.function`` (no XLA). The measured steps:

* ``registry`` — :class:`fimcore_adapters.tensorflow.GramModel` (``every=1``): the same step under
  a ``GramTape`` (factored dense layers, materialised per-layer conv gradients), one backward;
* ``registry-noeig`` — the same without the eigenvalue call: the cost of G alone;
* ``registry-async`` — the same with ``MeasureTracker(asynchronous=True).update`` of the Gram (c_k
  and I_k on a worker thread while the next step runs) instead of the spectrum call;
* ``generic`` — the same with ``strategy="generic"``: every layer through the exact per-layer
  ``GradientTape.jacobian`` (pfor) fallback;
* ``vectorized_map`` — what users can do today: ``tf.vectorized_map`` of the single-sample
  gradient, ``J Jᵀ`` over the concatenated per-sample gradients, SGD from their mean.

With ``--fisher empirical,sampled`` (or ``--fisher sampled`` alone, written to
``benchmarks/results/tensorflow_sampled.md`` by default) it also times, interleaved in one child
per (model, B), Keras' plain ``train_step``, the ``registry`` step (empirical Gram) and the same
step with ``GramModel(..., fisher="sampled", mc_samples=1, seed=0)`` (labels drawn from the
softmax of the logits, one more backward of them on the same tape), both with eigenvalues
(:mod:`benchmarks._sampled_rows`).

Each (but ``registry-noeig`` and ``registry-async``) then takes the eigenvalues of G on the host with
``fimcore.spectrum`` (float64; for ``registry`` of the Gram as a checked ``GramResult``, the lean path). Timing:
plain and method interleaved in one child process after a warm-up (tracing excluded), median of
paired ratios. Memory: a fresh child per configuration (``benchmarks._harness.step_memory``: peak
resident set over three steps minus the set before them).
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks import _harness as H
from benchmarks import _sampled_rows as R

MODELS = {"mlp": "MLP 784-512-256-10", "cnn": "small CNN (3 conv + dense, 32×32×3)"}
METHODS = {"registry": "fimcore `GramModel` (layer registry)",
           "registry-noeig": "fimcore `GramModel`, G without its eigenvalues",
           "registry-async": "fimcore `GramModel` + `MeasureTracker(asynchronous=True)`",
           "generic": "fimcore `GramModel(strategy='generic')` (per-layer jacobian)",
           "vectorized_map": "`tf.vectorized_map` per-sample grads + JJᵀ"}
TARGET = 1.3  # step with G and its eigenvalues / plain step, at B = 32 and 128 (earlier: 1.5 at B = 128)


def build(name, seed=0):
    """A built float32 Keras model."""
    import keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    if name == "mlp":
        return keras.Sequential([keras.Input((784,)), L.Dense(512, activation="relu"),
                                 L.Dense(256, activation="relu"), L.Dense(10)])
    layers = [keras.Input((32, 32, 3))]
    for c in (16, 32, 64):
        layers += [L.Conv2D(c, 3, padding="same", activation="relu"), L.MaxPooling2D(2)]
    return keras.Sequential([*layers, L.Flatten(), L.Dense(10)])


def _batch(name, batch_size, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (batch_size, 784) if name == "mlp" else (batch_size, 32, 32, 3)
    return rng.normal(size=shape).astype("float32"), rng.integers(0, 10, batch_size).astype("int32")


def _host_gram(logs):
    """The logged Gram as the float32 values it was accumulated in (exact: the log is their float64
    cast). ``fimcore.spectrum`` accepts a Gram's rounding asymmetry up to sqrt(eps) of its dtype:
    the float64 cast of a float32 Gram is asymmetric by up to ~1e-7·max|G| (measured: 1e-8 to
    1.5e-7 on these models at B = 32), above float64's sqrt(eps) = 1.5e-8, so it is refused as
    "not symmetric" although it is J Jᵀ rounded in float32."""
    import numpy as np

    return np.asarray(logs["fimcore_gram"]).astype(np.float32)


def _steps(name, batch_size, method):
    """Closures ``plain()`` and ``candidate()`` running one traced step each (results fetched)."""
    import keras
    import numpy as np
    import tensorflow as tf

    import fimcore
    from fimcore_adapters.tensorflow import GramModel

    x, y = _batch(name, batch_size)
    data = (tf.constant(x), tf.constant(y))

    def loss():
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    plain_model = build(name)
    plain_model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss(), jit_compile=False)
    plain_step = tf.function(plain_model.train_step)

    def plain():
        logs = plain_step(data)
        float(logs["loss"])

    if method in ("registry", "registry-noeig", "registry-async", "generic"):
        strategy = "generic" if method == "generic" else "auto"
        model = GramModel(build(name), every=1, strategy=strategy)
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss(), jit_compile=False)
        step = tf.function(model.train_step)
        tracker = fimcore.MeasureTracker(asynchronous=True) if method == "registry-async" else None

        def candidate():
            logs = step(data)
            gram = _host_gram(logs)
            if method == "generic":
                fimcore.spectrum(gram)
            elif not method.endswith("-noeig"):
                # the adapter's Σ J Jᵀ, marked as the tape's result() marks it: the core's lean path
                result = fimcore.GramResult(gram=gram, grad_dtype=np.float32, batch_size=batch_size,
                                            checked=True)
                if tracker is None:
                    fimcore.spectrum(result)
                else:
                    tracker.update(result, lr=0.01)

        return plain, candidate

    model = build(name)
    variables = model.trainable_variables
    per_sample_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

    @tf.function
    def vmap_step(x, y):
        def one(args):
            xi, yi = args
            with tf.GradientTape() as tape:
                li = per_sample_loss(yi[None], model(xi[None], training=True))[0]
            return tape.gradient(li, variables)

        blocks = tf.vectorized_map(one, (x, y))
        rows = tf.concat([tf.reshape(b, [tf.shape(b)[0], -1]) for b in blocks], axis=1)
        gram = tf.matmul(rows, rows, transpose_b=True)
        for v, b in zip(variables, blocks):
            v.assign_sub(0.01 * tf.reduce_mean(b, axis=0))
        return gram

    def candidate():
        fimcore.spectrum(np.asarray(vmap_step(*data), dtype=np.float64))

    return plain, candidate


def _sampled_steps(name, batch_size):
    """Closures ``plain()``, ``empirical()``, ``sampled()``: Keras' traced ``train_step`` and the
    traced ``GramModel`` steps with the empirical and the sampled-label (K = 1) Gram, each
    followed by the eigenvalues of its Gram on the host."""
    import keras
    import tensorflow as tf

    import fimcore
    from fimcore_adapters.tensorflow import GramModel

    x, y = _batch(name, batch_size)
    data = (tf.constant(x), tf.constant(y))

    def compiled(model):
        model.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
        return tf.function(model.train_step)

    plain_step = compiled(build(name))
    empirical_step = compiled(GramModel(build(name), every=1))
    sampled_step = compiled(GramModel(build(name), every=1, fisher="sampled", mc_samples=1, seed=0))

    def plain():
        float(plain_step(data)["loss"])

    def empirical():
        fimcore.spectrum(_host_gram(empirical_step(data)))

    def sampled():
        fimcore.spectrum(_host_gram(sampled_step(data)))

    return plain, empirical, sampled


def sampled_timing_job(model, batch_size, reps, cap_seconds):
    """Plain, empirical and sampled-label steps timed interleaved (tracing excluded)."""
    return R.time_steps(*_sampled_steps(model, batch_size), reps=reps, cap_seconds=cap_seconds)


def timing_job(model, batch_size, method, reps, cap_seconds):
    plain, candidate = _steps(model, batch_size, method)
    # the first call of each (tracing) stays outside the timed and capped repetitions
    return H.warm_then_time(plain, candidate, reps=reps, cap_seconds=cap_seconds,
                            min_rep_seconds=H.MIN_REP_SECONDS)


def memory_job(model, batch_size, method):
    plain, candidate = _steps(model, batch_size, "registry" if method == "plain" else method)
    m = H.step_memory(plain if method == "plain" else candidate)
    return {"extra_mb": m.extra_mb}


def exactness_job(model, batch_size):
    """max |G_registry − G_loop| / max |G_loop| in float64 (loop: one GradientTape per sample)."""
    import keras
    import numpy as np
    import tensorflow as tf

    keras.config.set_floatx("float64")
    from fimcore_adapters.tensorflow import per_sample_gram

    net = build(model)
    x, y = _batch(model, batch_size)
    x = x.astype("float64")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rows = []
    for i in range(batch_size):
        with tf.GradientTape() as tape:
            li = loss(y[i:i + 1], net(x[i:i + 1], training=True))
        rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(li, net.trainable_variables)]))
    jac = np.stack(rows)
    ref = jac @ jac.T
    return float(np.abs(per_sample_gram(net, loss, x, y) - ref).max() / np.abs(ref).max())




def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 32, few repetitions, no memory")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory columns")
    parser.add_argument("--cap", type=float, default=120.0, help="seconds per timing configuration")
    parser.add_argument("--note", default="", help="free text added to the report (e.g. machine load)")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow intra-op threads in each child (TF_NUM_INTRAOP_THREADS, with "
                             "TF_NUM_INTEROP_THREADS=1). Default: TensorFlow's own")
    R.add_fisher_option(parser)
    parser.add_argument("--out", default=None, help="default benchmarks/results/tensorflow.md "
                                                    "(tensorflow_sampled.md with --fisher sampled alone)")
    args = parser.parse_args(argv)
    # children inherit this: a multi-threaded OpenBLAS eigvalsh of a small Gram competes with
    # TensorFlow's thread pool for the cores
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be ≥ 1; received {args.threads}.")
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(args.threads)
        os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    sizes = args.batch_sizes or ([32] if args.quick else [32, 128])
    reps = args.reps or (5 if args.quick else 11)
    memory = not (args.quick or args.no_memory)
    runner = H.IsolatedRunner(start_method="spawn")
    machine = H.machine_info()
    out = args.out or f"benchmarks/results/tensorflow{'_sampled' if args.fisher == ('sampled',) else ''}.md"
    table, sampled_notes, details = [], [], ""
    if "sampled" in args.fisher:
        table, sampled_notes = R.run_grid(
            runner, "benchmarks.bench_tensorflow:sampled_timing_job", model_labels=MODELS,
            models=args.models, batch_sizes=sizes, timeout=args.cap + 600.0,
            job_kwargs=dict(reps=reps, cap_seconds=args.cap))
        threads = {v: os.environ[v] for v in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
                                              "OPENBLAS_NUM_THREADS") if v in os.environ}
        details = (f"Reps = {reps}, cap per (model, B) = {args.cap:.0f} s, tracing excluded, no XLA; children "
                   f"with {', '.join(f'{k} = {v}' for k, v in threads.items())}. The plain step is Keras' own "
                   "`train_step`; the empirical one is the `registry` row's `GramModel(net, every=1)` step; "
                   "the sampled one is `GramModel(net, every=1, fisher=\"sampled\", mc_samples=1, seed=0)` "
                   "(the likelihood read from the compiled `SparseCategoricalCrossentropy(from_logits=True)`).")
    if args.fisher == ("sampled",):
        machine["load average (1/5/15 min) at end"] = H.load_average()
        text = R.standalone_report(
            "TensorFlow: the sampled-label Fisher Gram's step beside the empirical one",
            command=H.command_line(), table=table, notes=sampled_notes, machine=machine, details=details,
            versions=H.package_versions(["tensorflow-cpu", "tensorflow", "keras", "numpy"]),
            preamble=[args.note] if args.note else [])
        print(f"wrote {H.write_report(out, text)}")
        return 0
    rows, notes = H.run_timing_grid(
        runner, "benchmarks.bench_tensorflow", model_labels=MODELS, method_labels=METHODS,
        models=args.models, methods=args.methods, batch_sizes=sizes, reps=reps, cap_seconds=args.cap,
        memory=memory, target=TARGET, target_batch=None,
        targeted=lambda method: method in ("registry", "registry-async"),
        timing_slack=600.0, memory_timeout=900.0)
    text = H.framework_report(
        "TensorFlow adapter benchmark", quick=args.quick,
        paragraphs=[*([args.note] if args.note else []),
                    "Ratio = median over interleaved repetitions of (traced step with G + `fimcore.spectrum` on the "
                    "host) / (Keras' own `train_step` under `tf.function`: mean cross-entropy + SGD), float32, "
                    "tracing excluded, no XLA. Extra MB: peak resident set over three steps minus the set before "
                    "them, one fresh process per cell. Children run with "
                    f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']} (host eigenvalues). "
                    f"Steps shorter than {H.MIN_REP_SECONDS} s are timed in runs of consecutive calls lasting about "
                    "that long (paired per-call means). " + H.SPREAD_NOTE],
        headers=H.grid_headers("ratio (target ≤ 1.3×, registry rows)"), rows=rows,
        exact_caption="Exactness in float64: max |G_registry − G_loop| / max |G_loop| against one "
                      "GradientTape per sample",
        exact=H.exactness_rows(runner, "benchmarks.bench_tensorflow", MODELS, args.models),
        packages=["tensorflow-cpu", "keras", "numpy"], notes=notes)
    if table:
        text = R.insert_section(text, table, sampled_notes, details=details)
    path = H.write_report(out, text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
