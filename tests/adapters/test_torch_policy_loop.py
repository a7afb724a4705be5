"""PolicyBatchSampler: a fimcore.policy rule sets the batch size of an ordinary torch loop."""

from __future__ import annotations

import copy
import json

import pytest

from tests.conftest import import_backend

torch = import_backend("torch")
nn = torch.nn
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import fimcore  # noqa: E402
from fimcore.policy import BatchSizePolicy, Constraints, NoiseScaleRule, NormTestRule  # noqa: E402
from fimcore.stats import BatchTests  # noqa: E402
from fimcore_adapters.torch import GramRecorder, PolicyBatchSampler  # noqa: E402


def _data(n=96):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return TensorDataset(x, y)


def _loop(sampler, model, data, steps, *, state=None, log=None):
    """The README's loop: record, measure, let the policy set the next batch size."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GramRecorder(model)
    tracker = fimcore.MeasureTracker(statistics=(*fimcore.stats.DEFAULT, BatchTests()))
    if state is not None:
        opt.load_state_dict(state["opt"])
        tracker.load_state_dict(state["tracker"])
    done = 0
    while done < steps:
        sampler.set_epoch(sampler.epoch)
        for x, y in DataLoader(data, batch_sampler=sampler):
            opt.zero_grad()
            with rec:
                nn.functional.cross_entropy(model(x), y).backward()
            m = tracker.update(rec.result(), lr=0.1)
            opt.step()
            sampler.step(m)
            if log is not None:
                log.append((len(x), x[0, 0].item()))
            done += 1
            if done == steps:
                break
    return {"opt": opt.state_dict(), "tracker": tracker.state_dict()}


def _policy():
    return BatchSizePolicy(NormTestRule(theta=0.2), 4, Constraints(patience=2, max_size=32))


def test_the_policy_grows_the_batch_and_every_epoch_sees_each_sample_once():
    data = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    sampler = PolicyBatchSampler(len(data), _policy(), seed=3)
    seen, sizes = [], []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GramRecorder(model)
    tracker = fimcore.MeasureTracker(statistics=(*fimcore.stats.DEFAULT, BatchTests()))
    for epoch in range(2):
        sampler.set_epoch(epoch)
        indices = []
        for batch in sampler:
            expected = sampler.policy.batch_size
            x, y = data[batch]
            assert len(batch) == min(expected, len(data) - len(indices))
            indices += batch
            opt.zero_grad()
            with rec:
                nn.functional.cross_entropy(model(x), y).backward()
            sizes.append(expected)
            opt.step()
            sampler.step(tracker.update(rec.result(), lr=0.1))
        seen.append(sorted(indices))
    assert all(s == list(range(len(data))) for s in seen)
    assert sizes[0] == 4 and max(sizes) > 4, sizes                 # it grew
    assert all(b <= 2 * a for a, b in zip(sizes, sizes[1:]) if b > a)  # growth ≤ max_growth
    assert sampler.policy.decisions and all(d.reason for d in sampler.policy.decisions)


def test_checkpoint_mid_epoch_and_resume_reproduce_the_uninterrupted_run():
    data = _data()
    torch.manual_seed(1)
    start = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    full_model, full_log = copy.deepcopy(start), []
    _loop(PolicyBatchSampler(len(data), _policy(), seed=5), full_model, data, 30, log=full_log)

    first_model, first_log = copy.deepcopy(start), []
    sampler = PolicyBatchSampler(len(data), _policy(), seed=5)
    state = _loop(sampler, first_model, data, 13, log=first_log)
    snapshot = json.loads(json.dumps(sampler.state_dict()))          # survives JSON
    weights = copy.deepcopy(first_model.state_dict())

    resumed_model = copy.deepcopy(start)
    resumed_model.load_state_dict(weights)
    resumed = PolicyBatchSampler(len(data), _policy(), seed=5)
    resumed.load_state_dict(snapshot)
    rest_log = []
    _loop(resumed, resumed_model, data, 17, state=state, log=rest_log)
    assert first_log + rest_log == full_log
    for a, b in zip(resumed_model.parameters(), full_model.parameters()):
        assert torch.equal(a, b)


def test_noise_scale_rule_in_the_loop_never_leaves_its_bounds():
    data = _data(64)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 3))
    policy = BatchSizePolicy(NoiseScaleRule(), 4, Constraints(min_size=4, max_size=16, multiple_of=4,
                                                              patience=1))
    sampler = PolicyBatchSampler(len(data), policy, shuffle=False)
    rec = GramRecorder(model)
    tracker = fimcore.MeasureTracker(statistics=(*fimcore.stats.DEFAULT, fimcore.stats.NoiseScale()))
    for x, y in DataLoader(data, batch_sampler=sampler):
        with rec:
            nn.functional.cross_entropy(model(x), y).backward()
        size = sampler.step(tracker.update(rec.result(), lr=0.1))
        assert 4 <= size <= 16 and size % 4 == 0


def test_bad_arguments_and_snapshots_are_refused():
    policy = _policy()
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        PolicyBatchSampler(0, policy)
    with pytest.raises(TypeError, match="BatchSizePolicy"):
        PolicyBatchSampler(10, 16)
    sampler = PolicyBatchSampler(10, policy, seed=1)
    with pytest.raises(RuntimeError, match="once per training step"):
        sampler.step()
    other = PolicyBatchSampler(12, _policy(), seed=1)
    with pytest.raises(ValueError, match="num_samples=10"):
        other.load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="PolicyBatches.state_dict"):
        sampler.load_state_dict({"epoch": 0})
