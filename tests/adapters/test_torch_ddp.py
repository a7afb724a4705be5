"""GramRecorder under torch DDP: 2- and 4-process gloo runs against a float64 per-sample loop.

Each world size is spawned once (process start-up dominates) and runs every case inside; the
ranks save their Grams and gradients to files, which the test compares with references computed
here by a per-sample loop (one autograd call per sample) that shares no code with the recorder.
Row convention under test (see ``_torch/distributed.py``): row i of rank r is
``N/(W·B_r)·∇ℓ_i`` for a mean loss, ``∇ℓ_i/W`` for a sum, where ``ℓ_i`` is taken from the
rank's own batch forward (per-rank BatchNorm couples a sample with its own rank's samples only).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import tempfile
import time
import traceback

import pytest

from tests.adapters._torch_reference import contribution_gram, loop_gram
from tests.conftest import import_backend

torch = import_backend("torch")
mp = torch.multiprocessing
nn = torch.nn
F = torch.nn.functional

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
           "gathered": {r.name: r.gathered for r in rec.report()}}
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
    torch.set_num_threads(1)
    import torch.distributed as dist

    out = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        times = {"start": time.monotonic()}
        for name, case in CASES.items():
            if world in case[1]:
                out[name] = _case(name, rank, world)
                times[name] = time.monotonic()
        out["no_sync"] = _no_sync(rank, world)
        from fimcore_adapters.torch import GramRecorder, mean_over_ranks
        out["mean"] = mean_over_ranks({"b": 2.0 * rank, "a": 1.0})
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


# ---------------------------------------------------------------------------------- references
def reference_rows(kind, sizes, red, seed):
    """Per-rank references: (N, P) rows of the global J, each rank's local J, the DDP gradient.

    Rank r's rows are the per-sample contributions of its own batch backward
    (BatchNorm model: ``contribution_gram``, one autograd call per module and sample with the
    cotangent masked to the sample; otherwise ``loop_gram``, one forward and backward per sample,
    ``∇ℓ_i/B_r`` for a mean loss), scaled
    by N/W (mean) or 1/W (sum); the local J is scaled by B_r (mean) or 1 (sum).
    """
    model = make_model(kind)
    x, y = make_data(kind, sum(sizes), seed)
    W, N = len(sizes), sum(sizes)
    rows, locals_, grad = [], [], 0.0
    lo = 0
    for B in sizes:
        xb, yb = x[lo:lo + B], y[lo:lo + B]
        lo += B
        if kind == "bn":          # couples samples: contributions of the rank's batch backward
            _, C = contribution_gram(model, lambda o, t: _loss(o, t, red), xb, yb, scale=1.0)
        else:                     # independent samples: one forward and backward per sample
            _, C = loop_gram(model, lambda o, t: _loss(o, t, "sum"), xb, yb)
            C = C / B if red == "mean" else C
        rows.append(C * ((N / W) if red == "mean" else 1.0 / W))
        locals_.append(C * (B if red == "mean" else 1.0))
        grad = grad + C.sum(0) / W
    return torch.cat(rows), locals_, grad


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def world_results(request):
    return request.param, _spawn(request.param, die=request.param == 2)


def test_global_gram_equals_concatenated_batch_per_sample_loop(world_results):
    world, res = world_results
    for name, (kind, sizes, red, scope, _) in CASES.items():
        if world not in sizes or CASES[name][3] == "local":
            continue
        sizes = sizes[world]
        J, _, grad = reference_rows(kind, sizes, red, seed=len(name))
        G_ref = J @ J.T
        for r in range(world):
            G = res[r][name]["G"]
            assert G.shape == (sum(sizes), sum(sizes)), (name, G.shape)
            assert _rel(G, G_ref) <= 1e-12, (name, r, _rel(G, G_ref))
        if name == "plain_module":      # no DDP: .grad is the rank's own, not averaged
            continue
        # the invariant with the DDP gradient: 1ᵀG1 = N²‖∇L‖² (mean), ‖∇L‖² (sum)
        N = sum(sizes)
        g = _flat(res[0][name]["grads"])
        scale = N ** 2 if red == "mean" else 1.0
        assert abs(float(G_ref.sum()) - scale * float(g @ g)) <= 1e-10 * scale * float(g @ g), name


def test_equal_batches_give_the_single_process_gram_of_the_concatenated_batch(world_results):
    """For equal local batches (mean) the rows are ∇ℓ_i themselves: one process, whole batch."""
    world, res = world_results
    kind, sizes, *_ = CASES["mlp"]
    sizes = sizes[world]
    model = make_model(kind)
    x, y = make_data(kind, sum(sizes), seed=len("mlp"))
    rows = []
    for i in range(sum(sizes)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(_flat([p.grad for p in model.parameters()]))
    J = torch.stack(rows)
    assert _rel(res[world - 1]["mlp"]["G"], J @ J.T) <= 1e-12


def test_gradient_equals_plain_ddp_and_the_averaged_reference(world_results):
    world, res = world_results
    for name, (kind, sizes, red, scope, _) in CASES.items():
        if world not in sizes:
            continue
        _, _, grad = reference_rows(kind, sizes[world], red, seed=len(name))
        for r in range(world):
            got, plain = _flat(res[r][name]["grads"]), _flat(res[r][name]["plain_grads"])
            if name == "plain_module":            # no DDP: the rank's own gradient
                _, locals_, _ = reference_rows(kind, sizes[world], red, seed=len(name))
                assert _rel(got, locals_[r].sum(0) / sizes[world][r]) <= 1e-12, r
                continue
            assert _rel(got, plain) <= 1e-13, (name, r)
            assert _rel(got, grad) <= 1e-12, (name, r)


def test_per_rank_batchnorm_blocks_sum_to_g_and_rows_couple_within_a_rank(world_results):
    world, res = world_results
    G = res[0]["bn"]["G"]
    blocks = res[0]["bn"]["blocks"]
    total = sum(blocks.values())
    assert _rel(total, G) <= 1e-13
    assert set(blocks) == {"0", "1", "3", "5"}
    # the rows are those of per-rank statistics (checked against the loop above); one
    # BatchNorm over the whole global batch would give a different Gram
    sizes = CASES["bn"][1][world]
    J_whole, _, _ = reference_rows("bn", [sum(sizes)], "mean", seed=len("bn"))
    assert _rel(G, J_whole @ J_whole.T) > 1e-3

def test_local_scope_is_each_ranks_own_gram(world_results):
    world, res = world_results
    kind, sizes, *_ = CASES["local"]
    sizes = sizes[world]
    _, locals_, _ = reference_rows(kind, sizes, "mean", seed=len("local"))
    for r in range(world):
        G = res[r]["local"]["G"]
        assert res[r]["local"]["scope"] == "local" and res[r]["local"]["report"] is None
        assert _rel(G, locals_[r] @ locals_[r].T) <= 1e-12, r


def test_default_scope_under_ddp_is_global_and_report_counts_bytes(world_results):
    world, res = world_results
    if world != 2:
        pytest.skip("checked once")
    case = res[0]["default"]
    assert case["scope"] == "global" and case["G"].shape == (6, 6)
    comm = case["report"]
    assert comm["world_size"] == 2 and comm["sizes"] == [3, 3] and comm["synced"]
    # MLP 5-6-3 on the factored path: inputs (3, 1, 5) + output gradients (3, 1, 6) in float64,
    # then (3, 1, 6) + (3, 1, 3)
    assert comm["layers"]["0"] == {"form": "factors", "bytes": 3 * (5 + 6) * 8,
                                   "rows_bytes": 3 * (5 * 6 + 6) * 8, "factor_bytes": 3 * 11 * 8}
    assert comm["layers"]["2"]["bytes"] == 3 * (6 + 3) * 8
    assert comm["bytes"] == 3 * (11 + 9) * 8
    assert case["gathered"] == {"0": "factors", "2": "factors"}
    # the conv layers of the BN model gather rows, its BatchNorm its affine rows
    g = res[0]["bn"]["gathered"]
    assert g["0"] == "rows" and g["1"] == "rows" and g["5"] == "factors"
    assert res[0]["bn_factored"]["gathered"]["0"] == "mixed"   # conv factors + bias rows


def test_no_sync_micro_batch_gets_its_global_gram_and_ddp_gradients(world_results):
    world, res = world_results
    n = 3 * world
    model = make_model("mlp")
    x, y = make_data("mlp", 2 * n, seed=99)
    for k, key in ((0, "G0"), (1, "G1")):
        rows = []
        for i in range(k * n, (k + 1) * n):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            rows.append(_flat([p.grad for p in model.parameters()]))
        J = torch.stack(rows)
        for r in range(world):
            assert _rel(res[r]["no_sync"][key], J @ J.T) <= 1e-12, (key, r)
    for r in range(world):
        d = res[r]["no_sync"]
        assert d["synced0"] is False and d["synced1"] is True
        assert _rel(_flat(d["mid"]), _flat(d["plain_mid"])) <= 1e-13
        assert _rel(_flat(d["end"]), _flat(d["plain_end"])) <= 1e-13
    # under no_sync the ranks' gradients differ (not all-reduced)
    assert not torch.allclose(_flat(res[0]["no_sync"]["mid"]), _flat(res[1]["no_sync"]["mid"]))


def test_mean_over_ranks(world_results):
    world, res = world_results
    want = {"a": 1.0, "b": float(world - 1)}
    for r in range(world):
        assert res[r]["mean"] == pytest.approx(want, rel=1e-15)


def test_a_rank_dying_mid_step_fails_the_others_with_a_clear_error(world_results):
    world, res = world_results
    if world != 2:
        pytest.skip("checked on the 2-process run")
    err = res[0]["error"]
    assert err is not None and "dedicated process group" in err, err
    assert res[0]["seconds"] < 60


def test_mean_over_ranks_is_the_identity_without_distributed():
    from fimcore_adapters.torch import mean_over_ranks

    assert mean_over_ranks({"c_k": 3.5, "I_k": 2}) == {"I_k": 2.0, "c_k": 3.5}
    with pytest.raises(ValueError, match="real numbers"):
        mean_over_ranks({"c_k": "x"})


def test_global_scope_without_distributed_is_refused():
    from fimcore_adapters.torch import GramRecorder

    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        GramRecorder(nn.Linear(2, 2), scope="global")
    with pytest.raises(ValueError, match="scope must be one of"):
        GramRecorder(nn.Linear(2, 2), scope="world")
