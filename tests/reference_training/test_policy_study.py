"""The batch-size policy study runs end to end on a tiny dataset and reports every schedule."""

from __future__ import annotations

import json

from reference_training.grid import run_grid
from reference_training.policy_study import SCHEDULES, plan, write_report


def test_study_runs_every_schedule_and_writes_its_report(tiny_mnist_dir, tmp_path):
    runs = plan(tmp_path, seeds=(0,), epochs=2, stages=2, subset=None, width=4, dataset="mnist",
                data_dir=str(tiny_mnist_dir))
    assert len(runs) == len(SCHEDULES)
    auto = [r for r in runs if (r.config.batch_schedule or "").startswith("auto:")]
    assert len(auto) == 3 and all(r.config.policy_options == "max=64" and r.config.batch_size == 16
                                  for r in auto)
    counts = run_grid(runs, jobs=2, threads=1, log=lambda *_: None)
    assert counts["done"] == len(SCHEDULES) and counts["failed"] == 0, counts
    out = write_report(tmp_path)
    table = (out / "report.md").read_text()
    rows = json.loads((out / "runs.json").read_text())
    assert {r["label"] for r in rows} == {"s16", "s64", "s16-to-64", "s16-auto-noise_scale",
                                          "s16-auto-norm_test", "s16-auto-plane"}
    for r in rows:
        assert r["label"] in table
        assert r["final_batch"][0] <= 64
    assert (out / "batch_sizes.png").stat().st_size > 0 and (out / "plane.png").stat().st_size > 0
    # resumable: a second call finds everything finished
    assert run_grid(runs, log=lambda *_: None)["skipped"] == len(SCHEDULES)


def test_the_batch_figure_drops_only_each_epochs_short_remainder_batch():
    from reference_training.policy_study import _without_short_last_batches

    def m(epoch, b):
        return {"epoch": epoch, "batch_size": b}

    # epoch 0: 16, 32, then a remainder of 8 (dropped); epoch 1: one batch (kept: nothing
    # before it in the epoch); epoch 2: no smaller final batch (kept)
    measures = [m(0, 16), m(0, 32), m(0, 8), m(1, 32), m(2, 32), m(2, 64), m(2, 64)]
    assert _without_short_last_batches(measures) == [m(0, 16), m(0, 32), m(1, 32), m(2, 32),
                                                     m(2, 64), m(2, 64)]
