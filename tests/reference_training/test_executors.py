"""``reference_training grid --executor slurm``: a submitit job array, tested without a cluster."""

from __future__ import annotations

import json

import pytest

from reference_training.grid import plan_grid, run_grid
from tests.conftest import import_backend


def _plan(out, data_dir, lrs=(0.05, 0.1), **extra):
    return plan_grid(out, models=["resnet20"], dataset="mnist", batch_sizes=[16], lrs=list(lrs),
                     dynamic=[], seeds=[0], data_dir=str(data_dir), epochs=1, measure_every=4,
                     width=4, **extra)


@pytest.mark.parametrize("cluster,lrs", [("debug", (0.05, 0.1)), ("local", (0.05,))])
def test_job_array_runs_every_run_and_a_second_call_skips_them(tiny_mnist_dir, tmp_path, cluster,
                                                               lrs):
    import_backend("submitit")
    out = tmp_path / "grid"
    runs = _plan(out, tiny_mnist_dir, lrs)
    n = len(runs)
    counts = run_grid(runs, executor="slurm", cluster=cluster, slurm={"timeout_min": 10},
                      wait=True, threads=1, root=out, log=lambda s: None)
    assert counts["submitted"] == n and counts["done"] == n and counts["failed"] == 0
    assert all(r.finished for r in runs)
    jobs = json.loads((out / "grid_jobs.json").read_text())
    assert set(jobs) == {str(r.out_dir) for r in runs}
    again = run_grid(runs, executor="slurm", cluster=cluster, wait=True, root=out, log=lambda s: None)
    assert again["skipped"] == n and again["submitted"] == 0


def test_failed_runs_are_resubmitted_only_with_retry_failed(tiny_mnist_dir, tmp_path):
    import_backend("submitit")
    out = tmp_path / "grid"
    runs = _plan(out, tmp_path / "no-such-data")          # every run fails: no data files
    first = run_grid(runs, executor="slurm", cluster="debug", wait=True, root=out, log=lambda s: None)
    assert first["failed"] == 2 and not any(r.finished for r in runs)
    lines = []
    second = run_grid(runs, executor="slurm", cluster="debug", wait=True, root=out, log=lines.append)
    assert second["failed_before"] == 2 and second["submitted"] == 0
    assert any("--retry-failed" in line for line in lines)
    third = run_grid(runs, executor="slurm", cluster="debug", wait=True, root=out, retry_failed=True,
                     log=lambda s: None)
    assert third["submitted"] == 2


def test_unknown_executor_and_cluster_are_refused(tiny_mnist_dir, tmp_path):
    runs = _plan(tmp_path / "g", tiny_mnist_dir)
    with pytest.raises(ValueError, match="executor must be"):
        run_grid(runs, executor="kubernetes")
    import_backend("submitit")
    with pytest.raises(ValueError, match="cluster must be one of"):
        run_grid(runs, executor="slurm", cluster="pbs", root=tmp_path / "g")


def test_nproc_launches_each_run_under_torchrun_and_is_checked(tiny_mnist_dir, tmp_path):
    import sys

    from reference_training.grid import _command

    (run,) = _plan(tmp_path / "g", tiny_mnist_dir, lrs=(0.05,))
    plain = _command(run, 1)
    assert plain[:5] == [sys.executable, "-m", "reference_training", "run", "--resume"]
    assert "--gram-scope" not in plain and "torch.distributed.run" not in plain
    ddp = _command(run, 1, nproc=2, gram_scope="local")
    assert ddp[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", "2", "-m"]
    assert ddp[7:] == plain[2:] + ["--gram-scope", "local"]
    assert _command(run, 1, nproc=1, gram_scope="local") == plain   # one process: no DDP
    with pytest.raises(ValueError, match="nproc must be an int >= 1.*received 0"):
        run_grid([run], nproc=0)
    with pytest.raises(ValueError, match="gram_scope must be"):
        run_grid([run], nproc=2, gram_scope="world")
