"""The ranks of ``test_torch_ddp.py``: models, data, cases and the spawned worker.

Kept apart from the test module so that the spawned processes import only torch and the adapter
(not the test suite's conftest with its other backends).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

mp = torch.multiprocessing

_TIMEOUT = 120.0      # hard limit of one spawn (seconds); the processes are killed after it


# ---------------------------------------------------------------------------------- models
class TiedMLP(nn.Module):
    """The same Linear applied twice (tied weights)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.hid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.hid(h))
        h = torch.tanh(self.hid(h))
        return self.out(h)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(1234)
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    elif kind == "bn":
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 4, 3, stride=2, groups=1), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    elif kind == "tied":
        m = TiedMLP()
    else:
        raise ValueError(kind)
    return m.double()


def make_data(kind: str, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 5) if kind in ("mlp", "tied") else (n, 2, 6, 6)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


# name -> (model, sizes per rank for world 2 / world 4, reduction, scope, recorder options)
CASES = {
    "mlp": ("mlp", {2: [4, 4], 4: [3, 3, 3, 3]}, "mean", "global", {}),
    "mlp_sum": ("mlp", {2: [4, 4], 4: [2, 2, 2, 2]}, "sum", "global", {}),
    "uneven": ("mlp", {2: [5, 2], 4: [4, 4, 3, 1]}, "mean", "global", {}),
    "uneven_sum": ("mlp", {2: [5, 2], 4: [4, 4, 3, 1]}, "sum", "global", {}),
    "bn": ("bn", {2: [4, 3], 4: [3, 3, 2, 2]}, "mean", "global", {"keep_blocks": True}),
    "bn_factored": ("bn", {2: [3, 3]}, "mean", "global", {"strategy": "factored"}),
    "tied": ("tied", {2: [3, 4], 4: [2, 2, 2, 1]}, "mean", "global", {}),
    "local": ("bn", {2: [4, 3], 4: [3, 3, 2, 2]}, "mean", "local", {}),
    "default": ("mlp", {2: [3, 3]}, "mean", None, {}),
    "plain_module": ("mlp", {2: [3, 2]}, "mean", "global", {}),
}


def _loss(out, y, reduction):
    return F.cross_entropy(out, y, reduction=reduction)


# ---------------------------------------------------------------------------------- ranks
def _case(name, rank, world):
    kind, sizes, red, scope, opts = CASES[name]
    sizes = sizes[world]
    x, y = make_data(kind, sum(sizes), seed=len(name))
    lo = sum(sizes[:rank])
    xl, yl = x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]
    DDP = nn.parallel.DistributedDataParallel
    from fimcore_adapters.torch import GramRecorder

    # plain DDP step: the gradient the recorder must not change
    plain = DDP(make_model(kind), broadcast_buffers=False)
    _loss(plain(xl), yl, red).backward()
    plain_grads = [p.grad.clone() for p in plain.module.parameters()]

    model = make_model(kind)
    wrapped = model if name == "plain_module" else DDP(model, broadcast_buffers=False)
    rec = GramRecorder(wrapped, loss_reduction=red, scope=scope, timeout=60, **opts)
    with rec:
        _loss(wrapped(xl), yl, red).backward()
    res = {"G": rec.gram().clone(), "grads": [p.grad.clone() for p in model.parameters()],
           "plain_grads": plain_grads, "scope": rec.scope, "report": rec.report().communication,
           "gathered": {r.name: r.gathered for r in rec.report()},
           "trace_sum": sum(r.trace for r in rec.report() if r.trace is not None)}
    if opts.get("keep_blocks"):
        res["blocks"] = {k: v.clone() for k, v in rec.blocks().items()}
    return res


def _no_sync(rank, world):
    """Two micro-batches: the first under no_sync (DDP does not all-reduce), then a synced one."""
    DDP = nn.parallel.DistributedDataParallel
    from fimcore_adapters.torch import GramRecorder

    sizes = [3] * world
    x, y = make_data("mlp", 2 * sum(sizes), seed=99)
    n = sum(sizes)
    parts = [(x[:n], y[:n]), (x[n:], y[n:])]
    local = [(a[rank * 3:rank * 3 + 3], b[rank * 3:rank * 3 + 3]) for a, b in parts]
    plain = DDP(make_model("mlp"))
    with plain.no_sync():
        _loss(plain(local[0][0]), local[0][1], "mean").backward()
    plain_mid = [p.grad.clone() for p in plain.module.parameters()]
    _loss(plain(local[1][0]), local[1][1], "mean").backward()
    plain_end = [p.grad.clone() for p in plain.module.parameters()]

    ddp = DDP(make_model("mlp"))
    rec = GramRecorder(ddp, scope="global", timeout=60)
    with ddp.no_sync(), rec:
        _loss(ddp(local[0][0]), local[0][1], "mean").backward()
    G0, synced0 = rec.gram().clone(), rec.report().communication["synced"]
    mid = [p.grad.clone() for p in ddp.module.parameters()]
    with rec:
        _loss(ddp(local[1][0]), local[1][1], "mean").backward()
    return {"G0": G0, "G1": rec.gram().clone(), "synced0": synced0,
            "synced1": rec.report().communication["synced"], "mid": mid, "end":
            [p.grad.clone() for p in ddp.module.parameters()], "plain_mid": plain_mid,
            "plain_end": plain_end}


def _worker(rank, world, port, outdir, die):
    import warnings

    # torch 2.13 deprecates broadcast_buffers in favour of forward_sync_buffers, whose False still
    # syncs at construction; the tests want rank-local buffers, which only broadcast_buffers gives
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
    torch.set_num_threads(1)
    import torch.distributed as dist

    out = {}
    t_import = time.monotonic()
    import fimcore_adapters.torch  # noqa: F401
    t_init = time.monotonic()
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        times = {"import": t_import, "init": t_init, "start": time.monotonic()}
        for name, case in CASES.items():
            if world in case[1]:
                out[name] = _case(name, rank, world)
                times[name] = time.monotonic()
        out["no_sync"] = _no_sync(rank, world)
        from fimcore_adapters.torch import GramRecorder, mean_over_ranks
        out["mean"] = mean_over_ranks({"b": 2.0 * rank, "a": 1.0})
        try:
            GramRecorder(nn.parallel.DistributedDataParallel(make_model("mlp")), fisher="sampled",
                         loss="cross_entropy")
            out["sampled"] = None
        except ValueError as exc:
            out["sampled"] = str(exc)
        times["rest"] = time.monotonic()
        out["times"] = times
        if die:
            # last: rank 1 stops before a measured step; the others must fail, not hang
            ddp = nn.parallel.DistributedDataParallel(make_model("mlp"), broadcast_buffers=False)
            rec = GramRecorder(ddp, timeout=5)
            x, y = make_data("mlp", 4, seed=0)
            torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
            if rank == 1:
                os._exit(3)
            t0 = time.monotonic()
            try:
                with rec:
                    _loss(ddp(x), y, "mean").backward()
                out["error"] = None
            except RuntimeError as exc:
                out["error"] = str(exc)
            out["seconds"] = time.monotonic() - t0
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    os._exit(0)                               # skip teardown of a group with a dead peer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, die: bool) -> dict:
    """Run ``_worker`` on ``world`` ranks; return ``{rank: saved dict}``; kill all after the
    hard timeout."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, outdir, die), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + _TIMEOUT
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.join(5)
        errs = {r: open(os.path.join(outdir, f"rank{r}.err")).read() for r in range(world)
                if os.path.exists(os.path.join(outdir, f"rank{r}.err"))}
        assert not hung, f"ranks {[procs.index(p) for p in hung]} hung past {_TIMEOUT} s; errors: {errs}"
        assert not errs, "\n".join(f"rank {r}:\n{e}" for r, e in errs.items())
        return {r: torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
                for r in range(world)}


