"""GramRecorder(keep_blocks=True): per-layer blocks, GramResult, and their errors."""

from __future__ import annotations

import pytest

from tests.conftest import import_backend

torch = import_backend("torch")
nn = torch.nn

from fimcore import MeasureTracker  # noqa: E402
from fimcore_adapters.torch import GramRecorder  # noqa: E402


def _step(rec, model, x, y):
    model.zero_grad()
    with rec:
        nn.functional.cross_entropy(model(x), y).backward()


def test_blocks_sum_to_the_gram_and_match_a_recorder_without_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4))          # float32: the default model dtype
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 4, (8,))
    plain, kept = GramRecorder(model), GramRecorder(model, keep_blocks=True)
    _step(plain, model, x, y)
    G0 = plain.gram()
    _step(kept, model, x, y)
    G, blocks = kept.gram(), kept.blocks()
    assert set(blocks) == {"0", "1", "4"}
    assert torch.equal(sum(blocks.values()), G)               # the sum, in the order kept
    # the same contributions summed in another order: float32 rounding of a B×B sum only
    tol = 64 * torch.finfo(torch.float32).eps * torch.sqrt(torch.outer(G0.diagonal(), G0.diagonal()))
    assert bool(((G - G0).abs() <= tol).all())
    shares = {r.name: r.trace for r in kept.report()}
    for name, b in blocks.items():
        assert shares[name] == pytest.approx(float(torch.trace(b)), rel=1e-6)


def test_result_carries_what_the_tracker_needs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    rec = GramRecorder(model, keep_blocks=True)
    _step(rec, model, x, y)
    res = rec.result()
    assert res.batch_size == 4 and res.grad_dtype == torch.float64
    assert res.num_params == sum(p.numel() for p in model.parameters())
    assert torch.equal(res.gram, rec.gram()) and set(res.blocks) == {"0", "2"}
    direct = MeasureTracker().update(rec.gram(), lr=0.1, grad_dtype=torch.float64)
    via = MeasureTracker().update(res, lr=0.1)
    assert via.c_k == direct.c_k and via.I_k == direct.I_k


def test_blocks_refused_without_keep_blocks_and_bad_option():
    model = nn.Linear(3, 2)
    rec = GramRecorder(model)
    _step(rec, model, torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(RuntimeError, match="keep_blocks=True"):
        rec.blocks()
    assert rec.result().blocks is None
    with pytest.raises(ValueError, match="keep_blocks must be True or False; received 'yes'"):
        GramRecorder(model, keep_blocks="yes")
