"""``reference_training run`` data-parallel: two gloo processes on 127.0.0.1.

Each test launches the ranks as the launcher would (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_*`` in the environment; one test through ``torch.distributed.run`` itself), in one process
group that a hard timeout kills as a whole.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import import_backend

ROOT = Path(__file__).resolve().parents[2]
TIME_KEYS = {"wall_time_s", "train_time_s", "test_time_s"}
HARD_TIMEOUT = 150


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(data_dir, out, *, batch=9, epochs=2, lr=0.05, extra=()):
    """A tiny run: ResNet-20 at width 4 with GroupNorm (no per-rank BatchNorm statistics), 96
    images; batch 9 splits unevenly over 2 ranks (5 + 4, the last batch of 6 as 3 + 3)."""
    return ["run", "--dataset", "mnist", "--data-dir", str(data_dir), "--model", "resnet20",
            "--width", "4", "--norm", "group", "--epochs", str(epochs), "--batch-size", str(batch),
            "--measure-every", "3", "--lr", repr(lr), "--seed", "3", "--threads", "1", "--quiet",
            "--out", str(out), *extra]


class _Group:
    """The ranks of one launch, in their own process group."""

    def __init__(self, argv_of_rank, world, logs: Path, launcher=False):
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "OMP_NUM_THREADS": "1"}
        self.logs, self.procs = logs, []
        ranks = [None] if launcher else range(world)   # one launcher that starts the ranks
        for r in ranks:
            e = dict(env) if launcher else {**env, "WORLD_SIZE": str(world), "RANK": str(r),
                                            "LOCAL_RANK": str(r)}
            name = "launcher" if r is None else f"rank{r}"
            group = dict(process_group=0) if not self.procs else dict(
                process_group=self.procs[0].pid)
            self.procs.append(subprocess.Popen(
                argv_of_rank, cwd=ROOT, env=e, stdout=open(logs / f"{name}.out", "w"),
                stderr=open(logs / f"{name}.err", "w"), **group))
        self.deadline = time.monotonic() + HARD_TIMEOUT

    def kill(self):
        try:
            os.killpg(self.procs[0].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.procs:
            p.wait()

    def wait(self, kill_when=None):
        """Wait for every rank (killing the group at the timeout, or once ``kill_when()``);
        the exit codes."""
        while any(p.poll() is None for p in self.procs):
            if time.monotonic() > self.deadline:
                self.kill()
                pytest.fail(f"the ranks did not finish in {HARD_TIMEOUT} s; logs in {self.logs}")
            if kill_when is not None and kill_when():
                self.kill()
                break
            time.sleep(0.003)
        return [p.returncode for p in self.procs]

    def text(self, name):
        return (self.logs / name).read_text()


def _launch(args, logs, world=2, kill_when=None):
    g = _Group([sys.executable, "-m", "reference_training", *args], world, logs)
    codes = g.wait(kill_when)
    return g, codes


def _spawn(args, logs):
    """2 ranks through ``torch.multiprocessing.spawn``, its driver in our killable group."""
    code = ("from tests.reference_training._spawned_run import spawn; "
            f"spawn({_free_port()}, {json.dumps(json.dumps(list(args)))})")
    g = _Group([sys.executable, "-c", code], 1, logs, launcher=True)
    return g, g.wait()


def _single(args):
    return subprocess.run([sys.executable, "-m", "reference_training", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=HARD_TIMEOUT)


def _lines(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


def _strip(d):
    return {k: v for k, v in d.items() if k not in TIME_KEYS}


@pytest.fixture(scope="module")
def local_run(tiny_mnist_dir, tmp_path_factory):
    """An uninterrupted 2-rank run with --gram-scope local: a grid of one run, ``--nproc 2``, so
    torchrun (``torch.distributed.run --standalone``) itself launches the ranks."""
    from reference_training.grid import plan_grid, run_grid

    root = tmp_path_factory.mktemp("ddp-local") / "grid"
    runs = plan_grid(root, models=["resnet20"], dataset="mnist", batch_sizes=[9], lrs=[0.05],
                     dynamic=[], seeds=[3], data_dir=str(tiny_mnist_dir), epochs=2,
                     measure_every=3, width=4, norm="group")
    counts = run_grid(runs, threads=1, nproc=2, gram_scope="local", log=lambda s: None)
    (run,) = runs
    assert counts["done"] == 1, (run.out_dir / "run.log").read_text()
    return run.out_dir


def test_two_ranks_under_torchrun_rank0_alone_writes_and_prints(local_run):
    out = local_run
    log = (out / "run.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json",
                                                     "metrics.jsonl", "run.log", "summary.json"]
    printed = [json.loads(s) for s in log.splitlines() if s.startswith('{"label"')]
    assert len(printed) == 1                         # only rank 0 prints the summary line
    summary = json.loads((out / "summary.json").read_text())
    assert printed[0]["C_bar"] == summary["C_bar"] and printed[0]["L"] == summary["L"]
    assert summary["distributed"] == {"world_size": 2, "gram_scope": "local", "backend": "gloo"}
    lines = _lines(out / "metrics.jsonl")
    measures = [r for r in lines if r["type"] == "measure"]
    # 96 images at batch 9: 11 iterations per epoch, n = 0, 3, 6, 9 measured; each line once
    assert [m["k"] for m in measures] == list(range(1, 9))
    assert [m["iteration"] for m in measures] == [e * 11 + n for e in range(2) for n in (0, 3, 6, 9)]
    assert all(m["batch_size"] == 9 for m in measures)            # the global batch
    assert all(m["gram_batch_size"] == 4.5 for m in measures)     # the mean shard (5 and 4)
    assert [r["epoch"] for r in lines if r["type"] == "epoch"] == [0, 1]


def _per_sample_reference(data_dir, rows):
    """float64 per-sample loop at the first iteration: the run's initial model (seed 3) and first
    global batch (generator seed 4: permutation, then the augmentation draws), row by row."""
    torch = import_backend("torch")
    import torch.nn.functional as F

    from reference_training.data import augment, load_dataset, normalise
    from reference_training.models import build_model

    ds = load_dataset("mnist", str(data_dir))
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    model = build_model("resnet20", in_channels=1, num_classes=10, image_size=28, width=4,
                        norm="group").double()
    perm = torch.randperm(len(ds.train_y), generator=gen)
    idx = perm[:9]
    x = augment(normalise(ds.train_x[idx], ds.mean, ds.std), flip=ds.flip, pad=ds.pad,
                generator=gen).double()
    y = ds.train_y[idx]
    grads = []
    for i in rows:
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(grads)


def test_local_scope_first_measure_is_the_rank_mean_of_float64_shard_grams(local_run,
                                                                             tiny_mnist_dir):
    torch = import_backend("torch")
    out = local_run
    first = _lines(out / "metrics.jsonl")[0]
    assert first["k"] == 1 and first["iteration"] == 0
    J = _per_sample_reference(tiny_mnist_dir, range(9))
    shards = [J[:5], J[5:]]                        # rank 0 takes 5 rows, rank 1 takes 4
    traces = [float((s * s).sum()) for s in shards]
    conds = []
    for s in shards:
        ev = torch.linalg.eigvalsh(s @ s.T)       # full rank: 5 or 4 rows, P ≫ 5
        conds.append(float(ev[-1] / ev[0]))
    lr = 0.05
    # float32 run against float64 loop: per-sample gradients agree to ~1e-6 relative here (no
    # BatchNorm), so 1e-4 leaves room; the condition number of a 4×4 or 5×5 Gram with c_k ~ 10
    # amplifies that by at most c_k
    assert first["trace"] == pytest.approx(sum(traces) / 2, rel=1e-4)
    assert first["I_k"] == pytest.approx((lr / 5 * math.sqrt(traces[0])
                                          + lr / 4 * math.sqrt(traces[1])) / 2, rel=1e-4)
    assert first["c_k"] == pytest.approx(sum(conds) / 2, rel=1e-3)
    # the uneven split's loss scaling: DDP's averaged gradient is the global batch mean
    mean_grad = J.mean(0)
    assert first["grad_norm"] == pytest.approx(float(mean_grad.norm()), rel=1e-4)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_resume_of_two_ranks_after_kill_reproduces_the_uninterrupted_run(scope, tiny_mnist_dir,
                                                                         tmp_path, request):
    # the uninterrupted runs: launched by torchrun (local) and by torch.multiprocessing (global)
    want_dir = (request.getfixturevalue("local_run") if scope == "local"
                else request.getfixturevalue("global_runs")[1])
    out = tmp_path / "killed"
    args = _args(tiny_mnist_dir, out, lr=0.05 if scope == "local" else GLOBAL_LR,
                 extra=["--gram-scope", scope])

    def mid_epoch_1():
        p = out / "metrics.jsonl"
        if not (out / "checkpoint.pt").exists() or not p.exists():
            return False
        return '"type": "measure", "k": 5' in p.read_text()

    g, codes = _launch(args, tmp_path / "logs1", kill_when=mid_epoch_1)
    assert -signal.SIGKILL in codes, "the run ended before it could be killed"
    assert not (out / "summary.json").exists()
    g, codes = _launch([*args, "--resume"], tmp_path / "logs2")
    assert codes == [0, 0], g.text("rank0.err") + g.text("rank1.err")
    assert [_strip(r) for r in _lines(out / "metrics.jsonl")] == \
        [_strip(r) for r in _lines(want_dir / "metrics.jsonl")]
    assert _strip(json.loads((out / "summary.json").read_text())) == \
        _strip(json.loads((want_dir / "summary.json").read_text()))


def test_a_single_process_resume_of_a_two_rank_checkpoint_is_refused(local_run, tiny_mnist_dir,
                                                                     tmp_path, capsys, one_thread):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(local_run, out)
    (out / "summary.json").unlink()
    (out / "run.log").unlink()
    from reference_training.cli import main

    assert "WORLD_SIZE" not in os.environ
    assert main([*_args(tiny_mnist_dir, out, extra=["--gram-scope", "local"]), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "written by 2 processes, --gram-scope local" in err and "a single process" in err


def test_split_of_the_global_batch_and_launcher_checks(monkeypatch):
    from reference_training.distributed import context, shard, shard_sizes

    assert shard_sizes(9, 2) == [5, 4] and shard_sizes(8, 2) == [4, 4]
    assert shard_sizes(10, 4) == [3, 3, 2, 2]
    assert [shard(10, r, 4) for r in range(4)] == [slice(0, 3), slice(3, 6), slice(6, 8),
                                                  slice(8, 10)]
    with pytest.raises(ValueError, match="batch of 1 sample.*cannot be split over 2 ranks"):
        shard_sizes(1, 2)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert context("cpu") is None                    # no launcher: the single-process run
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert context("cpu") is None                    # torchrun --nproc_per_node 1: the same
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK in \[0, WORLD_SIZE=2\); received RANK='2'"):
        context("cpu")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        context("cpu")


@pytest.fixture(scope="module")
def global_runs(tiny_mnist_dir, tmp_path_factory):
    """The same run in one process and on 2 ranks with the (default) global scope."""
    base = tmp_path_factory.mktemp("ddp-global")
    single = _single(_args(tiny_mnist_dir, base / "single", lr=GLOBAL_LR))
    assert single.returncode == 0, single.stderr
    g, codes = _spawn(_args(tiny_mnist_dir, base / "two", lr=GLOBAL_LR), base / "logs")
    assert codes == [0], g.text("launcher.err")
    printed = [ln for ln in g.text("launcher.out").splitlines() if ln.startswith('{"label"')]
    assert len(printed) == 1                       # rank 0 alone prints, also when spawned
    return base / "single", base / "two"


#: The global-scope comparison runs at a base LR of 0.005: at 0.05 this tiny float32 network
#: amplifies rounding so fast that a single process differs from itself by up to 5e-2 within 30
#: steps when only its reduction order changes (2 threads instead of 1, or conv_method unfold).
GLOBAL_LR = 0.005
#: At the first measure the parameters and inputs are the same: only the reduction order of the
#: float32 sums differs (Gram entries of B_r- instead of B-sample kernels, the gradient summed over
#: ranks), ~1e-7 relative; 1e-5 leaves room for c_k's amplification by λ_max/λ_min.
FIRST_RTOL = 1e-5
#: Later, training amplifies those differences: measured on this setup, one process with 2 threads
#: instead of 1 moves these fields by up to 7e-4 relative (the 2-rank run by the same amount); the
#: bound is a few times that.
GLOBAL_RTOL = 3e-3
#: fields compared between the single-process and the 2-rank run
MEASURE_FIELDS = ("c_k", "c_k_jacobian", "I_k", "trace", "C_bar", "C_bar_jacobian", "L",
                  "lambda_max", "grad_norm", "ones_gram_ones")
EPOCH_FIELDS = ("train_loss", "test_loss", "C_bar", "C_bar_jacobian", "L")


def test_global_scope_on_two_ranks_gives_the_single_process_run(global_runs):
    one, two = (_lines(d / "metrics.jsonl") for d in global_runs)
    assert [(r["type"], r.get("k"), r["epoch"]) for r in one] == \
        [(r["type"], r.get("k"), r["epoch"]) for r in two]
    for a, b in zip(one, two):
        assert a.get("batch_size") == b.get("batch_size") and a["lr"] == b["lr"]
        fields = MEASURE_FIELDS if a["type"] == "measure" else EPOCH_FIELDS
        rtol = FIRST_RTOL if a.get("k") == 1 else GLOBAL_RTOL
        for f in fields:
            assert b[f] == pytest.approx(a[f], rel=rtol), (a["type"], a.get("k"), f)
        if a["type"] == "epoch":   # an error count moves only if a logit margin is ~1e-6
            assert abs(a["test_error"] - b["test_error"]) <= 1 / 32 + 1e-12
            assert abs(a["train_error"] - b["train_error"]) <= 1 / 96 + 1e-12
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in global_runs)
    assert s2["distributed"] == {"world_size": 2, "gram_scope": "global", "backend": "gloo"}
    assert s2["measurements"] == s1["measurements"] == 8
    assert s2["C_bar"] == pytest.approx(s1["C_bar"], rel=GLOBAL_RTOL)
    assert s2["L"] == pytest.approx(s1["L"], rel=GLOBAL_RTOL)


def test_global_scope_first_measure_is_the_float64_gram_of_the_global_batch(global_runs,
                                                                             tiny_mnist_dir):
    torch = import_backend("torch")
    first = _lines(global_runs[1] / "metrics.jsonl")[0]
    J = _per_sample_reference(tiny_mnist_dir, range(9))
    G = J @ J.T
    ev = torch.linalg.eigvalsh(G)
    assert first["batch_size"] == 9
    assert first["trace"] == pytest.approx(float(G.trace()), rel=1e-4)
    assert first["c_k"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-3)
    assert first["I_k"] == pytest.approx(GLOBAL_LR / 9 * math.sqrt(float(G.trace())), rel=1e-4)


def test_a_measure_steered_schedule_needs_the_global_scope(tiny_mnist_dir, tmp_path, monkeypatch,
                                                           one_thread):
    """Refused before any collective: a stand-in for rank 0 of 2 is enough."""
    import reference_training.train as T
    from reference_training.distributed import DistContext

    class Rank0(DistContext):
        def barrier(self):
            pass

    monkeypatch.setattr(T, "context", lambda device: Rank0(0, 2, 0, "gloo", owned=False))
    cfg = T.RunConfig(model="resnet20", dataset="mnist", data_dir=str(tiny_mnist_dir), epochs=1,
                      batch_size=8, batch_schedule="auto:noise_scale", width=4, norm="group")
    with pytest.raises(ValueError, match="auto:noise_scale.*--gram-scope global"):
        T.train(cfg, tmp_path / "run", quiet=True, gram_scope="local")
    with pytest.raises(ValueError, match="gram_scope must be one of"):
        T.train(cfg, tmp_path / "run2", quiet=True, gram_scope="world")
