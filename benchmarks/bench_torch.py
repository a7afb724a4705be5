"""PyTorch benchmark: a training step with the per-sample Gram G = J Jᵀ, against the plain step.

Run from the repository root (the project's ``benchmarks`` package must win over the one opacus
installs into site-packages)::

    python -m benchmarks.bench_torch            # full run, writes benchmarks/results/torch.md
    python -m benchmarks.bench_torch --quick    # five small models at B = 32, 3 reps, 10 s cap

The default cap is 75 s per configuration; configurations that cannot finish their repetitions in
the cap are reported as skipped. Each committed table prints the wall time of its run.

For every model and batch size B it measures, as ratios to the plain step (forward, mean
cross-entropy, backward, SGD with momentum), the time and the peak extra memory of a training
step that also yields G and its eigenvalues (``fimcore.spectrum``):

* ``fimcore`` — :class:`fimcore_adapters.torch.GramRecorder` around the ordinary forward and
  backward, strategy ``auto`` (and, on ResNet-20 BN and the MLP, each forced strategy:
  ``factored``, ``materialize``, ``generic``);
* ``fimcore-noeig`` — the same auto recorder without the eigenvalue step: the cost of G alone;
* ``torch.func`` — ``vmap(grad)`` over single samples, then G; its BatchNorm layers normalise
  each sample with its own statistics (``replace_all_batch_norm_modules_``), which changes G;
* ``backpack`` — BackPACK ``BatchGrad``, then G (GroupNorm/LayerNorm have no BackPACK extension:
  their columns are missing from its G);
* ``opacus`` — Opacus ``GradSampleModule(loss_reduction="mean")``, then G (refuses BatchNorm);
* ``spectrum`` — the eigenvalue step alone on a B×B Gram, as a fraction of the plain step.

With ``--fisher empirical,sampled`` (or ``--fisher sampled`` for those rows alone, written to
``benchmarks/results/torch_sampled.md`` by default) it also times, interleaved in one child per
(model, B), the plain step, the auto recorder's step (empirical Fisher) and the sampled-label
recorder's step, ``GramRecorder(fisher="sampled", loss=nn.CrossEntropyLoss(), mc_samples=1)``
(one extra backward of the logits per step), both with eigenvalues (see
:mod:`benchmarks._sampled_rows`).

Baselines form G as Σ over parameters of ``J_p J_pᵀ`` from their per-sample gradient tensors
(no concatenated copy of J). Each configuration is timed in its own child process (plain and
method interleaved, median of paired ratios, a time cap), and its memory is measured in another
fresh child (see :mod:`benchmarks._harness`). The exactness column is ‖G − G_ref‖_F / ‖G_ref‖_F
against the adapter's G of a float64 copy of the model on the same batch and initial weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from benchmarks import _harness as H
from benchmarks import _sampled_rows as R
from benchmarks._torch_models import MODEL_LABELS, MODEL_NAMES

# --------------------------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------------------------

METHOD_LABELS = {
    "fimcore": "fimcore `GramRecorder` (auto)",
    "fimcore-noeig": "fimcore `GramRecorder` (auto), G without its eigenvalues",
    "fimcore-async": "fimcore `GramRecorder` (auto) + `MeasureTracker(asynchronous=True)` (c_k, I_k off the critical path)",
    "fimcore-factored": "fimcore (strategy=\"factored\")",
    "fimcore-materialize": "fimcore (strategy=\"materialize\")",
    "fimcore-generic": "fimcore (strategy=\"generic\")",
    "torch.func": "torch.func `vmap(grad)` + JJᵀ",
    "backpack": "BackPACK `BatchGrad` + JJᵀ",
    "opacus": "Opacus `GradSampleModule` + JJᵀ",
    "torchjd": "TorchJD autogram `Engine` (Gramian of the per-sample losses) + second backward",
    "spectrum": "spectrum step alone (`fimcore.spectrum`)",
}
METHODS = tuple(METHOD_LABELS)
FORCED_STRATEGIES = ("fimcore-factored", "fimcore-materialize", "fimcore-generic")
FORCED_STRATEGY_MODELS = ("resnet20-bn", "mlp")
"""Models on which the forced strategies run (forcing the factored form on large convolutions
costs hours on 2 cores)."""

TIME_TARGETS = {"resnet20-bn": 1.3, "resnet20-gn": 1.3, "mlp": 1.3, "cnn": 1.3}
"""Time targets for the adapter's step with G and its eigenvalues (auto), at B = 32 and B = 128
(earlier rounds: 1.4× on the ResNets, 1.5× on the CNN)."""

MEMORY_TARGET_RATIO, MEMORY_TARGET_SMALL_MB, MEMORY_SMALL_PLAIN_MB = 1.3, 50.0, 50.0
"""Memory target: extra memory ≤ 1.3× the plain step's, or ≤ +50 MB where the plain step needs
less than 50 MB."""

LEARNING_RATE = 0.01
DEFAULT_REPS, DEFAULT_CAP = 5, 75.0
QUICK_MODELS = ("mlp", "cnn", "resnet20-bn", "resnet20-gn", "transformer")
PRELOAD = ("torch", "torch._dynamo", "numpy", "array_api_compat.torch", "fimcore", "benchmarks._harness",
           "benchmarks._torch_models")
"""Modules the fork server imports once, before forking any child (``benchmarks.bench_torch``
itself is left out: as the ``-m`` main module it is re-run in each child, which warns when it is
already imported). ``torch._dynamo`` is what a torch optimizer imports on construction (seconds).
:func:`preload_for` adds what the chosen models and methods need."""
_METHOD_MODULES = {"fimcore": "fimcore_adapters.torch", "torch.func": "torch.func",
                   "backpack": "backpack", "opacus": "opacus", "torchjd": "torchjd.autogram"}
GRACE_SECONDS = 15.0
"""Allowance beyond the cap for a child's set-up (model construction, first-use costs)."""
SPAWN_GRACE_SECONDS = 45.0
"""The same with ``--start-method spawn``, where each child also imports torch and the tools."""


def methods_for(model: str, methods: tuple[str, ...] = METHODS) -> list[str]:
    """The methods measured on ``model``, in report order."""
    return [m for m in methods
            if not (m in FORCED_STRATEGIES and model not in FORCED_STRATEGY_MODELS)]


def preload_for(models, methods) -> tuple[str, ...]:
    """:data:`PRELOAD` plus the modules of the given models and methods (imported once)."""
    extra = {_METHOD_MODULES[m.partition("-")[0]] for m in methods if m.partition("-")[0] in _METHOD_MODULES}
    if any(m not in ("mlp", "cnn", "transformer") for m in models):
        extra.add("reference_training.models")
    if any(m != "spectrum" for m in methods):
        extra.add("fimcore_adapters.torch")  # the float64 reference G
    return PRELOAD + tuple(sorted(extra))


# --------------------------------------------------------------------------------------------
# Steps (run inside child processes)
# --------------------------------------------------------------------------------------------


class Refused(Exception):
    """The method declines this model (e.g. Opacus and BatchNorm)."""


def _spectrum(G: Any) -> Any:
    import fimcore

    return fimcore.spectrum(G)


def _setup(model_name: str, batch_size: int, seed: int, threads: int | None = None):
    import torch

    from benchmarks import _torch_models

    warnings.simplefilter("ignore")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = _torch_models.build(model_name)
    x, y = _torch_models.batch(model_name, batch_size, seed=seed + 1)
    return model, x, y


def _sgd(model):
    import torch

    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)


def plain_step(model, x, y) -> Callable[[], None]:
    """The plain training step: forward, mean cross-entropy, backward, SGD."""
    import torch.nn.functional as F

    opt = _sgd(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _sum_of_grams(per_sample: list, scale: float = 1.0):
    """Σ_p J_p J_pᵀ over per-parameter per-sample gradient tensors of shape (B, *p.shape)."""
    G = None
    for g in per_sample:
        f = g.reshape(g.shape[0], -1)
        G = f @ f.T if G is None else G.addmm_(f, f.T)
    return G if scale == 1.0 else G.mul_(scale)


def _fimcore_step(model, x, y, strategy: str, notes: list, eigenvalues: bool = True,
                  asynchronous: bool = False):
    """The recorder's step; its eigenvalues as a user gets them by default: ``fimcore.spectrum``
    of ``recorder.result()`` (a checked :class:`fimcore.GramResult`: the lean path). With
    ``asynchronous``, ``MeasureTracker(asynchronous=True).update(recorder.result(), lr=...)``
    instead (c_k and I_k on a worker thread while the next step runs)."""
    import torch.nn.functional as F
    from fimcore_adapters.torch import GramRecorder

    import fimcore

    opt = _sgd(model)
    recorder = GramRecorder(model, loss_reduction="mean", strategy=strategy)
    tracker = fimcore.MeasureTracker(asynchronous=True) if asynchronous else None

    def step():
        opt.zero_grad(set_to_none=True)
        with recorder:
            F.cross_entropy(model(x), y).backward()
        G = recorder.gram()
        if tracker is not None:
            tracker.update(recorder.result(), lr=LEARNING_RATE)
        elif eigenvalues:
            _spectrum(recorder.result())
        opt.step()
        if not notes and strategy == "auto" and eigenvalues:
            notes.append(str(recorder.report()))
        return G

    return step


def _sampled_fimcore_step(model, x, y, seed: int = 0):
    """The auto recorder's step with ``fisher="sampled"`` (K = 1): G from labels drawn from the
    model's softmax, the data-label gradient for SGD, eigenvalues of the sampled G."""
    import torch.nn.functional as F
    from fimcore_adapters.torch import GramRecorder
    from torch import nn

    opt = _sgd(model)
    recorder = GramRecorder(model, loss_reduction="mean", fisher="sampled", loss=nn.CrossEntropyLoss(),
                            mc_samples=1, seed=seed)

    def step():
        opt.zero_grad(set_to_none=True)
        with recorder:
            F.cross_entropy(model(x), y).backward()
        G = recorder.gram()
        _spectrum(G)
        opt.step()
        return G

    return step


def _torch_func_step(model, x, y, notes: list):
    import torch.nn.functional as F
    from torch import nn
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        notes.append("BatchNorm normalises each sample with its own statistics under vmap")
        replace_all_batch_norm_modules_(model)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    opt = _sgd(model)

    def sample_loss(ps, xi, yi):
        out = functional_call(model, (dict(zip(names, ps)), buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def step():
        grads = per_sample(tuple(p.detach() for p in params), x, y)
        G = _sum_of_grams(grads)
        for p, g in zip(params, grads):
            p.grad = g.mean(0)
        _spectrum(G)
        opt.step()
        return G

    return step


def _backpack_step(model, x, y, notes: list):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad
    from torch import nn

    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = _sgd(model)
    named = list(model.named_parameters())
    B = x.shape[0]

    def step():
        opt.zero_grad(set_to_none=True)
        with backpack(BatchGrad()):
            loss_fn(model(x), y).backward()
        present = [p.grad_batch for _, p in named if getattr(p, "grad_batch", None) is not None]
        if not notes:
            missing = [n for n, p in named if getattr(p, "grad_batch", None) is None]
            notes.append(f"no BatchGrad for {len(missing)} parameters ({', '.join(missing[:3])}"
                         f"{', …' if len(missing) > 3 else ''}): missing from G" if missing else "")
        G = _sum_of_grams(present, scale=float(B * B))  # grad_batch holds ∇ℓ_i / B
        _spectrum(G)
        opt.step()
        for _, p in named:
            p.grad_batch = None
        return G

    return step


def _opacus_step(model, x, y, notes: list):
    import torch.nn.functional as F
    from opacus import GradSampleModule

    try:
        wrapped = GradSampleModule(model, loss_reduction="mean")
    except NotImplementedError as err:  # Opacus validates the model when wrapping it
        found = re.search(r"Model contains[^(]*", str(err))
        raise Refused(f"NotImplementedError: {found.group(0).strip() if found else str(err)[:100]}") from None
    opt = _sgd(model)
    params = list(model.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(x), y).backward()
        G = _sum_of_grams([p.grad_sample for p in params])  # grad_sample holds ∇ℓ_i
        _spectrum(G)
        opt.step()
        for p in params:
            p.grad_sample = None
        return G

    return step


def _torchjd_step(model, x, y, notes: list):
    """TorchJD's autogram ``Engine(model, batch_dim=0)``: the Gramian of the per-sample losses
    ℓ_i (fimcore's G with ``loss_reduction="mean"``), then the second backward
    ``losses.backward(1/B)`` that forms the mean gradient for SGD, and the eigenvalues."""
    import torch
    import torch.nn.functional as F
    from torchjd.autogram import Engine

    try:
        engine = Engine(model, batch_dim=0)
    except ValueError as err:  # BatchNorm (batch statistics) is refused with batch_dim=0
        found = re.search(r"Found a module of type <class '([^']*)'>", str(err))
        raise Refused(f"ValueError: {found.group(1).rsplit('.', 1)[-1] if found else str(err)[:80]} "
                      "is incompatible with batch_dim=0") from None
    opt = _sgd(model)
    B = x.shape[0]
    weights = torch.full((B,), 1.0 / B, dtype=torch.get_default_dtype())

    def step():
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        G = engine.compute_gramian(losses)
        losses.backward(weights)
        _spectrum(G)
        opt.step()
        return G

    return step


def _spectrum_only(batch_size: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(batch_size, 4 * batch_size, generator=gen)
    G = J @ J.T

    def step():
        _spectrum(G)
        return None

    return step


def method_step(method: str, model, x, y, *, seed: int = 0, notes: list | None = None):
    """A training step with the Gram for ``method`` on ``model``; each call returns G (or None).

    Raises:
        Refused: If the method declines the model.
        ValueError: If ``method`` is unknown.
    """
    notes = [] if notes is None else notes
    if method == "plain":
        return plain_step(model, x, y)
    if method == "fimcore-noeig":
        return _fimcore_step(model, x, y, "auto", notes, eigenvalues=False)
    if method == "fimcore-async":
        return _fimcore_step(model, x, y, "auto", notes, asynchronous=True)
    if method == "torchjd":
        return _torchjd_step(model, x, y, notes)
    if method.startswith("fimcore"):
        return _fimcore_step(model, x, y, method.partition("-")[2] or "auto", notes)
    if method == "torch.func":
        return _torch_func_step(model, x, y, notes)
    if method == "backpack":
        return _backpack_step(model, x, y, notes)
    if method == "opacus":
        return _opacus_step(model, x, y, notes)
    if method == "spectrum":
        return _spectrum_only(x.shape[0], seed)
    raise ValueError(f"method must be 'plain' or one of {METHODS}; received {method!r}.")


def reference_gram_job(model: str, batch_size: int, seed: int, threads: int | None = None):
    """The adapter's G on a float64 copy of the model (initial weights, the benchmark batch)."""
    import torch
    import torch.nn.functional as F
    from fimcore_adapters.torch import GramRecorder

    net, x, y = _setup(model, batch_size, seed, threads)
    net = net.double()
    if torch.is_floating_point(x):
        x = x.double()
    recorder = GramRecorder(net, loss_reduction="mean")
    with recorder:
        F.cross_entropy(net(x), y).backward()
    return recorder.gram().detach().double().cpu().numpy()


def arithmetic_floor(net, x, y) -> dict:
    """The arithmetic floor of the recorder's step: 1 + (Gram multiply-adds) / (plain step's).

    Plain step: every Linear/Conv layer's forward multiply-adds F_l (output entries × fan-in)
    count three times (forward, input gradient, weight gradient), except that the first layer
    to run needs no input gradient. Gram products of the path each layer took
    (``recorder.report()``): ``materialize`` B²·p (J Jᵀ; the per-sample gradients themselves
    replace the weight gradient, Σ_i J_i being returned as it; times (n+1)/2n where the adapter
    forms it from n row blocks' lower triangle), ``factored``
    B²T²(d_a + d_g + 1), ``norm`` B²·p (the B × 2C affine rows). Norm layers' own arithmetic and
    the elementwise work of both steps are left out (small beside the GEMMs).
    """
    import torch.nn.functional as F
    from fimcore_adapters.torch import GramRecorder
    from torch import nn

    shapes, order = {}, []

    def hook(name):
        def record(module, args, out):
            order.append(name)
            shapes[name] = (module, args[0].shape, out.shape)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    recorder = GramRecorder(net, loss_reduction="mean")
    try:
        with recorder:
            F.cross_entropy(net(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    B = x.shape[0]
    plain = 0.0
    fan = {}
    for i, name in enumerate(dict.fromkeys(order)):
        module, _, out_shape = shapes[name]
        if isinstance(module, nn.Linear):
            fan_in, d_out = module.in_features, module.out_features
        else:
            fan_in, d_out = module.in_channels // module.groups * math.prod(module.kernel_size), module.out_channels
        fwd = float(math.prod(out_shape)) * fan_in
        T = math.prod(out_shape) // (B * d_out)
        fan[name] = (T, fan_in, d_out)
        plain += fwd * (2 if i == 0 else 3)
    gram = 0.0
    for rec in recorder.report():
        if rec.path == "factored" and rec.name in fan:
            T, d_a, d_g = fan[rec.name]
            gram += float(B) ** 2 * T ** 2 * (d_a + d_g + 1)
        elif rec.path in ("materialize", "norm"):
            gram += float(B) ** 2 * rec.params * _triangle_share(B, rec.params)
    return {"plain_macs": plain, "gram_macs": gram, "floor": 1.0 + gram / plain if plain else math.nan}


def _triangle_share(batch: int, columns: int) -> float:
    """Share of the full B²·p product that the adapter's block-triangle ``J Jᵀ`` computes."""
    from fimcore_adapters._torch import outer

    if batch < outer.MIN_BATCH or columns < outer.MIN_COLUMNS or outer.BLOCKS < 2:
        return 1.0
    return (outer.BLOCKS + 1) / (2 * outer.BLOCKS)


def floor_job(model: str, batch_size: int, seed: int, threads: int | None = None) -> dict:
    """:func:`arithmetic_floor` of the benchmark model and batch (one recorded step)."""
    net, x, y = _setup(model, batch_size, seed, threads)
    return arithmetic_floor(net, x, y)


def timing_job(model: str, batch_size: int, method: str, reps: int, cap_seconds: float,
               seed: int, reference=None, threads: int | None = None) -> dict:
    """Interleaved plain/method timing of one configuration, plus the exactness of its G."""
    import numpy as np

    net, x, y = _setup(model, batch_size, seed, threads)
    plain = H.FaultCounter(plain_step(copy.deepcopy(net), x, y))
    notes: list[str] = []
    try:
        step = method_step(method, net, x, y, seed=seed, notes=notes)
    except Refused as err:
        return {"refused": str(err)}
    first: list = []

    def with_gram() -> None:
        G = step()
        if not first:
            first.append(None if G is None else G.detach().double().cpu().numpy())

    candidate = H.FaultCounter(with_gram)
    t = H.interleaved_times(plain, candidate, reps=reps, cap_seconds=cap_seconds,
                            min_rep_seconds=H.MIN_REP_SECONDS)
    rel_err = None
    if first and first[0] is not None and reference is not None:
        rel_err = float(np.linalg.norm(first[0] - reference) / np.linalg.norm(reference))
    return {"plain": t.baseline, "method": t.candidate, "capped": t.capped, "elapsed": t.elapsed,
            "warmup": t.warmup, "rel_err": rel_err, "notes": [n for n in notes if n],
            "faults": (plain.median(), candidate.median())}


def sampled_timing_job(model: str, batch_size: int, reps: int, cap_seconds: float, seed: int,
                       threads: int | None = None) -> dict:
    """Plain, empirical (auto recorder) and sampled-label (K = 1) steps timed interleaved, each on
    its own copy of the model (:func:`benchmarks._sampled_rows.time_steps`)."""
    net, x, y = _setup(model, batch_size, seed, threads)
    plain = plain_step(copy.deepcopy(net), x, y)
    empirical = _fimcore_step(copy.deepcopy(net), x, y, "auto", [])
    sampled = _sampled_fimcore_step(net, x, y, seed=seed)
    return R.time_steps(plain, empirical, sampled, reps=reps, cap_seconds=cap_seconds)


def memory_job(model: str, batch_size: int, method: str, seed: int, threads: int | None = None) -> dict:
    """Extra resident memory of one configuration's step (call in a fresh memory child)."""
    net, x, y = _setup(model, batch_size, seed, threads)
    m = H.step_memory(method_step(method, net, x, y, seed=seed))
    return {"extra_mb": m.extra_mb, "rss_before_mb": m.rss_before_mb, "peak_mb": m.peak_mb}


# --------------------------------------------------------------------------------------------
# Orchestration (parent process)
# --------------------------------------------------------------------------------------------


@dataclass
class ConfigResult:
    """What the report says about one (model, B, method)."""

    model: str
    batch_size: int
    method: str
    status: str = "ok"  # ok | capped | refused | error
    plain_s: float = math.nan
    method_s: float = math.nan
    ratio: float = math.nan
    q1: float = math.nan   # quartiles of the paired ratios (the spread a target mark must exceed)
    q3: float = math.nan
    reps: int = 0
    rel_err: float | None = None
    mem_mb: float | None = None
    plain_mem_mb: float | None = None
    detail: str = ""
    notes: list[str] = field(default_factory=list)
    faults: tuple = (None, None)   # median minor page faults per call: plain step, method's step
    floor: dict | None = None      # arithmetic_floor of (model, B), on the fimcore rows

    @property
    def mem_ratio(self) -> float | None:
        if self.mem_mb is None or not self.plain_mem_mb:
            return None
        return self.mem_mb / self.plain_mem_mb


def _short_error(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "unknown error"


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def run_config(runner: H.IsolatedRunner, model: str, batch_size: int, method: str, *, reps: int,
               cap_seconds: float, seed: int, reference, plain_mem: float | None,
               memory: bool, threads: int | None = None, grace: float = GRACE_SECONDS) -> ConfigResult:
    """Times one configuration in a child (and measures its memory in another)."""
    r = ConfigResult(model, batch_size, method, plain_mem_mb=plain_mem)
    out = runner.run("benchmarks.bench_torch:timing_job",
                     dict(model=model, batch_size=batch_size, method=method, reps=reps,
                          cap_seconds=cap_seconds, seed=seed, reference=reference, threads=threads),
                     timeout=cap_seconds + grace)
    if out.status == "timeout":
        r.status, r.detail = "capped", f"a single step exceeded the {cap_seconds:.0f} s cap"
        return r
    if out.status == "error":
        r.status, r.detail = "error", _short_error(out.error)
        return r
    v = out.value
    if "refused" in v:
        r.status, r.detail = "refused", v["refused"]
        return r
    r.plain_s, r.method_s = _median(v["plain"]), _median(v["method"])
    r.ratio, r.reps = H.median_ratio(v["plain"], v["method"]), len(v["method"])
    r.q1, r.q3 = H.ratio_quartiles(v["plain"], v["method"])
    r.rel_err, r.notes, r.faults = v["rel_err"], v["notes"], tuple(v.get("faults", (None, None)))
    if v["capped"]:
        r.status = "capped"
        est = (f"≈{H.fmt_ratio(r.ratio)} from {r.reps} reps" if r.reps
               else f"warm-up {H.fmt_ratio(v['warmup'][1] / v['warmup'][0])}")
        r.detail = f"{est}; {reps} reps would exceed the {cap_seconds:.0f} s cap"
        return r
    if memory:
        per_step = r.method_s if method != "spectrum" else 0.0
        mem = runner.run("benchmarks.bench_torch:memory_job",
                         dict(model=model, batch_size=batch_size, method=method, seed=seed,
                              threads=threads),
                         timeout=grace + 10 * per_step, memory=True)
        if mem.status == "ok":
            r.mem_mb = mem.value["extra_mb"]
        else:
            r.notes.append(f"memory: {mem.status} ({_short_error(mem.error)})")
    return r


def run(models, batch_sizes, methods=METHODS, *, reps=DEFAULT_REPS, cap_seconds=DEFAULT_CAP,
        seed=0, memory=True, threads=None, start_method="forkserver",
        runner: H.IsolatedRunner | None = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)):
    """Runs every configuration; returns ``(results, plain_memory, reference_notes)``."""
    runner = runner or H.IsolatedRunner(preload=preload_for(models, methods), start_method=start_method)
    grace = SPAWN_GRACE_SECONDS if runner.start_method == "spawn" else GRACE_SECONDS
    plain_memory: dict[tuple[str, int], float | None] = {}
    ref_notes: dict[tuple[str, int], str] = {}
    plan = [(m, b, meth) for m in models for b in batch_sizes for meth in methods_for(m, tuple(methods))]
    done = 0

    def per_cell(model, b):
        ref = runner.run("benchmarks.bench_torch:reference_gram_job",
                         dict(model=model, batch_size=b, seed=seed, threads=threads),
                         timeout=cap_seconds + grace)
        reference = ref.value if ref.status == "ok" else None
        if reference is None:
            ref_notes[(model, b)] = f"no float64 reference: {ref.status} ({_short_error(ref.error)})"
            log(f"  {model} B={b}: {ref_notes[(model, b)]}")
        plain_mem = None
        if memory:
            pm = runner.run("benchmarks.bench_torch:memory_job",
                            dict(model=model, batch_size=b, method="plain", seed=seed,
                                 threads=threads),
                            timeout=cap_seconds + grace, memory=True)
            plain_mem = pm.value["extra_mb"] if pm.status == "ok" else None
        plain_memory[(model, b)] = plain_mem
        floor = None
        if any(m.startswith("fimcore") for m in methods):
            fl = runner.run("benchmarks.bench_torch:floor_job",
                            dict(model=model, batch_size=b, seed=seed, threads=threads),
                            timeout=cap_seconds + grace)
            floor = fl.value if fl.status == "ok" else None
            if floor is not None:
                log(f"  {model} B={b}: arithmetic floor {floor['floor']:.3f}× "
                    f"(Gram {floor['gram_macs']:.3g} / plain {floor['plain_macs']:.3g} MACs)")
        return reference, plain_mem, floor

    def per_config(model, b, method, cell):
        nonlocal done
        reference, plain_mem, floor = cell
        t0 = time.perf_counter()
        r = run_config(runner, model, b, method, reps=reps, cap_seconds=cap_seconds,
                       seed=seed, reference=reference, plain_mem=plain_mem, memory=memory,
                       threads=threads, grace=grace)
        if method.startswith("fimcore"):
            r.floor = floor
        done += 1
        shown = H.fmt_ratio(r.ratio) if r.status == "ok" else f"{r.status} ({r.detail})"
        log(f"[{done:3d}/{len(plan)}] {model} B={b} {method}: {shown} "
            f"[{time.perf_counter() - t0:.0f} s]")
        return r

    results: list[ConfigResult] = H.for_each_config(
        models, batch_sizes, lambda m: methods_for(m, tuple(methods)), per_cell=per_cell,
        per_config=per_config)
    return results, plain_memory, ref_notes


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mem_ok(mem: float | None, plain: float | None) -> bool | None:
    if mem is None or plain is None:
        return None
    if mem <= MEMORY_TARGET_RATIO * max(plain, 0.0):
        return True
    return plain < MEMORY_SMALL_PLAIN_MB and mem - plain <= MEMORY_TARGET_SMALL_MB


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


def _time_mark(r: ConfigResult) -> str:
    """✓/✗ against the model's time target only outside the ratio's interquartile range."""
    return "–" if r.status != "ok" else H.target_mark(r.q1, r.q3, TIME_TARGETS[r.model])


def _time_cell(r: ConfigResult) -> str:
    if r.status == "ok":
        if r.method == "spectrum":
            return f"{r.ratio:.4f}× (alone)"
        return H.fmt_ratio(r.ratio) + H.fmt_spread(r.q1, r.q3)
    if r.status == "capped":
        return f"skipped (cap; {r.detail})"
    if r.status == "refused":
        return f"refuses ({r.detail})"
    return f"error ({r.detail})"


def _faults_cell(r: ConfigResult) -> str:
    if r.status not in ("ok", "capped") or r.faults[0] is None or r.faults[1] is None:
        return "–"
    return f"{r.faults[0]:,.0f} / {r.faults[1]:,.0f}"


def _mem_cell(r: ConfigResult) -> str:
    if r.mem_mb is None:
        return "–"
    ratio = r.mem_ratio
    return f"{r.mem_mb:.0f} MB" + (f" ({ratio:.2f}×)" if ratio is not None and r.plain_mem_mb >= 1 else "")


def _floor_cell(r: ConfigResult) -> str:
    if not r.floor:
        return "–"
    return f"{r.floor['floor']:.2f}× ({r.floor['gram_macs']:.2g} / {r.floor['plain_macs']:.2g})"


def _err_cell(r: ConfigResult) -> str:
    return "–" if r.rel_err is None else f"{r.rel_err:.1e}"


def _target_cell(r: ConfigResult) -> str:
    if r.method not in ("fimcore", "fimcore-async") or r.model not in TIME_TARGETS:
        return ""
    return (f"time ≤ {TIME_TARGETS[r.model]}× {_time_mark(r)}; "
            f"memory {_mark(_mem_ok(r.mem_mb, r.plain_mem_mb))}")


def render(results: list[ConfigResult], plain_memory: dict, ref_notes: dict, *, command: str,
           machine: dict, versions: dict, settings: dict, seconds: float, quick: bool = False) -> str:
    """The Markdown report."""
    out = ["# PyTorch: a training step with the per-sample Gram, relative to the plain step", ""]
    if quick:
        out += ["**Quick run** (`--quick`: fewer models, B = 32, 3 repetitions, 10 s cap) — a check that "
                "everything runs, not the benchmark's figures; the full run is the same command without "
                "`--quick`.", ""]
    out += [f"Command (from the repository root): `{command}`  ",
            f"Wall time of the run: {seconds / 60:.1f} min. Settings: " +
            ", ".join(f"{k} = {v}" for k, v in settings.items()) + ".", ""]
    out += ["Time: median over the repetitions of the paired ratio (step with G and its eigenvalues) / "
            "(plain step: forward, mean cross-entropy, backward, SGD), plain and method interleaved in one "
            "child process per configuration. " + H.SPREAD_NOTE + " "
            f"Steps shorter than {H.MIN_REP_SECONDS} s are timed in runs of consecutive calls lasting about "
            "that long (paired per-call means). Memory: extra resident memory of a step (peak over 3 steps "
            "after 2 warm-ups minus the resident set before them) in a fresh child with "
            "`MALLOC_MMAP_THRESHOLD_=65536`; in brackets the ratio to the plain step's extra memory. "
            "Rel. error: ‖G − G_ref‖_F / ‖G_ref‖_F against fimcore's G of a float64 copy of the model "
            "(same batch, initial weights). Synthetic inputs; float32 models.", ""]
    targeted = [r for r in results if r.method == "fimcore" and r.model in TIME_TARGETS]
    if targeted:
        out += ["## Targets: step with G and its eigenvalues ≤ 1.3× the plain step (fimcore, strategy auto)", ""]
        rows = []
        for r in targeted:
            same = [x for x in results if (x.model, x.batch_size) == (r.model, r.batch_size)]
            base = {x.method: _time_cell(x) for x in same if x.method in ("torch.func", "backpack", "opacus", "torchjd")}
            g_only = next((x for x in same if x.method == "fimcore-noeig"), None)
            g_cell = "–" if g_only is None else _time_cell(g_only) + (
                f" {_time_mark(g_only)}" if g_only.status == "ok" else "")
            asy = next((x for x in same if x.method == "fimcore-async"), None)
            asy_cell = "–" if asy is None else _time_cell(asy) + (
                f" {_time_mark(asy)}" if asy.status == "ok" else "")
            rows.append([MODEL_LABELS[r.model], r.batch_size, f"≤ {TIME_TARGETS[r.model]}×", _time_cell(r),
                         _time_mark(r), g_cell, asy_cell, _floor_cell(r),
                         _mem_cell(r), f"{r.plain_mem_mb:.0f} MB" if r.plain_mem_mb is not None else "–",
                         _mark(_mem_ok(r.mem_mb, r.plain_mem_mb)),
                         "; ".join(f"{k} {v}" for k, v in base.items())])
        out += [H.markdown_table(["model", "B", "time target", "fimcore (auto), G + eigenvalues", "time met",
                                  "G alone (no eigenvalues)", "G + async MeasureTracker",
                                  "arithmetic floor (1 + Gram MACs / plain MACs)", "extra memory",
                                  "plain step's", "memory ≤ 1.3× (or +50 MB) met", "baselines in this run"],
                                 rows), ""]
    for model in dict.fromkeys(r.model for r in results):
        out += [f"## {MODEL_LABELS[model]}", ""]
        rows = []
        for r in (x for x in results if x.model == model):
            rows.append([r.batch_size, METHOD_LABELS[r.method], H.fmt_ms(r.plain_s), H.fmt_ms(r.method_s),
                         _time_cell(r), _faults_cell(r), _mem_cell(r), _err_cell(r), _target_cell(r),
                         "; ".join(r.notes[:1]) if r.method != "fimcore" else ""])
        out += [H.markdown_table(["B", "method", "plain (ms)", "with G (ms)", "time ratio",
                                  "page faults / step (plain / with G)", "extra memory",
                                  "rel. error of G", "target", "notes"], rows), ""]
        floors = {x.batch_size: x.floor for x in results if x.model == model and x.floor}
        extra = [f"- B = {b}: plain step extra memory "
                 + (f"{plain_memory[(model, b)]:.0f} MB" if plain_memory.get((model, b)) is not None else "–")
                 + (f"; arithmetic floor of the recorder's step {floors[b]['floor']:.3f}× (Gram products "
                    f"{floors[b]['gram_macs']:.3g} MACs / plain step {floors[b]['plain_macs']:.3g} MACs)"
                    if b in floors else "")
                 + (f"; {ref_notes[(model, b)]}" if (model, b) in ref_notes else "")
                 for (m, b) in plain_memory if m == model]
        out += extra + [""]
    reports = [r for r in results if r.method == "fimcore" and r.notes]
    if reports:
        out += ["## fimcore per-layer paths (`GramRecorder.report()`, first step)", ""]
        for r in reports:
            out += [f"<details><summary>{MODEL_LABELS[r.model]}, B = {r.batch_size}, {r.method}</summary>",
                    "", "```", r.notes[0], "```", "", "</details>", ""]
    out += ["## Notes", "",
            "- torch.func: BatchNorm layers normalise each sample with its own statistics under `vmap` "
            "(`replace_all_batch_norm_modules_`), so its G differs from the train-mode batch semantics "
            "(rows = per-sample contributions of the batch backward) that fimcore and BackPACK use.",
            "- BackPACK has no `BatchGrad` extension for GroupNorm and LayerNorm: those parameters' columns "
            "are missing from its G (see the rel. error column).",
            "- Opacus refuses BatchNorm (a trainable layer with buffers); the GroupNorm ResNet-20 is the "
            "comparison for it.",
            "- Baselines build G as Σ over parameters of J_p J_pᵀ from the per-sample gradients they "
            "materialise (B × P in total); fimcore never holds B × P.",
            "- \"skipped (cap)\": the configuration's repetitions would not fit in the time cap; the "
            "partial figure in brackets is indicative only.",
            "- Page faults: median minor page faults per call of each step in the timing child. glibc "
            "hands freed blocks above its mmap/trim thresholds back to the kernel, so a step that frees "
            "and re-allocates large temporaries (per-sample gradients, patches) pays for fresh pages "
            "again; how many depends on the heap's history, and ratios move with it from run to run.", ""]
    out += ["## Machine and versions", "", H.key_value_table({**machine, **versions}), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_torch", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"models {', '.join(QUICK_MODELS)} at B = 32, 3 reps, 10 s cap (about 2 min)")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=None)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--reps", type=int, default=None, help=f"repetitions (default {DEFAULT_REPS})")
    p.add_argument("--cap-seconds", type=float, default=None,
                   help=f"time cap per configuration (default {DEFAULT_CAP:.0f})")
    p.add_argument("--no-memory", action="store_true", help="skip the memory children")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in each child (default: torch's own, all cores)")
    p.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver",
                   help="children forked from a server that imported torch once (default), or fresh "
                        "interpreters (slower start; memory children get MALLOC_MMAP_THRESHOLD_ literally)")
    p.add_argument("--seed", type=int, default=0)
    R.add_fisher_option(p)
    p.add_argument("--output", default=None,
                   help="Markdown file (default benchmarks/results/torch.md; torch_sampled.md with "
                        "--fisher sampled alone)")
    a = p.parse_args(argv)
    models = a.models or (list(QUICK_MODELS) if a.quick else list(MODEL_NAMES))
    batch_sizes = a.batch_sizes or ([32] if a.quick else [32, 128])
    reps = a.reps if a.reps is not None else (3 if a.quick else DEFAULT_REPS)
    cap = a.cap_seconds if a.cap_seconds is not None else (10.0 if a.quick else DEFAULT_CAP)
    sampled_only = a.fisher == ("sampled",)
    output = a.output or f"benchmarks/results/torch{'_sampled' if sampled_only else ''}.md"
    if reps < 1 or cap <= 0 or any(b < 1 for b in batch_sizes):
        p.error(f"--reps and --batch-sizes must be ≥ 1 and --cap-seconds > 0; received reps={reps}, "
                f"batch sizes={batch_sizes}, cap={cap}.")
    machine = H.machine_info()
    versions = {f"{k} version": v for k, v in H.package_versions(
        ["torch", "numpy", "backpack-for-pytorch", "opacus", "fimcore"]).items()}
    import torch

    versions["torch threads"] = str(a.threads or torch.get_num_threads())
    t0 = time.perf_counter()
    text = ""
    if "empirical" in a.fisher:
        results, plain_memory, ref_notes = run(models, batch_sizes, a.methods, reps=reps, cap_seconds=cap,
                                               seed=a.seed, memory=not a.no_memory, threads=a.threads,
                                               start_method=a.start_method)
    if "sampled" in a.fisher:
        runner = H.IsolatedRunner(preload=preload_for(models, ["fimcore"]), start_method=a.start_method)
        grace = SPAWN_GRACE_SECONDS if runner.start_method == "spawn" else GRACE_SECONDS
        table, sampled_notes = R.run_grid(
            runner, "benchmarks.bench_torch:sampled_timing_job", model_labels=MODEL_LABELS, models=models,
            batch_sizes=batch_sizes, timeout=cap + grace,
            job_kwargs=dict(reps=reps, cap_seconds=cap, seed=a.seed, threads=a.threads),
            log=lambda s: print(s, file=sys.stderr, flush=True))
        details = (f"Reps = {reps}, cap per (model, B) = {cap:.0f} s, seed = {a.seed}, torch threads = "
                   f"{versions['torch threads']}. The empirical step is the `fimcore` (auto) row's step; "
                   "the sampled one is `GramRecorder(model, fisher=\"sampled\", loss=nn.CrossEntropyLoss(), "
                   "mc_samples=1, seed=seed)` around the same forward and backward.")
    machine["load average (1/5/15 min) at end"] = H.load_average()
    if "empirical" in a.fisher:
        text = render(results, plain_memory, ref_notes, command=H.command_line(), machine=machine,
                      versions=versions, settings={"reps": reps, "cap per configuration": f"{cap:.0f} s",
                                                   "seed": a.seed, "memory": not a.no_memory,
                                                   "children": a.start_method},
                      seconds=time.perf_counter() - t0, quick=a.quick)
        if "sampled" in a.fisher:
            text = R.insert_section(text, table, sampled_notes, details=details)
    else:
        text = R.standalone_report(
            "PyTorch: the sampled-label Fisher Gram's step beside the empirical one",
            command=H.command_line(), table=table, notes=sampled_notes, machine=machine,
            versions=versions, details=details,
            preamble=[f"Wall time of the run: {(time.perf_counter() - t0) / 60:.1f} min."])
    H.write_report(output, text)
    print(text)
    print(f"written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
