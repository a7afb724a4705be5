"""Training loop: CLI end to end, resume after SIGKILL, schedule switch, summary consistency."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from reference_training.cli import main
from reference_training.models import build_model, count_parameters
from reference_training.train import (
    RunConfig,
    lr_at,
    make_schedule,
    parse_batch_schedule,
    run_label,
    train,
)

from tests.core.helpers import gamma

from .conftest import tiny_run_args

ROOT = Path(__file__).resolve().parents[2]
TIME_KEYS = {"wall_time_s", "train_time_s", "test_time_s"}


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "reference_training", *args, "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, **kw)


def _lines(path):
    return [json.loads(s) for s in Path(path).read_text().splitlines() if s.strip()]


def _strip_times(d):
    return {k: v for k, v in d.items() if k not in TIME_KEYS}


@pytest.fixture(scope="module")
def reference_run(tiny_mnist_dir, tmp_path_factory):
    """One uninterrupted 3-epoch run through the CLI in a subprocess."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    proc = _cli(tiny_run_args(tiny_mnist_dir, out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_cli_run_writes_config_metrics_summary_and_checkpoint(reference_run):
    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (reference_run / name).is_file(), name
    config = json.loads((reference_run / "config.json").read_text())
    assert config["model"] == "resnet20" and config["epochs"] == 3 and config["measure_every"] == 3
    lines = _lines(reference_run / "metrics.jsonl")
    measures = [r for r in lines if r["type"] == "measure"]
    epochs = [r for r in lines if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    keys = {"k", "iteration", "epoch", "lr", "batch_size", "weight", "c_k", "c_k_jacobian", "I_k",
            "trace", "C_bar", "C_bar_jacobian", "L", "grad_norm", "lambda_max", "rank"}
    assert all(keys <= set(m) for m in measures)
    for e in epochs:
        assert {"train_loss", "train_error", "test_loss", "test_error", "wall_time_s"} <= set(e)
    s = json.loads((reference_run / "summary.json").read_text())
    assert s["finished"] and not s["diverged"] and s["epochs"] == 3
    for key in ("test_error", "train_error"):
        assert 0.0 <= s[key] <= 1.0
    assert s["C_bar"] >= 1.0 and s["L"] > 0 and s["wall_time_s"] > 0


def test_measured_iterations_weights_and_lr_schedule(reference_run):
    lines = _lines(reference_run / "metrics.jsonl")
    measures = [r for r in lines if r["type"] == "measure"]
    # 96 images, batch 8: 12 iterations per epoch; every 3rd (0-based n % 3 == 0) is measured
    assert [m["iteration"] for m in measures] == [e * 12 + n for e in range(3) for n in (0, 3, 6, 9)]
    assert [m["k"] for m in measures] == list(range(1, 13))
    for e in range(3):
        assert sum(m["weight"] for m in measures if m["epoch"] == e) == 12
    # milestones for 3 epochs: floor(1.5) = 1, floor(2.25) = 2
    assert [m["lr"] for m in measures[::4]] == pytest.approx([0.05, 0.005, 0.0005], rel=1e-12)


def test_summary_equals_recomputation_from_metrics(reference_run):
    lines = _lines(reference_run / "metrics.jsonl")
    measures = [r for r in lines if r["type"] == "measure"]
    epochs = [r for r in lines if r["type"] == "epoch"]
    s = json.loads((reference_run / "summary.json").read_text())
    c = [m["c_k"] for m in measures if m["c_k"] is not None]
    cj = [m["c_k_jacobian"] for m in measures if m["c_k_jacobian"] is not None]
    assert s["C_bar"] == pytest.approx(math.fsum(c) / len(c), rel=1e-12)
    assert s["C_bar_jacobian"] == pytest.approx(math.fsum(cj) / len(cj), rel=1e-12)
    # I_k = (lr / B) sqrt(Tr G), L_K = sum of weight * I_k
    for m in measures:
        assert m["I_k"] == pytest.approx(m["lr"] / m["batch_size"] * math.sqrt(m["trace"]), rel=1e-12)
        if m["c_k"] is not None:
            assert m["c_k_jacobian"] == pytest.approx(math.sqrt(m["c_k"]), rel=1e-12)
    assert s["L"] == pytest.approx(math.fsum(m["weight"] * m["I_k"] for m in measures), rel=1e-12)
    assert s["test_error"] == epochs[-1]["test_error"]
    assert s["train_error"] == epochs[-1]["train_error"]
    assert s["iterations"] == epochs[-1]["iterations"] == 36
    # λ_max ≤ Tr G, and the identity 1ᵀG1 = ‖Σ_i J_i‖² = B²‖∇L_mean‖² (rows J_i sum to B·∇L)
    # within the float32 rounding of the Gram: each G_ij sums P products, so it is within
    # γ_P·Σ_p|J_ip||J_jp| ≤ γ_P‖J_i‖‖J_j‖ of exact and 1ᵀG1 within γ_P·(Σ_i‖J_i‖)² ≤ γ_P·B·Tr G;
    # the batch gradient autograd sums from the same rows is allowed as much again
    P = count_parameters(build_model("resnet20", in_channels=1, num_classes=10, image_size=28, width=4))
    for m in measures:
        assert m["lambda_max"] <= m["trace"] * (1 + 1e-9)
        B = m["batch_size"]
        bound = 2 * gamma(P) * B * m["trace"]
        assert abs(m["ones_gram_ones"] - B**2 * m["grad_norm"] ** 2) <= bound, (m, bound)


def _wait_and_kill(proc, out, condition, timeout=120):
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if condition(out):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.003)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def _mid_epoch_after_checkpoint(out):
    p = out / "metrics.jsonl"
    if not (out / "checkpoint.pt").exists() or not p.exists():
        return False
    text = p.read_text()
    return '"type": "measure"' in text and '"epoch": 1, "lr"' in text


def _during_first_epoch(out):
    p = out / "metrics.jsonl"
    return p.exists() and p.read_text().count('"type": "measure"') >= 2


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "reference_training", *args, "--quiet"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(reference_run, tiny_mnist_dir,
                                                               tmp_path):
    out = tmp_path / "killed"
    args = tiny_run_args(tiny_mnist_dir, out)
    # first kill: inside epoch 0, before any checkpoint exists
    _wait_and_kill(_start(args), out, _during_first_epoch)
    assert not (out / "checkpoint.pt").exists()
    # second kill: in the middle of epoch 1, after the checkpoint of epoch 0
    _wait_and_kill(_start([*args, "--resume"]), out, _mid_epoch_after_checkpoint)
    assert not (out / "summary.json").exists()
    resumed = _cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    want = json.loads((reference_run / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert _strip_times(got) == _strip_times(want)
    want_lines = [_strip_times(r) for r in _lines(reference_run / "metrics.jsonl")]
    got_lines = [_strip_times(r) for r in _lines(out / "metrics.jsonl")]
    assert got_lines == want_lines


def test_existing_run_without_resume_and_changed_settings_are_refused(reference_run,
                                                                     tiny_mnist_dir, capsys):
    args = tiny_run_args(tiny_mnist_dir, reference_run)
    args.remove("--threads")
    args.remove("1")
    assert main([*args, "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    args[args.index("--lr") + 1] = "0.1"
    assert main([*args, "--quiet", "--resume"]) == 2
    assert "needs the same settings" in capsys.readouterr().err


def test_batch_schedule_switches_in_process_keeping_model_and_momentum(tiny_mnist_dir, tmp_path,
                                                                     one_thread):
    from reference_training.data import load_dataset

    ds = load_dataset("mnist", tiny_mnist_dir)
    seen = []

    def spy(epoch, model, optimizer, record):
        bufs = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
        seen.append((epoch, id(model), id(optimizer), [id(b) for b in bufs],
                     [b.clone() for b in bufs], record["batch_size"]))

    cfg = RunConfig(model="resnet20", dataset="mnist", width=4, epochs=2, lr=0.05,
                    batch_size=None, batch_schedule="8,16", measure_every=4, seed=0)
    summary = train(cfg, tmp_path / "switch", quiet=True, dataset=ds, on_epoch_end=spy)
    assert [s[5] for s in seen] == [8, 16]
    assert summary["batch_sizes"] == [8, 16]
    (e0, m0, o0, ids0, vals0, _), (e1, m1, o1, ids1, vals1, _) = seen
    assert (m0, o0) == (m1, o1)
    assert ids0 == ids1  # the same momentum tensors, updated in place across the switch
    assert any(not torch.equal(a, b) for a, b in zip(vals0, vals1))
    measures = [r for r in _lines(tmp_path / "switch" / "metrics.jsonl") if r["type"] == "measure"]
    assert {m["batch_size"] for m in measures if m["epoch"] == 0} == {8}
    assert {m["batch_size"] for m in measures if m["epoch"] == 1} == {16}
    # 96/8 = 12 then 96/16 = 6 iterations: K counts across the stages
    assert measures[-1]["iteration"] == 12 + 4


def test_divergence_is_recorded_not_raised(tiny_mnist_dir, tmp_path, one_thread):
    from reference_training.data import load_dataset

    ds = load_dataset("mnist", tiny_mnist_dir)
    cfg = RunConfig(model="resnet20", dataset="mnist", width=4, epochs=2, lr=1e30,
                    batch_size=16, measure_every=1, seed=0)
    summary = train(cfg, tmp_path / "div", quiet=True, dataset=ds)
    assert summary["diverged"] is True and summary["finished"] is True
    assert summary["test_error"] is None
    assert json.loads((tmp_path / "div" / "summary.json").read_text())["diverged"] is True


def test_parse_batch_schedule_and_labels():
    assert parse_batch_schedule("s32") == ("fixed", [32])
    assert parse_batch_schedule("s32-to-128") == ("range", (32, 128))
    assert parse_batch_schedule("s32-to-128-MS") == ("ms", (32, 128))
    assert parse_batch_schedule("16,32,64") == ("list", [16, 32, 64])
    sched = make_schedule("s16-to-64", epochs=10)
    assert [sched.batch_size(e) for e in range(10)] == [16, 16, 23, 23, 32, 32, 45, 45, 64, 64]
    assert run_label(RunConfig(batch_size=None, batch_schedule="s32-to-128-MS")) == "s32-to-128-MS"
    assert run_label(RunConfig(batch_size=64)) == "s64"
    for bad in ("32-to-128", "s0", "s32-MS", "abc", ""):
        with pytest.raises(ValueError, match="batch schedule must look like|batch sizes must be|needs a range"):
            parse_batch_schedule(bad)


def test_learning_rate_drops_at_half_and_three_quarters():
    lrs = [lr_at(e, base_lr=0.1, epochs=320) for e in (0, 159, 160, 239, 240, 319)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-12)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["run", "--batch-schedule", "s16-to"], "batch schedule must look like"),
        (["run", "--measure-every", "0"], "measure_every must be an int >= 1"),
        (["run", "--epochs", "0"], "epochs must be an int >= 1"),
        (["run", "--dataset", "cifar10", "--data-dir", "/nonexistent-dir"], "is not a directory"),
    ],
)
def test_cli_reports_bad_arguments_as_errors(argv, match, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert match in capsys.readouterr().err
