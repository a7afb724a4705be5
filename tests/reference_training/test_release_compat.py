"""Runs, checkpoints and tracker states of the previous release (0.1.0) still load and resume."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

import fimcore

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "release_0_1"


def test_previous_release_tracker_state_loads_and_continues():
    state = json.loads((FIXTURES / "tracker_state.json").read_text())
    assert state["format"] == "fimcore.MeasureTracker/1"
    tracker = fimcore.MeasureTracker()
    with pytest.warns(UserWarning, match="previous release"):
        tracker.load_state_dict(state)
    assert tracker.steps == 5 and tracker.measured == 4 and tracker.skipped == 1
    assert tracker.C_bar == pytest.approx(state["c_sum"] / 4)
    assert tracker.C_bar_legacy == tracker.C_bar and tracker.resolution_limited == 0
    assert len(tracker.history) == 5 and tracker.history[0].c_limit is None
    m = tracker.update(np.diag([4.0, 1.0]), lr=0.1)
    assert m.k == 6 and tracker.measured == 5
    assert tracker.C_bar == pytest.approx((state["c_sum"] + 4.0) / 5)
    again = fimcore.MeasureTracker()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new format loads silently
        again.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert again.state_dict() == tracker.state_dict()


def test_previous_release_run_resumes_and_reports(tmp_path, one_thread):
    from reference_training.report import make_report
    from reference_training.train import RunConfig, train

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_interrupted", run)
    before = (run / "metrics.jsonl").read_text().splitlines()
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    with pytest.warns(UserWarning, match="previous release"):
        summary = train(config, run, resume=True, quiet=True)
    assert summary["finished"] and summary["epochs"] == 3
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[:len(before)] == before  # the old lines are kept as written
    new = [json.loads(line) for line in after[len(before):]]
    measures = [r for r in new if r["type"] == "measure"]
    assert measures and all("c_limit" in r and "resolution_limited" in r for r in measures)
    assert all(r["c_k_legacy"] <= r["c_k"] * (1 + 1e-9) for r in measures)
    assert summary["resolution_limited"] == 0
    report = make_report(tmp_path, tmp_path / "report")
    assert (report / "report.md").exists()
