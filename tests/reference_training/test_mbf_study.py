"""reference_training.mbf_study end to end on a tiny budget: runs, resumes, tables and plots."""

from __future__ import annotations

import json

import pytest

from tests.conftest import import_backend

torch = import_backend("torch")

from reference_training import mbf_study as study  # noqa: E402
from reference_training.data import ImageDataset  # noqa: E402


@pytest.fixture
def tiny_data(monkeypatch):
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset("mnist5k", torch.randint(0, 256, (40, 1, 12, 12), generator=g, dtype=torch.uint8),
                      torch.arange(40) % 10,
                      torch.randint(0, 256, (20, 1, 12, 12), generator=g, dtype=torch.uint8),
                      torch.arange(20) % 10, 10, (33.3,), (78.6,), False, 0)
    monkeypatch.setattr(study, "load_dataset", lambda name: ds)


def test_tiny_study_runs_resumes_and_reports(tiny_data, tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--seeds", "2", "--ae-budget", "0.05", "--ae-eval-every", "0.02",
            "--resnet-epochs", "1", "--resnet-depth", "8", "--ae-widths", "144,8,3,8,144",
            "--train-subset", "32"]
    assert study.main(argv) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*.json"))
    assert runs == sorted(f"{t}-{o}-{s}.json" for t in ("ae", "resnet") for o in study.OPTIMISERS for s in (0, 1))
    r = json.loads((tmp_path / "runs" / "resnet-mbf-0.json").read_text())
    assert [row["epoch"] for row in r["rows"]] == [0, 1] and 0.0 <= r["final_test_error"] <= 1.0
    ae = json.loads((tmp_path / "runs" / "ae-adam-1.json").read_text())
    assert ae["steps"] >= 1 and ae["curve"][-1][0] >= 0.05
    table = (tmp_path / "table.md").read_text()
    assert "| MBF | 2 |" in table and "| SGD-momentum | 2 |" in table
    assert (tmp_path / "ae_loss_vs_time.png").stat().st_size > 0
    assert (tmp_path / "resnet_test_error.png").stat().st_size > 0
    # a second call resumes: every run is finished, nothing retrains
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    capsys.readouterr()
    assert study.main(argv) == 0
    assert "seed 0:" not in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}


def test_a_diverging_run_is_recorded_not_hidden(tmp_path):
    x = torch.rand(8, 6, generator=torch.Generator().manual_seed(0))
    r = study.run_autoencoder("mbf", 0, x=x, budget_s=5.0, eval_every_s=1.0, widths=(6, 3, 6), batch=8,
                              settings=dict(lr=1e30, damping=1e-3, curvature_every=1, inverse_every=1))
    assert r["final_loss"] is None and r["diverged_at_step"] is not None
    assert r["diverged_at_step"] == r["steps"] < 10
    table = study.write_table([r], tmp_path / "t.md", "h")
    assert f"diverged: seed 0 at step {r['steps']}" in table

