"""Documented GramRecorder options, each against the float64 per-sample loop.

``strategy`` as a dict, ``check_uses="always"`` and a module with no rule of its own
(``nn.ConvTranspose2d``) taking the generic path.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fimcore_adapters.torch import GramRecorder

from ._torch_reference import loop_gram

B = 5


def ce_sum(out, t):
    return F.cross_entropy(out, t, reduction="sum")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _record_and_compare(model, x, y, **options):
    """G and .grad of one recorded mean-loss step against the loop and the plain step."""
    G_ref, _ = loop_gram(model, ce_sum, x, y)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    rec = GramRecorder(model, **options)
    with rec:
        F.cross_entropy(model(x), y).backward()
    assert rel(rec.gram(), G_ref) <= 1e-10
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    return rec


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_strategy_dict_sets_named_modules_and_leaves_auto_elsewhere():
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(B, 6, dtype=torch.float64), torch.randint(0, 3, (B,))
    auto = {r.name: r.path for r in _record_and_compare(model, x, y).report()}
    rec = _record_and_compare(model, x, y, strategy={"0": "materialize", "4": "generic"})
    paths = {r.name: r.path for r in rec.report()}
    assert paths == {"0": "materialize", "2": auto["2"], "4": "generic"}
    assert auto["0"] != "materialize"  # the dict changed something auto would not have chosen


def test_conv_transpose_goes_through_the_generic_path_exactly():
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), nn.Tanh(),
                          nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).double()
    x, y = torch.randn(B, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (B,))
    rec = _record_and_compare(model, x, y)
    report = {r.module: r.path for r in rec.report()}
    assert report["ConvTranspose2d"] == "generic"


class _SometimesTied(nn.Module):
    """Uses ``emb.weight`` through ``F.linear`` outside its module only when ``tie`` is set."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.mix = nn.Linear(3, 3)
        self.tie = False

    def forward(self, idx):
        h = self.mix(self.emb(idx))
        return F.linear(h, self.emb.weight) if self.tie else h


def test_check_uses_always_catches_a_use_that_starts_after_the_first_step():
    idx = torch.randint(0, 5, (4, 2))
    for check_uses, raises in (("first", False), ("always", True)):
        model = _SometimesTied()
        rec = GramRecorder(model, check_uses=check_uses)
        with rec:
            model(idx).sum().backward()        # first step: the weight is used only by emb
        model.tie = True
        if raises:
            with pytest.raises(RuntimeError, match="parameter 'emb.weight' is used by .*linear outside"):
                with rec:
                    model(idx).sum().backward()
        else:                                  # "first": documented to check the first step only
            with rec:
                model(idx).sum().backward()
