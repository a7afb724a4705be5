"""Smoke tests of the benchmark harness and of the PyTorch benchmark, end to end on a tiny case.

No test asserts a time: the timing logic is checked with a fake clock, the memory probe against a
known allocation, and the PyTorch benchmark by running one tiny configuration and reading its
table.
"""

from __future__ import annotations

import pytest

from benchmarks import _harness as H
from tests.conftest import import_backend
from tests.core.helpers import assert_within, float32_sum_bound


class FakeClock:
    """A clock that each timed callable advances by a known amount."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float):
        def run() -> None:
            self.now += seconds

        return run


def test_median_ratio_pairs_times_by_index():
    # ratios 3/1, 2/2, 10/2 -> 3, 1, 5 -> median 3
    assert H.median_ratio([1.0, 2.0, 2.0], [3.0, 2.0, 10.0]) == 3.0


def test_median_ratio_rejects_unpaired_times():
    with pytest.raises(ValueError, match="pair up one to one"):
        H.median_ratio([1.0, 2.0], [1.0])


def test_interleaved_times_runs_all_repetitions_within_the_cap():
    clock = FakeClock()
    t = H.interleaved_times(clock.step(1.0), clock.step(3.0), reps=5, cap_seconds=100.0, clock=clock)
    assert (t.reps, t.capped) == (5, False)
    assert t.baseline == [1.0] * 5 and t.candidate == [3.0] * 5
    assert t.ratio == 3.0
    assert t.warmup == (1.0, 3.0)
    assert t.elapsed == 24.0  # one warm-up pair and five pairs of 4 s


def test_interleaved_times_stops_when_the_remaining_repetitions_cannot_fit():
    clock = FakeClock()
    # pairs cost 3 s. After the warm-up (3 s) the 5 reps are estimated at half the warm-up cost:
    # 3 + 7.5 <= 12, so rep 1 runs (6 s); then 4 remaining pairs need 12 s, 6 + 12 > cap 12 s
    t = H.interleaved_times(clock.step(1.0), clock.step(2.0), reps=5, cap_seconds=12.0, clock=clock)
    assert (t.reps, t.capped) == (1, True)
    assert t.ratio == 2.0


def test_interleaved_times_stops_after_warmup_when_the_repetitions_cannot_fit():
    clock = FakeClock()
    # warm-up pair 8 s; 5 reps at half that cost need 20 s: 8 + 20 > cap 25 s
    t = H.interleaved_times(clock.step(4.0), clock.step(4.0), reps=5, cap_seconds=25.0, clock=clock)
    assert (t.reps, t.capped) == (0, True)
    assert t.elapsed == 8.0


def test_short_steps_are_timed_in_runs_of_consecutive_calls():
    clock = FakeClock()
    calls = {"plain": 0, "method": 0}

    def plain():
        calls["plain"] += 1
        clock.now += 0.01

    def method():
        calls["method"] += 1
        clock.now += 0.03

    # the longer warm-up step (30 ms) sets the run length: 0.2 s / 30 ms -> 6 calls per run
    t = H.interleaved_times(plain, method, reps=3, cap_seconds=100.0, min_rep_seconds=0.2, clock=clock)
    assert t.number == 6
    assert calls == {"plain": 1 + 3 * 6, "method": 1 + 3 * 6}
    assert t.baseline == pytest.approx([0.01] * 3) and t.candidate == pytest.approx([0.03] * 3)
    assert t.ratio == pytest.approx(3.0)


def test_a_short_step_beside_a_long_one_is_not_repeated():
    clock = FakeClock()
    t = H.interleaved_times(clock.step(0.3), clock.step(0.001), reps=3, cap_seconds=100.0,
                            min_rep_seconds=0.2, clock=clock)
    assert t.number == 1 and t.reps == 3


def test_the_cap_counts_every_call_of_a_run():
    clock = FakeClock()
    # 0.1 s / 10 ms -> 10 calls per run, so a timed pair costs 0.2 s. Warm-up 0.02 s; 5 pairs at
    # half the scaled warm-up cost (0.5 s) fit the 0.8 s cap, so pair 1 runs (to 0.22 s); the 4
    # left need 0.8 s more (0.08 s if the cap counted one call per run): 1.02 s > 0.8 s, it stops
    t = H.interleaved_times(clock.step(0.01), clock.step(0.01), reps=5, cap_seconds=0.8,
                            min_rep_seconds=0.1, clock=clock)
    assert t.number == 10
    assert (t.reps, t.capped) == (1, True)
    assert t.elapsed == pytest.approx(0.22)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reps=0, cap_seconds=1.0), "reps must be at least 1"),
    (dict(reps=1, cap_seconds=0.0), "cap_seconds must be positive"),
    (dict(reps=1, cap_seconds=1.0, min_rep_seconds=-1.0), "min_rep_seconds must be >= 0"),
])
def test_interleaved_times_validates_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        H.interleaved_times(lambda: None, lambda: None, **kwargs)


def test_fault_counter_sees_the_pages_a_step_touches_first():
    import mmap

    pages = 256
    size = pages * mmap.PAGESIZE

    def touch_fresh_pages():
        with mmap.mmap(-1, size) as m:             # anonymous mapping: no page present yet
            for offset in range(0, size, mmap.PAGESIZE):
                m[offset] = 1

    step = H.FaultCounter(touch_fresh_pages)
    idle = H.FaultCounter(lambda: None)
    for _ in range(4):
        step()
        idle()
    assert step.median() >= pages
    assert idle.median() < pages / 4
    assert H.FaultCounter(lambda: None).median() is None


class _StubRunner:
    """Answers memory/timing children from tables, records the calls."""

    def __init__(self, timing: dict, memory: dict):
        self.timing, self.memory, self.calls = timing, memory, []

    def run(self, target, kwargs, *, timeout, memory=False):
        self.calls.append((target.split(":")[1], kwargs["method"], memory))
        table = self.memory if memory else self.timing
        value = table.get(kwargs["method"])
        if value is None:
            return H.IsolatedResult("error", error="Traceback ...\nRuntimeError: boom")
        return H.IsolatedResult("ok", value=value)


def test_for_each_config_runs_each_cell_once_then_its_methods_in_order():
    calls = []

    def per_cell(model, b):
        calls.append(("cell", model, b))
        return f"{model}{b}"

    def per_config(model, b, method, state):
        calls.append((method, state))
        return (model, b, method)

    out = H.for_each_config(["m", "n"], [2, 4], lambda model: ["x", "y"] if model == "m" else ["z"],
                            per_cell=per_cell, per_config=per_config)
    assert calls == [("cell", "m", 2), ("x", "m2"), ("y", "m2"), ("cell", "m", 4), ("x", "m4"),
                     ("y", "m4"), ("cell", "n", 2), ("z", "n2"), ("cell", "n", 4), ("z", "n4")]
    assert out == [("m", 2, "x"), ("m", 2, "y"), ("m", 4, "x"), ("m", 4, "y"), ("n", 2, "z"),
                   ("n", 4, "z")]


def test_run_timing_grid_marks_targeted_ratios_and_notes_failed_children():
    timing = {"fast": dict(plain=0.010, step=0.012, ratio=1.2, q1=1.15, q3=1.25, reps=5, capped=False),
              "fast-noeig": dict(plain=0.010, step=0.011, ratio=1.1, q1=1.0, q3=1.6, reps=5, capped=False),
              "slow": dict(plain=0.010, step=0.030, ratio=3.0, reps=2, capped=True)}
    memory = {"plain": {"extra_mb": 10.0}, "fast": {"extra_mb": 12.4}}
    runner = _StubRunner(timing, memory)
    labels = {"fast": "Fast", "fast-noeig": "Fast, no eig", "slow": "Slow", "broken": "Broken"}
    rows, notes = H.run_timing_grid(
        runner, "benchmarks.x", model_labels={"m": "Model"}, method_labels=labels, models=["m"],
        methods=["fast", "fast-noeig", "slow", "broken"], batch_sizes=[128], reps=5, cap_seconds=10.0,
        memory=True, target=1.5, targeted=lambda method: method != "slow", log=lambda s: None)
    assert rows[0] == ["Model", 128, "Fast", "10.0", "12.0", "1.20× [1.15–1.25] ✓", "5", "10", "12"]
    assert rows[1][5] == "1.10× [1.00–1.60] ≈"                     # the target is inside the spread
    assert rows[1][8] == "–"                                       # no memory child for *-noeig
    assert rows[2][5] == "3.00×" and rows[2][6] == "2 (cap)"      # not targeted: no mark
    assert rows[3] == ["Model", 128, "Broken", "–", "–", "–", "–", "–", "–"]
    assert [c for c in runner.calls if c[2]] == [("memory_job", m, True) for m in ("plain", "fast", "slow", "broken")]
    assert any(n.startswith("m B=128 broken: error") for n in notes)
    assert any(n.startswith("memory m B=128 slow: error") for n in notes)
    assert len(H.grid_headers("ratio")) == len(rows[0])


def test_markdown_table_escapes_pipes():
    assert H.markdown_table(["a", "b"], [[1, "x|y"]]).splitlines() == [
        "| a | b |", "| --- | --- |", "| 1 | x\\|y |"]


# ---- child processes (spawn: a bare interpreter, no framework import) ----------------------


def _hold_bytes(megabytes: int) -> dict:
    blocks: list[bytearray] = []

    def step() -> None:
        blocks.append(bytearray(b"\x01" * (megabytes * 10**6)))  # written, so resident
        blocks.clear()

    return vars(H.step_memory(step))


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def _fail() -> None:
    raise ArithmeticError("deliberate failure")


@pytest.fixture(scope="module")
def spawn_runner():
    return H.IsolatedRunner(start_method="spawn")


def test_step_memory_sees_a_known_allocation(spawn_runner):
    out = spawn_runner.run(f"{__name__}:_hold_bytes", {"megabytes": 40}, timeout=60, memory=True)
    assert out.status == "ok", out.error
    # each step holds a 40 MB block (plus its source bytes literal of the same size) at its peak
    assert 38 <= out.value["extra_mb"] <= 150
    assert out.value["peak_mb"] >= out.value["rss_before_mb"] + 38


def test_isolated_runner_kills_a_child_at_its_timeout(spawn_runner):
    out = spawn_runner.run(f"{__name__}:_sleep", {"seconds": 60}, timeout=1)
    assert out.status == "timeout"
    assert out.seconds < 30


def test_isolated_runner_reports_a_child_error(spawn_runner):
    out = spawn_runner.run(f"{__name__}:_fail", timeout=60)
    assert out.status == "error"
    assert "deliberate failure" in out.error


def test_marks_against_a_target_need_the_whole_spread_on_one_side():
    """A ratio whose interquartile range straddles the target is neither met nor missed."""
    plain = [10.0, 10.0, 10.0, 10.0, 10.0]
    q1, q3 = H.ratio_quartiles(plain, [9.0, 9.4, 9.6, 10.4, 11.0])   # median 0.96×: noise
    assert (q1, q3) == (0.94, 1.04)
    assert H.target_mark(q1, q3, 1.0) == "≈"
    assert H.target_mark(q1, q3, 1.05) == "✓" and H.target_mark(q1, q3, 0.9) == "✗"
    assert H.ratio_quartiles([1.0], [1.3]) == (1.3, 1.3) and H.fmt_spread(1.3, 1.3) == " [1.30–1.30]"
    assert H.target_mark(float("nan"), float("nan"), 1.0) == "–" and H.fmt_spread(float("nan"), 0) == ""


def test_isolated_runner_rejects_an_unknown_start_method():
    with pytest.raises(ValueError, match="start_method must be"):
        H.IsolatedRunner(start_method="thread")


# ---- the PyTorch benchmark, one tiny configuration end to end -------------------------------


def test_bench_torch_runs_one_tiny_configuration_and_writes_a_table(tmp_path):
    import_backend("torch")
    from benchmarks import bench_torch

    out = tmp_path / "torch.md"
    code = bench_torch.main(["--models", "mlp", "--batch-sizes", "4", "--methods", "fimcore", "torch.func",
                             "--reps", "1", "--cap-seconds", "60", "--threads", "1", "--output", str(out)])
    assert code == 0
    text = out.read_text()
    assert "## MLP 784-512-256-10" in text and "## Machine and versions" in text
    rows = {line.split(" | ")[1]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| 4 | ")}
    assert set(rows) == {bench_torch.METHOD_LABELS["fimcore"], bench_torch.METHOD_LABELS["torch.func"]}
    for cells in rows.values():
        # a measured ratio and its interquartile range, not an error or a cap (1 rep: q1 = q3 = ratio)
        ratio, spread = cells[4].split(" [")
        assert ratio.endswith("×") and spread == "{0}–{0}]".format(ratio[:-1]), cells
        plain_faults, method_faults = cells[5].split(" / ")   # page faults per step, both steps
        assert plain_faults.replace(",", "").isdigit() and method_faults.replace(",", "").isdigit(), cells
        assert cells[6].endswith(("MB", "×)")), cells  # a memory figure
    # torch.func's float32 G against fimcore's float64 G: an MLP has no BatchNorm, so they agree
    rel_err = float(rows[bench_torch.METHOD_LABELS["torch.func"]][7])
    assert rel_err < 1e-4


# ---- the DDP benchmark: its cost model in closed form, and one tiny 2-rank run ---------------


def test_bench_ddp_cost_model_counts_factors_and_rows_in_closed_form():
    import_backend("torch")
    from benchmarks import bench_ddp

    res = bench_ddp.cost_model("mlp", global_batch=32, world=4)      # B_r = 8, float32
    assert res["local_batch"] == 8
    first = res["layers"][0]
    assert (first["T"], first["d_a"], first["d_g"]) == (1, 784, 512)
    assert first["factor_bytes"] == 8 * (784 + 512) * 4
    assert first["rows_bytes"] == 8 * (784 * 512 + 512) * 4
    assert first["form"] == "factors" and first["bytes"] == first["factor_bytes"]
    assert res["bytes"] == 8 * 4 * ((784 + 512) + (512 + 256) + (256 + 10))
    assert "| Linear | 1 | 3 |" in bench_ddp.cost_model_markdown(res)


def test_bench_ddp_runs_one_tiny_two_rank_configuration():
    import_backend("torch")
    from benchmarks import bench_ddp

    res = bench_ddp.run(2, ["mlp"], reps=1, global_batch=8, timeout=120)["mlp"]
    assert len(res["plain"]) == len(res["measured"]) == 1
    # rank 0 contributes its 4 samples' factors of the three Linear layers, float32
    assert res["comm"]["bytes"] == 4 * 4 * ((784 + 512) + (512 + 256) + (256 + 10))
    assert res["comm"]["sizes"] == [4, 4] and set(res["forms"].values()) == {"factors"}
    row = bench_ddp._ratio_row(2, "mlp", res, 8)
    assert row.startswith("| 2 | MLP 784-512-256-10 | 8 (4/rank) |") and "×**" in row


def test_bench_torch_torchjd_and_async_rows_and_the_arithmetic_floor(tmp_path):
    import_backend("torch")
    from benchmarks import bench_torch

    out = tmp_path / "torch.md"
    code = bench_torch.main(["--models", "mlp", "--batch-sizes", "4", "--methods", "fimcore", "fimcore-async",
                             "torchjd", "--reps", "1", "--cap-seconds", "60", "--threads", "1",
                             "--no-memory", "--output", str(out)])
    assert code == 0
    text = out.read_text()
    rows = {line.split(" | ")[1]: line.split(" | ") for line in text.splitlines()
            if line.startswith("| 4 | ")}
    assert set(rows) == {bench_torch.METHOD_LABELS[m] for m in ("fimcore", "fimcore-async", "torchjd")}
    # TorchJD's Gramian of the per-sample losses is fimcore's G (mean reduction) in float32
    assert float(rows[bench_torch.METHOD_LABELS["torchjd"]][7]) < 1e-4
    # the floor: 1 + B²(Σ widths of the three dense layers, factored) / plain step's multiply-adds
    B, widths = 4, [(784, 512), (512, 256), (256, 10)]
    gram = sum(B * B * (a + g + 1) for a, g in widths)
    plain = sum(B * a * g * (2 if i == 0 else 3) for i, (a, g) in enumerate(widths))
    assert f"arithmetic floor of the recorder's step {1 + gram / plain:.3f}×" in text


# ---- the TensorFlow per-layer profile: its ablation is a valid plain step --------------------


@pytest.mark.parametrize("use_bias", [True, False])
def test_tf_profile_stand_in_gives_the_conv_rules_batch_gradients(use_bias):
    """The profile's "batch filter gradient only" stand-in must update the weights as the rule
    does (else the ablated step is not the plain step's work), and return a zero Gram."""
    tf = import_backend("tensorflow")
    import keras
    import numpy as np

    from benchmarks.profile_tensorflow_layers import _batch_filter_rule
    from fimcore_adapters._tensorflow import convps as conv

    rng = np.random.default_rng(0)
    layer = keras.layers.Conv2D(5, 3, strides=2, padding="same", use_bias=use_bias)
    x = tf.constant(rng.normal(size=(4, 7, 6, 3)), tf.float32)
    out = layer(x)
    delta = tf.constant(rng.normal(size=out.shape), tf.float32)
    capture = {"a": x, "padding": "same"}
    rule = conv.ConvRule()
    gram, grads, _ = _batch_filter_rule(rule, layer, capture, [delta])
    _, expected, _ = rule.gram_and_grads(layer, capture, [delta])
    # both are float32 sums over the 4·4·3 output positions of the batch, through different
    # kernels: within the rounding bound of such a sum, from the same sums of |x|·|δ|
    _, abs_sums, _ = _batch_filter_rule(rule, layer, {"a": tf.abs(x), "padding": "same"}, [tf.abs(delta)])
    assert len(grads) == len(expected) == (2 if use_bias else 1)
    for g, e, a in zip(grads, expected, abs_sums):
        assert_within(g.numpy(), e.numpy(), float32_sum_bound(a.numpy(), 4 * 4 * 3))
    assert gram.shape == (4, 4) and not np.any(gram.numpy())


def test_tf_profile_report_attributes_each_variant_against_the_gram_step():
    from benchmarks.profile_tensorflow_layers import report

    import_backend("tensorflow")
    result = {"times": {"plain": 20.0, "gram": 35.0, "no_conv": 20.5, "conv0": 30.0, "no_gemm": 31.0},
              "convs": ["c1"]}
    text = report("cnn", 8, 3, result)
    cells = [[c.strip() for c in line.strip("| ").split(" | ")] for line in text.splitlines()
             if line.startswith("| ")]
    lines = {c[0]: c for c in cells}
    assert lines["Keras `train_step` (plain)"][2:4] == ["1.00×", "+15.0"]
    assert lines["… only `c1` (convolution 1) replaced"][1:4] == ["30.0", "1.50×", "+5.0"]
    assert "median of 3 repetitions" in text


# ---- sampled-label Fisher rows (--fisher empirical,sampled) ---------------------------------


def test_interleaved_group_runs_the_steps_round_robin_within_the_cap():
    from benchmarks import _sampled_rows as R

    clock, order = FakeClock(), []

    def step(name, seconds):
        def run():
            order.append(name)
            clock.now += seconds
        return run

    steps = {"plain": step("p", 1.0), "empirical": step("e", 2.0), "sampled": step("s", 3.0)}
    t = R.interleaved_group(steps, reps=5, cap_seconds=100.0, clock=clock)
    assert (t.reps, t.capped, t.number) == (5, False, 1)
    assert order == ["p", "e", "s"] * 6                    # one warm-up round, then five
    assert t.times == {"plain": [1.0] * 5, "empirical": [2.0] * 5, "sampled": [3.0] * 5}
    assert t.elapsed == 36.0


@pytest.mark.parametrize("cap, reps_done, elapsed", [
    (20.0, 0, 6.0),    # warm-up round 6 s; 5 rounds at half its cost need 15 s: 6 + 15 > 20
    (24.0, 1, 12.0),   # round 1 fits (6 + 15 ≤ 24); then 4 rounds of 6 s: 12 + 24 > 24
])
def test_interleaved_group_stops_when_the_remaining_rounds_cannot_fit(cap, reps_done, elapsed):
    from benchmarks import _sampled_rows as R

    clock = FakeClock()
    steps = {"a": clock.step(1.0), "b": clock.step(2.0), "c": clock.step(3.0)}
    t = R.interleaved_group(steps, reps=5, cap_seconds=cap, clock=clock)
    assert (t.reps, t.capped, t.elapsed) == (reps_done, True, elapsed)


def test_interleaved_group_times_short_steps_in_runs_set_by_the_longest():
    from benchmarks import _sampled_rows as R

    clock = FakeClock()
    steps = {"a": clock.step(1 / 64), "b": clock.step(1 / 32), "c": clock.step(1 / 16)}
    # the longest warm-up step (1/16 s) sets the run: 0.5 s / (1/16 s) -> 8 calls per run
    t = R.interleaved_group(steps, reps=3, cap_seconds=100.0, min_rep_seconds=0.5, clock=clock)
    assert t.number == 8 and t.reps == 3
    assert t.times["c"] == [1 / 16] * 3 and t.times["a"] == [1 / 64] * 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps={}, reps=1, cap_seconds=1.0), "at least one callable"),
    (dict(steps={"a": print}, reps=0, cap_seconds=1.0), "reps must be at least 1"),
    (dict(steps={"a": print}, reps=1, cap_seconds=0.0), "cap_seconds must be positive"),
])
def test_interleaved_group_validates_arguments(kwargs, match):
    from benchmarks import _sampled_rows as R

    with pytest.raises(ValueError, match=match):
        R.interleaved_group(**kwargs)


def test_fisher_option_defaults_to_the_usual_tables_and_names_bad_kinds():
    import argparse

    from benchmarks import _sampled_rows as R

    parser = argparse.ArgumentParser()
    R.add_fisher_option(parser)
    assert parser.parse_args([]).fisher == ("empirical",)
    assert parser.parse_args(["--fisher", "empirical,sampled"]).fisher == ("empirical", "sampled")
    with pytest.raises(argparse.ArgumentTypeError, match="received 'true'"):
        R.parse_fisher("true")
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated"):
        R.parse_fisher(",")


def test_sampled_rows_pair_each_ratio_with_its_own_repetition():
    from benchmarks import _sampled_rows as R

    # empirical/plain per repetition: 2, 1, 1 -> median 1 (the ratio of the medians would be 2);
    # sampled/plain: 4, 1.5, 3 -> 3; sampled/empirical: 2, 1.5, 3 -> 2; inclusive quartiles
    v = {"times": {"plain": [1.0, 4.0, 1.0], "empirical": [2.0, 4.0, 1.0], "sampled": [4.0, 6.0, 3.0]},
         "capped": True}
    empirical, sampled = R.rows("M", 8, v)
    assert empirical[2:] == ["fimcore empirical", "1000", "2000", "1.00× [1.00–1.50]", "–", "3 (cap)"]
    assert sampled[2:] == ["fimcore sampled (K=1)", "1000", "4000", "3.00× [2.25–3.50]",
                           "2.00× [1.75–2.50]", "3 (cap)"]
    assert R.sampled_vs_empirical(v) == 2.0
    assert len(R.HEADERS) == len(sampled)


class _InProcessRunner:
    """Stands in for IsolatedRunner: runs each job in this process (no framework import per child)."""

    def __init__(self, *args, **kwargs):
        self.start_method = kwargs.get("start_method", "forkserver")

    def run(self, target, kwargs=None, *, timeout, memory=False):
        return H.IsolatedResult("ok", value=H.resolve(target)(**(kwargs or {})))


def _sampled_table(path):
    section = path.read_text().split("## Sampled-label Fisher (K = 1) beside the empirical one")[1]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| MLP")]
    assert [r[2] for r in rows] == ["fimcore empirical", "fimcore sampled (K=1)"], rows
    for cells in rows:                       # a measured ratio, 1 rep: q1 = q3 = ratio
        ratio, spread = cells[5].split(" [")
        q1, q3 = spread.rstrip("]").split("–")
        assert ratio.endswith("×") and q1 == q3 and float(q1) == pytest.approx(float(ratio[:-1]), rel=0.01), cells
    assert rows[0][6] == "–" and rows[1][6].endswith("]") and rows[1][7] == "1 |"
    return rows


@pytest.mark.parametrize("framework", ["torch", "jax", "tensorflow"])
def test_bench_sampled_rows_run_on_one_tiny_configuration(framework, tmp_path, monkeypatch):
    import importlib

    import_backend({"torch": "torch", "jax": "flax", "tensorflow": "tensorflow"}[framework])
    if framework == "jax":
        import_backend("optax")
    bench = importlib.import_module(f"benchmarks.bench_{framework}")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")                 # restored after the test
    monkeypatch.setattr(bench.H, "IsolatedRunner", _InProcessRunner)
    out = tmp_path / f"{framework}_sampled.md"
    cap = ["--cap-seconds" if framework == "torch" else "--cap", "60"]
    where = ["--output" if framework == "torch" else "--out", str(out)]
    assert bench.main(["--models", "mlp", "--batch-sizes", "4", "--reps", "1", *cap, "--fisher", "sampled",
                       *where]) == 0
    _sampled_table(out)
    text = out.read_text()
    assert "## Sampled-label Fisher (K = 1) beside the empirical one" in text
    assert "load average (1/5/15 min) at end" in text


def test_bench_torch_appends_the_sampled_rows_to_its_usual_table(tmp_path, monkeypatch):
    """``--fisher empirical,sampled``: the usual table, then the sampled-label section."""
    import_backend("torch")
    from benchmarks import bench_torch

    monkeypatch.setattr(bench_torch.H, "IsolatedRunner", _InProcessRunner)
    out = tmp_path / "torch.md"
    assert bench_torch.main(["--models", "mlp", "--batch-sizes", "4", "--methods", "fimcore", "--reps", "1",
                             "--cap-seconds", "60", "--no-memory", "--fisher", "empirical,sampled",
                             "--output", str(out)]) == 0
    text = out.read_text()
    assert (text.index("## MLP 784-512-256-10") < text.index("## Sampled-label Fisher (K = 1)")
            < text.index("## Machine and versions"))
    assert any(line.startswith("| 4 | " + bench_torch.METHOD_LABELS["fimcore"]) for line in text.splitlines())
    _sampled_table(out)
