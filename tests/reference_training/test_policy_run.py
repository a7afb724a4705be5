"""``reference_training run --batch-schedule auto:<rule>``: the policy in the loop, resumed exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tiny_run_args
from .test_train import ROOT, _lines, _mid_epoch_after_checkpoint, _start, _strip_times, _wait_and_kill

AUTO = ["--batch-schedule", "auto:norm_test",
        "--policy-options", "theta=0.05,patience=1,max=32,multiple_of=4", "--stats", "noise_scale,stable_rank"]


def _args(data_dir, out):
    args = tiny_run_args(data_dir, out, extra=AUTO)
    args[args.index("--measure-every") + 1] = "2"
    return args


def _run(args):
    proc = subprocess.run([sys.executable, "-m", "reference_training", *args, "--quiet"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def auto_run(tiny_mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "run"
    _run(_args(tiny_mnist_dir, out))
    return out


def test_policy_grows_the_batch_between_steps_and_logs_why(auto_run):
    lines = _lines(auto_run / "metrics.jsonl")
    measures = [r for r in lines if r["type"] == "measure"]
    summary = json.loads((auto_run / "summary.json").read_text())
    assert summary["label"] == "s8-auto-norm_test"
    decisions = summary["decisions"]
    assert decisions and all(d["new"] > d["old"] for d in decisions)
    assert summary["batch_sizes"] == [8] + [d["new"] for d in decisions]
    assert max(summary["batch_sizes"]) <= 32 and all(b % 4 == 0 for b in summary["batch_sizes"])
    # each measurement's next size is the size of the following measured batch (only the
    # epoch's last batch may be smaller: what is left of the 96 images)
    last = {r["epoch"]: r["iterations"] - 1 for r in lines if r["type"] == "epoch"}
    for m, nxt in zip(measures, measures[1:]):
        if m["epoch"] == nxt["epoch"]:
            if nxt["iteration"] == last[nxt["epoch"]]:
                assert nxt["batch_size"] <= m["next_batch_size"]
            else:
                assert nxt["batch_size"] == m["next_batch_size"]
    changed = [m for m in measures if "decision" in m]
    assert len(changed) == len(decisions) and changed[0]["decision"].startswith("norm_test")
    # the extra statistics reach every measure line
    assert all("norm_test" in m and "B_simple" in m and "stable_rank" in m for m in measures)
    # every epoch still covers the 96 training images exactly once
    epochs = [r for r in lines if r["type"] == "epoch"]
    assert epochs[-1]["iterations"] == summary["iterations"]


def test_policy_run_resumes_after_sigkill_to_the_same_trajectory(auto_run, tiny_mnist_dir, tmp_path):
    out = tmp_path / "killed"
    args = _args(tiny_mnist_dir, out)
    _wait_and_kill(_start(args), out, _mid_epoch_after_checkpoint)
    _run([*args, "--resume"])
    want = json.loads((auto_run / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert _strip_times(got) == _strip_times(want)
    assert [_strip_times(r) for r in _lines(out / "metrics.jsonl")] == \
        [_strip_times(r) for r in _lines(auto_run / "metrics.jsonl")]


def test_bad_policy_settings_are_refused(tiny_mnist_dir, tmp_path):
    from reference_training.cli import main

    base = tiny_run_args(tiny_mnist_dir, tmp_path / "x")
    assert main([*base, "--batch-schedule", "auto:magic", "--quiet"]) == 2
    assert main([*base, "--batch-schedule", "auto:plane", "--policy-options", "speed=3", "--quiet"]) == 2
    assert main([*base, "--batch-schedule", "s8-to-16", "--policy-options", "theta=1", "--quiet"]) == 2
    assert main([*base, "--stats", "entropy", "--quiet"]) == 2
