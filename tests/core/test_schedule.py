"""StagedBatchSchedule and paper_lr_milestones (host-side, ints in, ints out)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fimcore import StagedBatchSchedule, paper_lr_milestones


def test_issue_example_32_to_128():
    schedule = StagedBatchSchedule.from_range(32, 128, stages=5, total_epochs=320)
    assert schedule.sizes == (32, 45, 64, 91, 128)
    assert schedule.boundaries == (64, 128, 192, 256)  # the released code's switch epochs
    assert [schedule.batch_size(e) for e in (0, 63, 64, 255, 256, 319)] == [32, 32, 45, 91, 128, 128]


def test_remainder_goes_to_earlier_stages():
    schedule = StagedBatchSchedule([1, 2, 3], total_epochs=11)
    lengths = [sum(schedule.stage(e) == i for e in range(11)) for i in range(3)]
    assert lengths == [4, 4, 3]


@given(
    start=st.integers(1, 512),
    end=st.integers(1, 512),
    stages=st.integers(2, 8),
    extra=st.integers(0, 40),
    spacing=st.sampled_from(["geometric", "linear"]),
)
def test_from_range_against_formula_and_equal_stages(start, end, stages, extra, spacing):
    total = stages + extra
    schedule = StagedBatchSchedule.from_range(start, end, stages=stages, total_epochs=total, spacing=spacing)
    for i, size in enumerate(schedule.sizes):
        t = i / (stages - 1)
        exact = start * (end / start) ** t if spacing == "geometric" else start + (end - start) * t
        assert abs(size - exact) <= 0.5 + 1e-9 * exact  # nearest integer
    assert schedule.sizes[0] == start and schedule.sizes[-1] == end
    lengths = [sum(schedule.stage(e) == i for e in range(total)) for i in range(stages)]
    assert sum(lengths) == total and min(lengths) >= 1
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)
    for e in range(total):
        assert schedule.batch_size(e) == schedule.sizes[schedule.stage(e)]
    assert list(schedule.boundaries) == [sum(lengths[:i]) for i in range(1, stages)]


def test_paper_lr_milestones():
    assert paper_lr_milestones(320) == (160, 240)
    assert paper_lr_milestones(10) == (5, 7)
    for total in range(1, 50):
        assert paper_lr_milestones(total) == (math.floor(0.5 * total), math.floor(0.75 * total))


@given(stages=st.integers(1, 5), extra=st.integers(0, 30))
def test_multi_stage_repeats_the_ramp_in_each_lr_phase(stages, extra):
    total = 4 * stages + extra
    milestones = paper_lr_milestones(total)
    if min(milestones[0], milestones[1] - milestones[0], total - milestones[1]) < stages:
        return
    end = 32 if stages == 1 else 128
    schedule = StagedBatchSchedule.multi_stage(32, end, stages=stages, total_epochs=total,
                                               lr_milestones=milestones)
    ramp = StagedBatchSchedule.from_range(32, end, stages=stages, total_epochs=stages).sizes
    assert schedule.sizes == ramp * 3
    for a, b in zip((0, *milestones), (*milestones, total)):
        phase = StagedBatchSchedule(list(ramp), total_epochs=b - a)
        assert [schedule.batch_size(e) for e in range(a, b)] == [phase.batch_size(e) for e in range(b - a)]
        assert schedule.batch_size(a) == 32


def test_state_dict_round_trip_is_json():
    schedule = StagedBatchSchedule.multi_stage(16, 256, total_epochs=40, lr_milestones=(20, 30))
    state = json.loads(json.dumps(schedule.state_dict()))
    other = StagedBatchSchedule([1], total_epochs=1)
    other.load_state_dict(state)
    assert other == schedule
    assert [other.batch_size(e) for e in range(40)] == [schedule.batch_size(e) for e in range(40)]


# --- bad input ---------------------------------------------------------------------------


def test_schedule_errors():
    with pytest.raises(ValueError, match="non-empty sequence"):
        StagedBatchSchedule([], total_epochs=3)
    with pytest.raises(ValueError, match="sizes\\[1\\] must be a positive integer"):
        StagedBatchSchedule([32, 0], total_epochs=3)
    with pytest.raises(TypeError, match="sizes\\[0\\] must be a positive integer"):
        StagedBatchSchedule([32.0], total_epochs=3)
    with pytest.raises(ValueError, match="number of stages must be <= total_epochs"):
        StagedBatchSchedule([1, 2, 3], total_epochs=2)
    with pytest.raises(ValueError, match="strictly increasing within"):
        StagedBatchSchedule([1, 2], total_epochs=4, boundaries=[4])
    with pytest.raises(ValueError, match="total_epochs must be a positive integer"):
        StagedBatchSchedule([1], total_epochs=0)
    with pytest.raises(ValueError, match="spacing must be one of"):
        StagedBatchSchedule.from_range(1, 4, total_epochs=5, spacing="log")
    with pytest.raises(ValueError, match="start must equal end"):
        StagedBatchSchedule.from_range(1, 4, stages=1, total_epochs=5)
    with pytest.raises(ValueError, match="lr_milestones must be strictly increasing"):
        StagedBatchSchedule.multi_stage(32, 128, total_epochs=30, lr_milestones=(20, 10))
    with pytest.raises(ValueError, match="at least stages=5 epochs"):
        StagedBatchSchedule.multi_stage(32, 128, total_epochs=12, lr_milestones=(6, 9))
    with pytest.raises(ValueError, match="missing keys"):
        StagedBatchSchedule([1], total_epochs=1).load_state_dict({"sizes": [1]})


def test_integer_argument_errors():
    with pytest.raises(TypeError, match="total_epochs must be a positive integer"):
        paper_lr_milestones(320.0)
    with pytest.raises(ValueError, match="total_epochs must be a positive integer"):
        paper_lr_milestones(0)
    with pytest.raises(TypeError, match="start must be a positive integer"):
        StagedBatchSchedule.from_range(32.5, 128, total_epochs=10)
    with pytest.raises(TypeError, match="stages must be a positive integer"):
        StagedBatchSchedule.from_range(32, 128, stages=True, total_epochs=10)


def test_epoch_errors():
    schedule = StagedBatchSchedule.from_range(32, 128, total_epochs=10)
    for epoch in (-1, 10):
        with pytest.raises(ValueError, match="epoch must lie in \\[0, total_epochs=10\\)"):
            schedule.batch_size(epoch)
    with pytest.raises(TypeError, match="epoch must be an int"):
        schedule.stage(1.0)
