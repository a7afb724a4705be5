"""Where the TensorFlow adapter's extra time goes on a convolutional step, layer by layer.

Every number is a whole traced step (``tf.function``, no XLA), all variants interleaved,
median over the repetitions, so each layer is measured with the caches and thread pool of a
real step (isolated per-layer calls time differently):

- Keras' own ``train_step`` (the benchmark's plain step) and ``GramModel.train_step``;
- the ``GramModel`` step with every convolution's Gram work replaced by the batch filter
  gradient the plain step computes (hooks, watched outputs, dense rules, assembly kept);
- the same with only one convolution replaced: the difference to the full step is that
  layer's extra cost;
- the full step with the convolutions' Gram GEMMs replaced by a zero matrix (per-sample
  columns still formed): the difference is the GEMMs' share.

Run (about a minute)::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python -m benchmarks.profile_tensorflow_layers \\
        --batch 128 --reps 41 [--out profile.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import numpy as np

from . import _harness as H


def _median_ms(fns: list[Callable[[], object]], reps: int) -> list[float]:
    """Median wall time (ms) of each function, called round-robin ``reps`` times after a warm-up."""
    for f in fns:
        f()
        f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for f, ts in zip(fns, times):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return [1e3 * statistics.median(ts) for ts in times]


def _batch_filter_rule(self, layer, capture, deltas):
    """A stand-in for ``ConvRule.gram_and_grads``: the batch gradients only, a zero Gram."""
    import tensorflow as tf

    x, g = self._channels_last(layer, capture, deltas)
    kernel = tf.compat.v1.nn.conv2d_backprop_filter(
        x, tf.shape(layer.kernel), g, strides=[1, *layer.strides, 1], padding=capture["padding"].upper())
    grads = [kernel] + ([tf.reduce_sum(g, axis=[0, 1, 2])] if layer.bias is not None else [])
    batch = tf.shape(x)[0]
    return tf.zeros(tf.stack([batch, batch]), g.dtype), grads, "batch gradient only"


def profile(model_name: str, batch: int, reps: int) -> dict:
    """Median step times (ms) of the plain step, the Gram step and its ablations."""
    import keras
    import tensorflow as tf

    from fimcore_adapters._tensorflow import convps as conv, kernels
    from fimcore_adapters.tensorflow import GramModel

    from .bench_tensorflow import _batch, build

    x, y = _batch(model_name, batch)
    data = (tf.constant(x), tf.constant(y))

    def traced(model):
        model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=False,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        step = tf.function(model.train_step)
        step(data)  # trace now, under whatever stand-in is in place
        return step

    real_rule, real_gemm = conv.ConvRule.gram_and_grads, kernels.gram_of_columns

    def with_conv_rule(replaced: Callable[[int], bool]):
        order: dict[int, int] = {}
        names: list[str] = []

        def rule(self, layer, capture, deltas):
            if id(layer) not in order:
                order[id(layer)] = len(order)
                names.append(layer.name)
            k = order[id(layer)]
            return (_batch_filter_rule if replaced(k) else real_rule)(self, layer, capture, deltas)

        conv.ConvRule.gram_and_grads = rule
        try:
            return traced(GramModel(build(model_name), every=1)), names
        finally:
            conv.ConvRule.gram_and_grads = real_rule

    steps = {"plain": traced(build(model_name))}
    steps["gram"], convs = with_conv_rule(lambda k: False)
    steps["no_conv"], _ = with_conv_rule(lambda k: True)
    for k in range(len(convs)):
        steps[f"conv{k}"], _ = with_conv_rule(lambda j, k=k: j == k)
    kernels.gram_of_columns = lambda c: tf.zeros(tf.stack([tf.shape(c)[1]] * 2), c.dtype) + 0 * c[0, 0]
    try:
        steps["no_gemm"] = traced(GramModel(build(model_name), every=1))
    finally:
        kernels.gram_of_columns = real_gemm

    def call(name, step):
        if name == "plain":
            return lambda: float(step(data)["loss"])
        return lambda: np.asarray(step(data)["fimcore_gram"])

    names = list(steps)
    times = dict(zip(names, _median_ms([call(n, steps[n]) for n in names], reps)))
    return {"times": times, "convs": convs}


def report(model_name: str, batch: int, reps: int, result: dict) -> str:
    import tensorflow as tf

    t, convs = result["times"], result["convs"]
    plain = t["plain"]

    def row(label, ms):
        return [label, f"{ms:.1f}", f"{ms / plain:.2f}×", f"{t['gram'] - ms:+.1f}"]

    rows = [row("Keras `train_step` (plain)", plain), row("`GramModel` step with G", t["gram"]),
            row("… every convolution's Gram work replaced by its batch filter gradient", t["no_conv"])]
    rows += [row(f"… only `{name}` (convolution {k + 1}) replaced", t[f"conv{k}"])
             for k, name in enumerate(convs)]
    rows.append(row("… convolutions' Gram GEMMs replaced by zeros (columns still formed)", t["no_gemm"]))
    lines = [
        f"# TensorFlow adapter: per-layer profile ({model_name}, B = {batch})", "",
        f"Command: `{H.command_line()}`", "",
        f"Whole traced steps, interleaved, median of {reps} repetitions. The last column is what "
        "the full step with G costs beyond each variant: for a one-layer replacement, that "
        "layer's extra cost in the step.", "",
        H.markdown_table(["step", "ms", "ratio to plain", "step with G minus this"], rows), "",
        "## Machine", "", H.key_value_table(H.machine_info()), "",
        f"TensorFlow {tf.__version__}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", choices=["cnn"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--out", default=None, help="write the report to this Markdown file")
    args = ap.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    text = report(args.model, args.batch, args.reps, profile(args.model, args.batch, args.reps))
    print(text)
    if args.out:
        H.write_report(args.out, text)


if __name__ == "__main__":
    main()
