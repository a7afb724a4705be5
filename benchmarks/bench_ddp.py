"""The global-scope Gram under DDP: bytes gathered per step and step time against plain DDP.

Two parts:

* ``--cost-model`` (no processes, no timing): per layer, the bytes one rank contributes to the
  Gram all-gathers in the two exact forms — factors ``B·T·(d_a + d_g)`` (inputs and output
  gradients of a weight used at T positions) and rows ``B·P_l`` (per-sample gradients) — and the
  form the recorder gathers (factors on the factored path, which the cost model picks at the
  global N; rows otherwise), for the paper's ResNet-110 and DenseNet-110 at a global batch of
  128 on 8 ranks (float32, 4 bytes). Each all-gather delivers W − 1 times a rank's contribution
  to every rank.
* the default: ``W`` gloo processes on 127.0.0.1 (one thread each), per model a plain DDP step
  and a ``GramRecorder(ddp)`` (``scope="global"``) step, interleaved, median and spread of the
  per-step ratio on rank 0, plus the bytes the recorder reports.

Run from the repository root::

    python -m benchmarks.bench_ddp --cost-model
    python -m benchmarks.bench_ddp --worlds 2 4 --models mlp resnet20-bn --out benchmarks/results/ddp.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import _torch_models as M

GLOBAL_BATCH = 128


# ------------------------------------------------------------------------------ cost model
def layer_shapes(model: nn.Module, inputs: torch.Tensor) -> list[dict]:
    """One forward of a single sample: per parameterised layer, T, d_a, d_g and P."""
    rows, handles = [], []

    def hook(name):
        def record(m, args, out):
            x = args[0]
            if isinstance(m, nn.Linear):
                T, d_a, d_g = math.prod(x.shape[1:-1]), m.in_features, m.out_features
            elif isinstance(m, nn.Conv2d):
                T = out[0, 0].numel()
                d_a = m.in_channels // m.groups * math.prod(m.kernel_size)
                d_g = m.out_channels
            else:                                     # norm layers: affine rows only
                T, d_a, d_g = None, None, None
            P = sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
            rows.append({"name": name, "module": type(m).__name__, "T": T, "d_a": d_a,
                         "d_g": d_g, "P": P, "bias": getattr(m, "bias", None) is not None,
                         "groups": getattr(m, "groups", 1)})
        return record

    for name, m in model.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model.eval()(inputs[:1])
    finally:
        for h in handles:
            h.remove()
    return rows


def cost_model(name: str, *, global_batch: int = GLOBAL_BATCH, world: int = 8,
               itemsize: int = 4) -> dict:
    """Bytes per rank and step, per layer, for model ``name`` (see the module docstring)."""
    from fimcore_adapters._torch.cost import choose

    torch.manual_seed(0)
    model = M.build(name)
    x, _ = M.batch(name, 1)
    B = global_batch // world
    layers = []
    for r in layer_shapes(model, x):
        rows_b = B * r["P"] * itemsize
        if r["T"] is None:
            fac_b, path = None, "materialize"
        else:
            fac_b = B * r["T"] * (r["d_a"] + r["d_g"]) * itemsize
            p_w = r["P"] - (r["d_g"] if r["bias"] else 0)
            path = choose("auto", global_batch, r["T"], r["d_a"], r["d_g"], p_w)[0]
        gathered = fac_b if path == "factored" else rows_b
        layers.append({**r, "rows_bytes": rows_b, "factor_bytes": fac_b,
                       "form": "factors" if path == "factored" else "rows", "bytes": gathered,
                       "min_bytes": rows_b if fac_b is None else min(rows_b, fac_b)})
    total = sum(r["bytes"] for r in layers)
    return {"model": name, "world": world, "global_batch": global_batch, "local_batch": B,
            "layers": layers, "bytes": total, "min_bytes": sum(r["min_bytes"] for r in layers),
            "rows_bytes": sum(r["rows_bytes"] for r in layers),
            "params": sum(r["P"] for r in layers)}


def cost_model_markdown(res: dict) -> str:
    mb = 1e6
    lines = [f"### {M.MODEL_LABELS[res['model']]}: global B = {res['global_batch']} on "
             f"{res['world']} ranks (local B = {res['local_batch']}), float32",
             "",
             f"Per rank and step: **{res['bytes'] / mb:.1f} MB** contributed to the Gram "
             f"all-gathers ({res['params']:,} parameters; all rows would be "
             f"{res['rows_bytes'] / mb:.1f} MB, the smaller form everywhere "
             f"{res['min_bytes'] / mb:.1f} MB); each rank receives {res['world'] - 1}× that, "
             f"{(res['world'] - 1) * res['bytes'] / mb:.1f} MB. By layer kind:",
             "",
             "| layers | T | count | factors (MB) | rows (MB) | gathered form | gathered (MB) |",
             "|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in res["layers"]:
        groups.setdefault((r["module"], r["T"], r["form"]), []).append(r)
    for (mod, T, form), rs in groups.items():
        fb = None if rs[0]["factor_bytes"] is None else sum(r["factor_bytes"] for r in rs)
        lines.append(f"| {mod} | {T if T is not None else '-'} | {len(rs)} | "
                     f"{'-' if fb is None else f'{fb / mb:.2f}'} | "
                     f"{sum(r['rows_bytes'] for r in rs) / mb:.2f} | {form} | "
                     f"{sum(r['bytes'] for r in rs) / mb:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ timing
def _worker(rank, world, port, outdir, models, reps, global_batch):
    torch.set_num_threads(1)
    import torch.distributed as dist
    from fimcore_adapters.torch import GramRecorder

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    out = {}
    for name in models:
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(M.build(name))
        rec = GramRecorder(ddp, check_uses="first")
        B = global_batch // world
        x, y = M.batch(name, B, seed=rank)

        def plain():
            ddp.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()

        def measured():
            ddp.zero_grad(set_to_none=True)
            with rec:
                F.cross_entropy(ddp(x), y).backward()
            rec.gram()

        for f in (plain, measured, plain, measured):          # warm-up (conv method timing)
            f()
        tp, tm = [], []
        for _ in range(reps):
            for f, ts in ((plain, tp), (measured, tm)):
                dist.barrier()
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
        rep = rec.report()
        out[name] = {"plain": tp, "measured": tm, "comm": rep.communication,
                     "forms": {r.name: r.gathered for r in rep}}
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run(world: int, models, reps: int, global_batch: int = GLOBAL_BATCH, timeout: float = 900.0) -> dict:
    """Spawn ``world`` gloo ranks and time the models; rank 0's results."""
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [ctx.Process(target=_worker, args=(r, world, port, outdir, list(models), reps, global_batch))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a benchmark rank failed or timed out: exit codes {[p.exitcode for p in procs]}")
        return torch.load(os.path.join(outdir, "rank0.pt"), weights_only=False)


def _ratio_row(world, name, d, global_batch):
    ratios = sorted(m / p for p, m in zip(d["plain"], d["measured"]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    comm = d["comm"]
    forms = {}
    for f in d["forms"].values():
        if f:
            forms[f] = forms.get(f, 0) + 1
    return (f"| {world} | {M.MODEL_LABELS[name]} | {global_batch} ({global_batch // world}/rank) | "
            f"{1e3 * statistics.median(d['plain']):.1f} | {1e3 * statistics.median(d['measured']):.1f} | "
            f"**{statistics.median(ratios):.2f}×** | {q[0]:.2f}–{q[2]:.2f} | {len(ratios)} | "
            f"{comm['bytes'] / 1e6:.3f} | {', '.join(f'{k} {v}' for k, v in sorted(forms.items()))} |")


def _machine() -> str:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cost-model", action="store_true", help="print the paper models' bytes per step")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--models", nargs="+", default=["mlp", "resnet20-bn"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--global-batch", type=int, default=GLOBAL_BATCH)
    ap.add_argument("--out", default=None, help="write the markdown here")
    args = ap.parse_args(argv)
    cmd = "python -m benchmarks.bench_ddp " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.cost_model:
        text = "\n\n".join(cost_model_markdown(cost_model(n)) for n in ("liao-resnet110", "liao-densenet110"))
    else:
        lines = ["| W | model | global B | plain DDP (ms) | global Gram (ms) | ratio | IQR | pairs | "
                 "MB gathered / rank | forms (layers) |", "|---|---|---|---|---|---|---|---|---|---|"]
        t0 = time.monotonic()
        for w in args.worlds:
            res = run(w, args.models, args.reps, args.global_batch)
            for name in args.models:
                lines.append(_ratio_row(w, name, res[name], args.global_batch))
        text = "\n".join(lines) + f"\n\n({time.monotonic() - t0:.0f} s wall)"
    text = f"`{cmd}` — {_machine()}\n\n{text}"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
