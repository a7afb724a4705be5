"""JAX benchmark: a jitted training step with the per-sample Gram G = J Jᵀ, against the plain step.

Run from the repository root::

    python -m benchmarks.bench_jax            # full run, writes benchmarks/results/jax.md
    python -m benchmarks.bench_jax --quick    # B = 32 only, fewer repetitions, no memory

Models (Flax linen, float32, synthetic batches): MLP 784-512-256-10; the small CNN of the PyTorch
benchmark (three 3×3 convolutions with 16/32/64 channels, each ReLU + 2×2 max pool, dense head,
3×32×32 inputs, channels last); CIFAR ResNet-20 with GroupNorm (groups = gcd(C, 8), option-A
shortcuts, as ``reference_training.models``). The plain step is ``jax.jit`` of
``value_and_grad`` of the mean cross-entropy plus an SGD update. The measured steps add G:

* ``factored`` — :class:`fimcore_adapters.jax.FlaxGram` (layer-factored/materialised per layer)
  inside the same jitted step;
* ``factored-noeig`` — the same step without the eigenvalue call: the cost of G alone;
* ``factored-async`` — the ``factored`` step with ``MeasureTracker(asynchronous=True).update``
  of ``fg.result(G)`` (c_k and I_k from the float64 host Gram on a worker thread while the next
  step runs) instead of the spectrum call;
* ``factored-jiteig`` — the ``factored`` step with ``jnp.linalg.eigvalsh(G)`` inside the jitted
  step (float32 without ``jax_enable_x64``: not the float64 spectrum of the other rows; the cost
  of moving the eigen-solve into XLA);
* ``generic`` — :func:`fimcore_adapters.jax.value_grad_and_gram` (``vmap(grad)`` of the
  per-example loss, leaf-wise ``J_l J_lᵀ``) inside the jitted step.

The measured steps (except ``factored-noeig``, ``factored-async``, ``factored-jiteig``) then take
the eigenvalues of G with ``fimcore.spectrum`` (float64, on the host), as the PyTorch benchmark
does: for ``factored`` as a user would, ``fimcore.spectrum(fg.result(G))`` of the host float64 G
(a checked ``GramResult``: the core's lean path). Timing: plain and method interleaved in one child process after a warm-up
(compilation excluded), median of paired ratios. Memory: a fresh child per configuration
(``benchmarks._harness.step_memory``: peak resident set over three steps minus the set before).

With ``--fisher empirical,sampled`` (or ``--fisher sampled`` alone, written to
``benchmarks/results/jax_sampled.md`` by default) it also times, interleaved in one child per
(model, B), the plain step and two ``value_grad_and_gram`` steps on the same per-example loss
``output_loss(predict, "cross_entropy")``: the empirical Gram and the sampled-label one
(``fisher="sampled"``, K = 1, a fresh ``key=`` every step), both with eigenvalues
(:mod:`benchmarks._sampled_rows`). ``FlaxGram`` has no sampled-label mode, so the pair is
compared on the ``vmap(grad)`` path.

The children run NumPy's BLAS single-threaded (``OPENBLAS_NUM_THREADS=1`` etc. unless already set):
a multi-threaded OpenBLAS pool spinning beside XLA's threads on 2 cores slows the eigenvalue call
and the next XLA step.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from benchmarks import _harness as H
from benchmarks import _sampled_rows as R

MODELS = {"mlp": "MLP 784-512-256-10", "cnn": "small CNN (3 conv + dense, 3×32×32)",
          "resnet20-gn": "ResNet-20, GroupNorm"}
METHODS = {"factored": "fimcore `FlaxGram` (layer-factored)",
           "factored-noeig": "fimcore `FlaxGram`, G without its eigenvalues",
           "factored-async": "fimcore `FlaxGram` + `MeasureTracker(asynchronous=True)` (host float64 G)",
           "factored-jiteig": "fimcore `FlaxGram` + `jnp.linalg.eigvalsh` in the jitted step (float32)",
           "generic": "fimcore `value_grad_and_gram` (vmap(grad))"}
TARGET = 1.3  # step with G and its eigenvalues / plain step, at B = 32 and 128 (earlier: 1.5 at B = 128)


def build(name):
    """Flax model, synthetic batch ``(x, y)`` builder and per-example logits function."""
    import flax.linen as nn
    import jax.numpy as jnp

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(512)(x))
            x = nn.relu(nn.Dense(256)(x))
            return nn.Dense(10)(x)

    class SmallCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for c in (16, 32, 64):
                x = nn.max_pool(nn.relu(nn.Conv(c, (3, 3), padding=1)(x)), (2, 2), (2, 2))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    def norm(c):
        return nn.GroupNorm(num_groups=math.gcd(c, 8), epsilon=1e-5)

    class Block(nn.Module):
        c_out: int
        stride: int

        @nn.compact
        def __call__(self, x):
            s = self.stride
            out = nn.relu(norm(self.c_out)(nn.Conv(self.c_out, (3, 3), (s, s), padding=1, use_bias=False)(x)))
            out = norm(self.c_out)(nn.Conv(self.c_out, (3, 3), padding=1, use_bias=False)(out))
            short = x[:, ::s, ::s, :] if s > 1 else x
            extra = self.c_out - short.shape[-1]
            if extra:
                short = jnp.pad(short, ((0, 0), (0, 0), (0, 0), (0, extra)))
            return nn.relu(out + short)

    class ResNet20(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(norm(16)(nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)))
            for stage, c in enumerate((16, 32, 64)):
                for i in range(3):
                    x = Block(c, 2 if stage > 0 and i == 0 else 1)(x)
            return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))

    model = {"mlp": MLP, "cnn": SmallCNN, "resnet20-gn": ResNet20}[name]()
    shape = (784,) if name == "mlp" else (32, 32, 3)
    return model, shape


def _setup(name, batch_size, seed=0):
    import jax
    import jax.numpy as jnp

    model, shape = build(name)
    kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (batch_size,) + shape, jnp.float32)
    y = jax.random.randint(ky, (batch_size,), 0, 10)
    params = model.init(kp, x[:1])["params"]
    return model, params, x, y


def _steps(name, batch_size, method, seed=0):
    """Closures ``plain()`` and ``candidate()`` running one step each, results blocked on."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import fimcore
    from fimcore_adapters.jax import FlaxGram, value_grad_and_gram

    model, params, x, y = _setup(name, batch_size, seed)
    lr = 0.01

    def losses(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    def sgd(p, g):
        return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)

    @jax.jit
    def plain_step(p, x, y):
        loss, g = jax.value_and_grad(lambda q: jnp.mean(losses(model.apply({"params": q}, x), y)))(p)
        return sgd(p, g), loss

    tracker = fimcore.MeasureTracker(asynchronous=True) if method == "factored-async" else None
    if method.startswith("factored"):
        fg = FlaxGram(model, losses, check_finite=False)

        @jax.jit
        def gram_step(p, x, y):
            loss, g, gram = fg({"params": p}, x, y)
            if method == "factored-jiteig":
                return sgd(p, g), loss, jnp.linalg.eigvalsh(gram)
            return sgd(p, g), loss, gram
    else:
        def per_example(p, xi, yi):
            return losses(model.apply({"params": p}, xi[None]), yi[None])[0]

        vgg = value_grad_and_gram(per_example, check_finite=False)

        @jax.jit
        def gram_step(p, x, y):
            loss, g, gram = vgg(p, x, y)
            return sgd(p, g), loss, gram

    def plain():
        jax.block_until_ready(plain_step(params, x, y))

    def candidate():
        _, _, gram = gram_step(params, x, y)
        if method.endswith("-noeig") or method == "factored-jiteig":
            jax.block_until_ready(gram)
        elif method == "factored-async":
            tracker.update(fg.result(np.asarray(gram, dtype=np.float64)), lr=lr)
        elif method == "factored":
            fimcore.spectrum(fg.result(np.asarray(gram, dtype=np.float64)))
        else:
            fimcore.spectrum(np.asarray(gram, dtype=np.float64))

    return plain, candidate


def _sampled_steps(name, batch_size, seed=0):
    """Closures ``plain()``, ``empirical()``, ``sampled()``: the plain jitted step and the jitted
    ``value_grad_and_gram`` steps (empirical, and ``fisher="sampled"`` with K = 1) on
    ``output_loss(predict, "cross_entropy")``, each followed by the eigenvalues of its Gram."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import fimcore
    from fimcore_adapters.jax import output_loss, value_grad_and_gram

    model, params, x, y = _setup(name, batch_size, seed)
    lr = 0.01

    def sgd(p, g):
        return jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)

    @jax.jit
    def plain_step(p, x, y):
        def mean_loss(q):
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": q}, x), y))

        loss, g = jax.value_and_grad(mean_loss)(p)
        return sgd(p, g), loss

    loss = output_loss(lambda p, xi: model.apply({"params": p}, xi[None])[0], "cross_entropy")
    empirical_vgg = value_grad_and_gram(loss, check_finite=False)
    sampled_vgg = value_grad_and_gram(loss, fisher="sampled", mc_samples=1, check_finite=False)
    key0 = jax.random.key(seed + 1)

    @jax.jit
    def empirical_step(p, x, y):
        mean_loss, g, gram = empirical_vgg(p, x, y)
        return sgd(p, g), mean_loss, gram

    @jax.jit
    def sampled_step(p, x, y, i):
        mean_loss, g, gram = sampled_vgg(p, x, y, key=jax.random.fold_in(key0, i))
        return sgd(p, g), mean_loss, gram

    calls = [0]

    def plain():
        jax.block_until_ready(plain_step(params, x, y))

    def empirical():
        fimcore.spectrum(np.asarray(empirical_step(params, x, y)[2], dtype=np.float64))

    def sampled():
        calls[0] += 1               # fresh labels every step
        fimcore.spectrum(np.asarray(sampled_step(params, x, y, calls[0])[2], dtype=np.float64))

    return plain, empirical, sampled


def sampled_timing_job(model, batch_size, reps, cap_seconds):
    """Plain, empirical and sampled-label steps timed interleaved (compilation excluded)."""
    return R.time_steps(*_sampled_steps(model, batch_size), reps=reps, cap_seconds=cap_seconds)


def timing_job(model, batch_size, method, reps, cap_seconds):
    plain, candidate = _steps(model, batch_size, method)
    # the first call of each (compilation) stays outside the timed and capped repetitions
    return H.warm_then_time(plain, candidate, reps=reps, cap_seconds=cap_seconds,
                            min_rep_seconds=H.MIN_REP_SECONDS)


def memory_job(model, batch_size, method):
    plain, candidate = _steps(model, batch_size, method)
    step = plain if method == "plain" else candidate
    m = H.step_memory(step)
    return {"extra_mb": m.extra_mb}


def exactness_job(model, batch_size):
    """‖G_factored − G_generic‖_F / ‖G_generic‖_F in float64 (same weights and batch)."""
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    from fimcore_adapters.jax import FlaxGram, value_grad_and_gram

    net, params, x, y = _setup(model, batch_size)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    x = x.astype(jnp.float64)

    def losses(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    g1 = jax.jit(FlaxGram(net, losses))({"params": params}, x, y)[2]
    g2 = jax.jit(value_grad_and_gram(lambda p, xi, yi: losses(net.apply({"params": p}, xi[None]),
                                                                 yi[None])[0]))(params, x, y)[2]
    return float(jnp.linalg.norm(g1 - g2) / jnp.linalg.norm(g2))




def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 32, few repetitions, no memory")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--cap", type=float, default=240.0, help="seconds per timing configuration")
    parser.add_argument("--threads", type=int, default=None,
                        help="XLA CPU threads in each child (XLA_FLAGS intra_op_parallelism_threads; "
                             "1 also turns off Eigen's multi-threading). Default: XLA's own")
    R.add_fisher_option(parser)
    parser.add_argument("--out", default=None,
                        help="default benchmarks/results/jax.md (jax_sampled.md with --fisher sampled alone)")
    args = parser.parse_args(argv)
    sizes = args.batch_sizes or ([32] if args.quick else [32, 128])
    reps = args.reps or (5 if args.quick else 15)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # inherited by the spawned children (see module docstring)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be ≥ 1; received {args.threads}.")
        flags = f"intra_op_parallelism_threads={args.threads}"
        if args.threads == 1:
            flags = "--xla_cpu_multi_thread_eigen=false " + flags
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    runner = H.IsolatedRunner(start_method="spawn")
    machine = H.machine_info()
    out = args.out or f"benchmarks/results/jax{'_sampled' if args.fisher == ('sampled',) else ''}.md"
    table, sampled_notes, details = [], [], ""
    if "sampled" in args.fisher:
        table, sampled_notes = R.run_grid(
            runner, "benchmarks.bench_jax:sampled_timing_job", model_labels=MODELS, models=args.models,
            batch_sizes=sizes, timeout=args.cap + 300.0, job_kwargs=dict(reps=reps, cap_seconds=args.cap))
        details = (f"Reps = {reps}, cap per (model, B) = {args.cap:.0f} s, compilation excluded; children "
                   f"with XLA_FLAGS = `{os.environ.get('XLA_FLAGS', '')}`, "
                   f"OPENBLAS_NUM_THREADS = {os.environ['OPENBLAS_NUM_THREADS']}. Both fimcore steps are "
                   "jitted `value_grad_and_gram` steps on `output_loss(predict, \"cross_entropy\")` (the "
                   "`vmap(grad)` path: `FlaxGram` has no sampled-label mode); the sampled one gets "
                   "`fisher=\"sampled\", mc_samples=1` and a fresh `key=` per step.")
    if args.fisher == ("sampled",):
        machine["load average (1/5/15 min) at end"] = H.load_average()
        text = R.standalone_report(
            "JAX: the sampled-label Fisher Gram's step beside the empirical one", command=H.command_line(),
            table=table, notes=sampled_notes, machine=machine, details=details,
            versions=H.package_versions(["jax", "jaxlib", "flax", "optax", "numpy"]))
        print(f"wrote {H.write_report(out, text)}")
        return 0
    rows, notes = H.run_timing_grid(
        runner, "benchmarks.bench_jax", model_labels=MODELS, method_labels=METHODS, models=args.models,
        methods=list(args.methods), batch_sizes=sizes, reps=reps, cap_seconds=args.cap, memory=not args.quick,
        target=TARGET, target_batch=None, targeted=lambda method: method in ("factored", "factored-async"),
        timing_slack=300.0, memory_timeout=600.0)
    text = H.framework_report(
        "JAX adapter benchmark", quick=args.quick,
        paragraphs=[
            "Ratio = median over interleaved repetitions of (jitted step with G + `fimcore.spectrum`) / (plain "
            "jitted step: value_and_grad of the mean cross-entropy + SGD), float32, compilation excluded. Extra MB: "
            "peak resident set over three steps minus the set before them, one fresh process per cell. "
            f"Steps shorter than {H.MIN_REP_SECONDS} s are timed in runs of consecutive calls lasting about "
            "that long (paired per-call means). " + H.SPREAD_NOTE],
        headers=H.grid_headers("ratio (target ≤ 1.3×)"), rows=rows,
        exact_caption="Exactness in float64: ‖G_factored − G_generic‖_F / ‖G_generic‖_F",
        exact=H.exactness_rows(runner, "benchmarks.bench_jax", MODELS, args.models),
        packages=["jax", "jaxlib", "flax", "optax", "numpy"], notes=notes)
    if table:
        text = R.insert_section(text, table, sampled_notes, details=details)
    path = H.write_report(out, text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
