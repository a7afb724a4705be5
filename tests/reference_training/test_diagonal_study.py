"""reference_training.diagonal_study: resumable, and its rows obey the estimator identities."""

from __future__ import annotations

import json

import pytest

import torch

from reference_training import diagonal_study as study  # noqa: E402
from reference_training.data import ImageDataset  # noqa: E402


@pytest.fixture
def tiny(monkeypatch):
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset("mnist5k", torch.randint(0, 256, (48, 1, 28, 28), generator=g, dtype=torch.uint8),
                      torch.arange(48) % 10,
                      torch.randint(0, 256, (12, 1, 28, 28), generator=g, dtype=torch.uint8),
                      torch.arange(12) % 10, 10, (33.3,), (78.6,), False, 0)
    monkeypatch.setattr(study, "load_dataset", lambda name: ds)
    monkeypatch.setattr(study, "make_mlp", lambda seed=0: study.nn.Sequential(
        *list(_small(seed))))


def _small(seed):
    torch.manual_seed(seed)
    nn = study.nn
    return [nn.Linear(784, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4),
            nn.Sigmoid(), nn.Linear(4, 10)]


def test_resume_reproduces_the_straight_run_and_rows_hold(tiny, tmp_path):
    opts = dict(inputs=6, seed=0, lr=1e-3, batch=16, log=lambda s: None)
    straight = study.run(tmp_path / "a", epochs=1, **opts)
    study.run(tmp_path / "b", epochs=0, **opts)
    resumed = study.run(tmp_path / "b", epochs=1, **opts)
    assert [r["epoch"] for r in resumed] == [0, 1]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1]
    for a, b in zip(straight, resumed):
        assert a["layers"] == b["layers"] and a["train_loss"] == b["train_loss"]
    for r in straight:
        last = r["layers"][study.LAYERS[-1]]
        assert last["v2"] == 0 and last["v2_upper"] == 0          # output layer: w = 0
        for d in r["layers"].values():
            for v in ("v1", "v2"):
                assert d[f"{v}_lower"] <= d[v] * (1 + 1e-9) + 1e-300
                assert d[v] <= d[f"{v}_upper"] * (1 + 1e-9) + 1e-300
    study.write_table(straight, tmp_path / "t.md", "header")
    study.plot(straight, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    assert len((tmp_path / "t.md").read_text().splitlines()) == 4 + 2 * len(study.LAYERS)
