"""MBF's per-iteration time and memory against Adam and SGD-momentum (PyTorch, CPU, 1 thread).

Run from the repository root::

    python -m benchmarks.bench_mbf            # writes benchmarks/results/mbf.md
    python -m benchmarks.bench_mbf --quick    # 3 repetitions, no memory children

Two training steps (zero_grad, forward, loss, backward, optimiser step):

* **ResNet-32** (He et al. CIFAR ResNet, BatchNorm, 464,154 parameters), 3×32×32 random inputs,
  batch 128, cross-entropy; MBF at the paper's CNN settings (T1 = 10, T2 = 100, λ = 0.003);
* **MNIST autoencoder** 784-1000-500-250-30-250-500-1000-784, batch 1000, binary cross-entropy;
  MBF at the paper's autoencoder settings (T1 = 1, T2 = 20), every dense layer but 250→30 and
  30→250 above the 2^24-entry threshold and so spatially averaged.

MBF's cost depends on where a step falls in its schedule, so three kinds of step are timed by
setting the optimiser's step counter: *plain* (momentum and solves only), *refresh* (plus the
curvature EMA) and *refresh + factor* (plus the batched Cholesky). The per-iteration cost is
their amortised mean, ``plain + (refresh − plain)/T1 + (factor − refresh)/T2`` (for T1 = 1 the
refresh is in every step). Each kind is timed against Adam's step in one process, interleaved
(Adam, MBF, Adam, MBF, …), as the median of paired ratios (:func:`benchmarks._harness.interleaved_times`);
the clock is the process CPU time, which with one thread is the step's wall time on an idle core
and is not inflated by other processes on a shared machine. Memory: the optimiser state (exact
bytes of its tensors) and the extra resident memory of a step in a fresh child process
(:func:`benchmarks._harness.step_memory`).
"""

from __future__ import annotations

import argparse
import time

from benchmarks import _harness as H

AE_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
MODELS = {"resnet32": "ResNet-32, B = 128, 3×32×32", "ae": "MNIST autoencoder, B = 1000"}
SCHEDULE = {"resnet32": (10, 100), "ae": (1, 20)}


def _setup(model_name: str, method: str, seed: int = 0):
    import torch
    from torch import nn

    from fimcore_adapters.torch import MBF
    from reference_training.models import resnet32

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if model_name == "resnet32":
        model = resnet32(in_channels=3, num_classes=10)
        x = torch.randn(128, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (128,), generator=g)
        loss_fn = nn.functional.cross_entropy
    else:
        mods = []
        for i, (a, b) in enumerate(zip(AE_WIDTHS[:-1], AE_WIDTHS[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(AE_WIDTHS) - 2 and b != 30:
                mods.append(nn.ReLU())
        model = nn.Sequential(*mods)
        x = torch.rand(1000, 784, generator=g)
        y = x
        loss_fn = lambda o, t: nn.functional.binary_cross_entropy_with_logits(o, t, reduction="sum") / t.shape[0]  # noqa: E731
    t1, t2 = SCHEDULE[model_name]
    if method == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    elif method == "sgdm":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    else:
        opt = MBF(model, lr=1e-6, curvature_every=t1, inverse_every=t2)

    def step(t=None):
        if t is not None:
            opt._t = t
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    step()                      # creates every state tensor (t = 0: refresh and factor)
    return model, opt, step


def _state_mb(opt) -> float:
    import torch

    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total / 1e6


def memory_job(model_name: str, method: str) -> dict:
    """Child-process job: optimiser state and the extra resident memory of a step (MB)."""
    _, opt, step = _setup(model_name, method)
    m = H.step_memory(step, warmup=2, steps=3)
    return {"state_mb": _state_mb(opt), "extra_mb": m.extra_mb}


def time_model(model_name: str, reps: int, cap: float) -> dict:
    """Median paired ratios to Adam (and per-step CPU times) of SGD-m and the three MBF steps."""
    import torch  # noqa: F401

    _, _, adam = _setup(model_name, "adam")
    _, _, sgd = _setup(model_name, "sgdm")
    _, _, mbf_step = _setup(model_name, "mbf")
    t1, t2 = SCHEDULE[model_name]
    kinds = {"sgdm": sgd, "mbf plain": lambda: mbf_step(1 if t1 > 1 else None),
             "mbf refresh": lambda: mbf_step(t1 if t1 > 1 else 1),
             "mbf refresh + factor": lambda: mbf_step(0)}
    if t1 == 1:
        kinds.pop("mbf plain")
    out = {}
    for name, fn in kinds.items():
        t = H.interleaved_times(adam, fn, reps=reps, cap_seconds=cap, clock=time.process_time)
        q1, q3 = H.ratio_quartiles(t.baseline, t.candidate)
        out[name] = {"ratio": t.ratio, "q1": q1, "q3": q3, "adam_s": sorted(t.baseline)[len(t.baseline) // 2],
                     "step_s": sorted(t.candidate)[len(t.candidate) // 2], "reps": t.reps}
    r = {k: v["ratio"] for k, v in out.items()}
    plain = r.get("mbf plain", r["mbf refresh"])
    out["mbf amortised"] = {"ratio": plain + (r["mbf refresh"] - plain) / t1
                            + (r["mbf refresh + factor"] - r["mbf refresh"]) / t2}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_mbf", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--cap", type=float, default=120.0, help="CPU seconds per comparison")
    p.add_argument("--out", default="benchmarks/results/mbf.md")
    args = p.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    t_start = time.perf_counter()
    info = H.machine_info()
    versions = H.package_versions(["torch", "numpy"])
    rows, mem_rows, results = [], [], {}
    runner = None if args.quick else H.IsolatedRunner(preload=["torch", "benchmarks.bench_mbf"])
    for model_name, label in MODELS.items():
        res = time_model(model_name, reps, args.cap)
        results[model_name] = res
        adam_ms = 1e3 * res["sgdm"]["adam_s"]
        for kind in ("sgdm", "mbf plain", "mbf refresh", "mbf refresh + factor", "mbf amortised"):
            if kind not in res:
                continue
            v = res[kind]
            spread = H.fmt_spread(v["q1"], v["q3"]) if "q1" in v else ""
            ms = f"{1e3 * v['step_s']:.0f}" if "step_s" in v else "–"
            rows.append([label, kind.replace("sgdm", "SGD-momentum").replace("mbf", "MBF"), ms,
                         f"{adam_ms:.0f}", f"{v['ratio']:.2f}×{spread}", v.get("reps", "–")])
        if runner is not None:
            for method in ("adam", "sgdm", "mbf"):
                m = runner.run("benchmarks.bench_mbf:memory_job", {"model_name": model_name, "method": method},
                               timeout=600, memory=True)
                if m.status == "ok":
                    mem_rows.append([label, {"adam": "Adam", "sgdm": "SGD-momentum", "mbf": "MBF"}[method],
                                     f"{m.value['state_mb']:.1f}", f"{m.value['extra_mb']:.0f}"])
                else:
                    mem_rows.append([label, method, m.status, m.error[-200:] if m.error else ""])
    text = [
        "# MBF per-iteration cost against Adam and SGD-momentum (PyTorch, CPU, one thread)", "",
        f"Command: `{H.command_line()}` (total {time.perf_counter() - t_start:.0f} s wall).", "",
        "Ratios are medians of paired per-step CPU-time ratios to Adam's step in the same process "
        "(interquartile range in brackets); the amortised MBF figure is plain + (refresh − plain)/T1 "
        "+ (factor − refresh)/T2 with the paper's T1/T2 (ResNet 10/100, autoencoder 1/20, where every "
        "step refreshes). See the module docstring of `benchmarks/bench_mbf.py` for the protocol.", "",
        H.markdown_table(["model", "step", "step (ms CPU)", "Adam step (ms CPU)", "ratio to Adam", "reps"], rows),
        "",
    ]
    if mem_rows:
        text += ["Memory: optimiser state (exact tensor bytes) and extra resident memory of a step "
                 "(fresh child process, peak over 3 steps after 2 warm-ups, minus the resident set before).", "",
                 H.markdown_table(["model", "optimiser", "state (MB)", "step extra RSS (MB)"], mem_rows), ""]
    text += ["## Machine", "", H.key_value_table({**info, **{f"{k} version": v for k, v in versions.items()}}), ""]
    path = H.write_report(args.out, "\n".join(text))
    print("\n".join(text))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
