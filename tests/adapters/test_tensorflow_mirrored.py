"""GramTape and GramModel under ``tf.distribute.MirroredStrategy`` on 2 and 4 logical CPU devices.

Logical devices must be set before TensorFlow initialises its devices, so each device count runs
in one fresh process (``_tensorflow_mirrored_child.py``), which computes float64 references that
share no code with the adapter: a per-sample loop (one tape per sample) over the concatenated
global batch, the gradient a plain ``tf.GradientTape`` step hands to the strategy, and plain SGD.
The assertions are here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import import_backend

tf = import_backend("tensorflow")

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-12


def _start(replicas: int, cases: str) -> subprocess.Popen:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "adapters"),
                                           os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "tests.adapters._tensorflow_mirrored_child",
                             str(replicas), cases], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs():
    """Both device counts at once (one process each)."""
    procs = {"two": _start(2, "mlp,cnn,embed,uneven,fit"), "four": _start(4, "mlp,cnn")}
    return {name: _result(proc) for name, proc in procs.items()}


@pytest.fixture(scope="module")
def two(runs):
    return runs["two"]


@pytest.fixture(scope="module")
def four(runs):
    return runs["four"]


CASES = [("two", "mlp"), ("two", "cnn"), ("two", "embed"), ("four", "mlp"), ("four", "cnn")]


@pytest.mark.parametrize("replicas,model", CASES)
def test_global_gram_equals_the_per_sample_loop_and_the_single_replica_tape(replicas, model, request):
    """The (B, B) Gram of the global batch (rows: replica order, then local order) on every
    replica equals the float64 loop on the concatenated batch and one GramTape over it."""
    out = request.getfixturevalue(replicas)[model]
    assert out["shape"] == [8, 8]
    assert out["vs_loop"] <= TOL
    assert out["vs_single"] <= TOL
    assert out["replicas_agree"] == 0.0


def test_replicas_with_different_local_batches(two):
    """5 + 2 samples: the gathered Gram is still the (7, 7) Gram of the global batch."""
    assert two["uneven"]["shape"] == [7, 7]
    assert two["uneven"]["vs_loop"] <= TOL


@pytest.mark.parametrize("replicas,model", CASES)
def test_gradients_are_the_ones_the_strategy_applies(replicas, model, request):
    """Σ_r of the tape's per-replica gradients equals that of a plain tape (what apply_gradients
    all-reduces) and the loop's mean gradient; with rows scaled by the global batch B,
    1ᵀG1 = B²‖∇L‖²."""
    out = request.getfixturevalue(replicas)[model]
    assert out["grad_vs_applied"] <= TOL
    assert out["grad_vs_loop"] <= TOL
    assert out["identity"] <= TOL


def test_report_names_what_was_gathered_and_its_bytes(two, four):
    """Per sample, float64 (8 bytes): Dense 5→4 gathers its factors (5 + 4), the rule-less Scale
    layer its rows (4), Dense 4→3 its factors (4 + 3): 160 bytes; the CNN's first convolution
    (3×3×2 → 3 on 16 positions: factors 16·(18 + 3) > rows 18·3 + 3) gathers rows."""
    for out in (two, four):
        mlp = out["mlp"]
        assert mlp["bytes_per_sample"] == 8 * ((5 + 4) + 4 + (4 + 3))
        assert mlp["paths"] == {"dense": "factored", "scale": "generic", "dense_1": "factored"}
        assert "factors gathered" in mlp["reasons"][0] and "rows gathered" in mlp["reasons"][1]
        assert "rows gathered" in out["cnn"]["reasons"][0]
        assert out["cnn"]["bytes_per_sample"] == 8 * ((18 * 3 + 3) + 6 + (12 * 2 + 2) + (8 + 3))
    # embedding: ids (4 × int32) and δ (4 × 3 float64); then Dense 3→3 factors
    assert two["embed"]["bytes_per_sample"] == 4 * 4 + 8 * 12 + 8 * (3 + 3)


def test_gram_model_fit_under_the_strategy_logs_the_global_gram(two):
    """GramModel.fit under strategy.scope(): each step's logged Gram is the global batch's, and
    the weights after two SGD steps are those of plain SGD on the global batches."""
    fit = two["fit"]
    assert fit["steps"] == 2 and fit["shape"] == [8, 8]
    assert fit["vs_loop"] <= TOL
    assert fit["weights"] <= TOL
    assert fit["loss"] <= TOL      # the logged loss is the global mean, not 1/R of it


def test_gram_model_every_n_is_refused_under_the_strategy(two):
    assert "every=2" in two["every2"] and "every=1" in two["every2"]
