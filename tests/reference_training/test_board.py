"""``reference_training run --tensorboard DIR``: the scalars written equal the run's metrics.jsonl."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import import_backend

from .conftest import tiny_run_args
from .test_train import ROOT, _lines

import_backend("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def test_measure_and_epoch_scalars_equal_the_metrics_file(tiny_mnist_dir, tmp_path):
    out, board = tmp_path / "run", tmp_path / "tb"
    args = tiny_run_args(tiny_mnist_dir, out, epochs=2, extra=["--tensorboard", str(board)])
    proc = subprocess.run([sys.executable, "-m", "reference_training", *args, "--quiet"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    events = EventAccumulator(str(board), size_guidance={"scalars": 0})
    events.Reload()
    lines = _lines(out / "metrics.jsonl")
    measures = [m for m in lines if m["type"] == "measure"]
    epochs = [m for m in lines if m["type"] == "epoch"]
    assert measures and len(epochs) == 2
    for field in ("c_k", "C_bar", "I_k", "L", "batch_size"):
        written = [(e.step, e.value) for e in events.Scalars(f"measure/{field}")]
        want = [(m["iteration"], m[field]) for m in measures]
        assert [s for s, _ in written] == [s for s, _ in want], field
        assert [v for _, v in written] == pytest.approx([v for _, v in want], rel=1e-6), field  # float32 in the file
    for field in ("test_error", "train_loss", "C_bar", "L"):
        written = [(e.step, e.value) for e in events.Scalars(f"epoch/{field}")]
        assert written == [(r["epoch"], pytest.approx(r[field], rel=1e-6)) for r in epochs], field
