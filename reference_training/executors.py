"""Where the runs of a grid execute: a local process pool, or a Slurm job array via submitit.

Every run is the same command (``python -m reference_training run ... --resume``), so a run may
be interrupted anywhere and started again; what differs is who starts it:

* ``local`` — a pool of ``jobs`` subprocesses on this machine (the default);
* ``slurm`` — one job of a Slurm array per run, submitted through ``submitit`` (the optional
  ``distributed`` extra). The array task runs the command and reports its exit code. Without a
  cluster, ``cluster="local"`` (submitit's local executor, one process per job) or
  ``cluster="debug"`` (in this process) run the same code path.

Either way the grid is resumable: finished runs (``summary.json``) are skipped; the submitted
jobs of a Slurm grid are recorded in ``OUT/grid_jobs.json``, and runs whose job failed are not
resubmitted unless ``retry_failed`` is set, while runs whose job is still pending or running are
left alone.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["EXECUTORS", "SlurmOptions", "run_command", "submit_slurm"]

EXECUTORS = ("local", "slurm")
CLUSTERS = ("slurm", "local", "debug")
_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "READY"}


def run_command(cmd: Sequence[str], log_path: str) -> int:
    """Run one grid command with its output appended to ``log_path``; the exit code.

    This is the function each Slurm array task executes (it must be importable by name).
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        return subprocess.call(list(cmd), stdout=log, stderr=subprocess.STDOUT)


class SlurmOptions(dict):
    """Slurm parameters (``timeout_min``, ``slurm_partition``, ``cpus_per_task``, ``gpus_per_node``,
    ``mem_gb``, ``slurm_array_parallelism``), passed to ``executor.update_parameters``."""


def _state_path(root: Path) -> Path:
    return root / "grid_jobs.json"


def _load_state(root: Path) -> dict[str, Any]:
    p = _state_path(root)
    return json.loads(p.read_text()) if p.exists() else {}


def _save_state(root: Path, state: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    p = _state_path(root)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    tmp.replace(p)


def _job_state(executor: Any, job_id: str) -> str:
    try:
        return str(executor.job_class(executor.folder, job_id).state).upper()
    except Exception:  # noqa: BLE001 - an unknown job (another machine, a purged folder)
        return "UNKNOWN"


def submit_slurm(runs: list, commands: Callable[[Any], list[str]], root: Path, *,
                 cluster: str = "slurm", options: dict[str, Any] | None = None,
                 retry_failed: bool = False, wait: bool = False, log=print) -> dict[str, int]:
    """Submit the unfinished runs as one submitit job array; counts of what happened.

    Args:
        runs: the grid's ``GridRun`` objects (``finished``, ``out_dir``, ``config``).
        commands: ``run -> argv`` of one run.
        root: the grid folder (``grid_jobs.json`` and submitit's logs live below it).
        cluster: ``"slurm"``, or submitit's ``"local"``/``"debug"`` executors without a cluster.
        options: Slurm parameters (:class:`SlurmOptions`).
        retry_failed: resubmit runs whose earlier job failed.
        wait: block until the jobs end and count done/failed.

    Raises:
        ImportError: submitit is not installed (extra ``distributed``).
        ValueError: an unknown cluster.
    """
    if cluster not in CLUSTERS:
        raise ValueError(f"cluster must be one of {CLUSTERS}; received {cluster!r}.")
    try:
        import submitit
    except ImportError as exc:
        raise ImportError("--executor slurm needs submitit: pip install -e '.[distributed]' "
                          "-c constraints.txt") from exc
    executor = submitit.AutoExecutor(folder=str(root / "submitit"), cluster=cluster)
    if options:
        executor.update_parameters(**options)
    state = _load_state(root)
    counts = {"planned": len(runs), "skipped": 0, "submitted": 0, "failed_before": 0,
              "active": 0, "done": 0, "failed": 0}
    todo = []
    for run in runs:
        key = str(run.out_dir)
        if run.finished:
            counts["skipped"] += 1
            continue
        entry = state.get(key)
        if entry is not None:
            job_state = _job_state(executor, entry["job_id"])
            if job_state in _ACTIVE:
                counts["active"] += 1
                continue
            if not retry_failed:
                counts["failed_before"] += 1
                log(f"  not resubmitted (its job {entry['job_id']} ended {job_state}; pass "
                    f"--retry-failed): {key}")
                continue
        todo.append(run)
    if todo:
        argv = [commands(r) for r in todo]
        logs = [str(r.out_dir / "run.log") for r in todo]
        jobs = executor.map_array(run_command, argv, logs)
        for run, job in zip(todo, jobs):
            state[str(run.out_dir)] = {"job_id": str(job.job_id)}
        _save_state(root, state)
        counts["submitted"] = len(jobs)
        log(f"grid: submitted {len(jobs)} run(s) as a job array ({cluster}); "
            f"{counts['skipped']} finished, {counts['active']} still queued or running")
        if wait:
            for run, job in zip(todo, jobs):
                try:
                    rc = job.result()
                except Exception as exc:  # noqa: BLE001 - the task itself crashed
                    log(f"  FAILED {run.out_dir}: {exc}")
                    rc = 1
                ok = rc == 0 and run.finished
                counts["done" if ok else "failed"] += 1
    return counts
