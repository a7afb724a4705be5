"""``reference_training run --stats``: every statistic of fimcore.stats reaches metrics.jsonl.

Each field is checked against another field of the same line computed by a different statistic
(closed forms: stable rank = Tr G/λ_max, m_λ = Tr G/(B·P), λ_max(F) = λ_max/B, the per-layer
traces sum to Tr G), so a field written under the wrong name or from the wrong Gram fails.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fimcore.stats.base import ALWAYS, registered_fields
from reference_training.cli import main
from reference_training.config import STATS, statistic_names

from .conftest import tiny_run_args


def _measures(out):
    lines = [json.loads(s) for s in (Path(out) / "metrics.jsonl").read_text().splitlines() if s.strip()]
    return [d for d in lines if d.get("type") == "measure"]


@pytest.fixture(scope="module")
def all_stats_run(tiny_mnist_dir, tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("stats") / "run"
        args = tiny_run_args(tiny_mnist_dir, out, epochs=1, extra=["--stats", "all", "--quiet"])
        assert main(args) == 0
    finally:
        torch.set_num_threads(before)
    return out


def test_every_registered_statistic_is_selectable():
    wanted = {s for s in registered_fields().values() if s not in ALWAYS}
    assert set(statistic_names("all")) == wanted
    for field, stat in registered_fields().items():
        if stat not in ALWAYS:
            assert STATS[field] == stat
    with pytest.raises(ValueError, match="received unknown"):
        statistic_names("entropy")


def test_all_stats_fields_in_every_measure_line_and_consistent(all_stats_run):
    fields = [f for f, s in registered_fields().items() if s not in ALWAYS]
    lines = _measures(all_stats_run)
    assert lines
    for d in lines:
        missing = [f for f in fields if f not in d]
        assert not missing, missing
        B, trace, lam = d["batch_size"], d["trace"], d["lambda_max"]
        assert d["stable_rank"] == pytest.approx(trace / lam, rel=1e-9)
        assert d["lambda_max_F"] == pytest.approx(lam / B, rel=1e-9)
        layers = d["per_layer"]
        assert len(layers) > 3
        assert sum(v["trace"] for v in layers.values()) == pytest.approx(trace, rel=1e-5)
        for v in layers.values():
            assert 1 - 1e-9 <= v["effective_rank"] <= B + 1e-9
        P = d["trace"] / (B * d["m_lambda"])
        assert P == pytest.approx(round(P), rel=1e-9)          # m_λ = Tr G/(B·P), P an integer
        for f in ("norm_test", "inner_product_test", "orthogonality_test", "B_simple"):
            assert d[f] is None or math.isfinite(d[f]) or d[f] == math.inf


def test_extra_statistics_leave_the_run_and_its_gram_unchanged(tiny_mnist_dir, tmp_path, all_stats_run):
    """The same run without --stats: same batches and steps, and the same Gram up to the rounding
    of summing per-layer blocks (kept for per_layer) instead of accumulating in backward order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = tmp_path / "plain"
        assert main(tiny_run_args(tiny_mnist_dir, plain, epochs=1, extra=["--quiet"])) == 0
    finally:
        torch.set_num_threads(before)
    a, b = _measures(plain), _measures(all_stats_run)
    assert [d["iteration"] for d in a] == [d["iteration"] for d in b]
    for x, y in zip(a, b):
        assert y["trace"] == pytest.approx(x["trace"], rel=1e-4)
        assert y["lambda_max"] == pytest.approx(x["lambda_max"], rel=1e-4)
        assert "per_layer" not in x and "m_lambda" not in x
