"""Grid planning/resumption and the report's interpolation, statistics and figures."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_ind

from reference_training.grid import PAPER_BATCH_SIZES, PAPER_LRS, plan_grid, run_grid
from reference_training.report import idw_grid, load_runs, make_report, spearman_table


def test_default_grid_is_the_papers_six_by_five_plus_dynamic_runs(tmp_path):
    runs = plan_grid(tmp_path, seeds=(0, 1), epochs=320)
    fixed = [r for r in runs if r.config.batch_schedule is None]
    dynamic = [r for r in runs if r.config.batch_schedule is not None]
    assert len(fixed) == 2 * 6 * 5
    assert {(r.config.batch_size, r.config.lr) for r in fixed} == {
        (b, lr) for b in PAPER_BATCH_SIZES for lr in PAPER_LRS}
    assert sorted({r.config.batch_schedule for r in dynamic}) == ["s32-to-128", "s32-to-128-MS"]
    assert len({r.out_dir for r in runs}) == len(runs)
    assert all(r.config.model == "liao-densenet" and r.config.dataset == "cifar10" for r in runs)


def test_policy_options_steer_only_the_auto_runs_of_a_grid(tmp_path):
    runs = plan_grid(tmp_path, models=("resnet20",), dataset="mnist5k", batch_sizes=(16, 64),
                     lrs=(0.1,), dynamic=("s16-to-64", "auto:norm_test@16"), policy_options="max=64")
    by = {r.out_dir.name: r.config for r in runs}
    assert by["s16-auto-norm_test_lr0.1_seed0"].policy_options == "max=64"
    assert by["s16-auto-norm_test_lr0.1_seed0"].batch_size == 16
    assert all(c.policy_options is None for name, c in by.items() if "auto" not in name)


def test_grid_skips_finished_runs_and_records_divergence(tiny_mnist_dir, tmp_path):
    runs = plan_grid(tmp_path, models=("resnet20",), dataset="mnist", batch_sizes=(16, 32),
                     lrs=(1e30,), dynamic=(), seeds=(0,), data_dir=str(tiny_mnist_dir),
                     epochs=1, measure_every=1, width=4)
    # pretend the first run finished earlier: it must not be run again
    runs[0].out_dir.mkdir(parents=True)
    (runs[0].out_dir / "summary.json").write_text(json.dumps({"finished": True}))
    logged = []
    counts = run_grid(runs, threads=1, log=logged.append)
    assert counts == {"planned": 2, "skipped": 1, "done": 1, "failed": 0, "diverged": 1}
    summary = json.loads((runs[1].out_dir / "summary.json").read_text())
    assert summary["diverged"] is True
    assert run_grid(runs, log=logged.append)["skipped"] == 2


def _idw_reference(points, values, node, k, weights):
    d = [math.dist(node, p) for p in points]
    order = sorted(range(len(points)), key=lambda i: d[i])[:k]
    if d[order[0]] == 0:
        return values[order[0]]
    inv = [1 / d[i] for i in order]
    if weights == "released":
        w = [(v + 1) / (1 + sum(inv)) for v in inv]
    else:
        w = [(v + 1) / sum(u + 1 for u in inv) for v in inv]
    return sum(wi * values[i] for wi, i in zip(w, order))


@pytest.mark.parametrize("weights", ["normalised", "released"])
def test_idw_grid_matches_a_plain_loop(weights):
    rng = np.random.default_rng(0)
    pts = rng.random((9, 2))
    pts[0] = (0.5, 0.5)  # lies exactly on a node of the 51 × 51 grid
    vals = rng.random(9)
    gx, gy, z = idw_grid(pts, vals, size=51, k=5, weights=weights)
    assert z.shape == (51, 51)
    for i, j in [(0, 0), (25, 25), (10, 40), (50, 3), (37, 12)]:
        want = _idw_reference(pts.tolist(), vals.tolist(), (gx[j], gy[i]), 5, weights)
        assert z[i, j] == pytest.approx(want, rel=1e-12)
    assert z[25, 25] == vals[0]
    if weights == "normalised":
        assert vals.min() - 1e-12 <= z.min() and z.max() <= vals.max() + 1e-12


def _fake_run(root, label, lr, seed, batch_sizes, c_bar, L, err, wall, diverged=False):
    d = root / f"{label}_lr{lr}_seed{seed}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"lr": lr, "seed": seed}))
    iters = 10
    lines = []
    for e in range(2):
        for n in (0, 5):
            frac = (e * 2 + n / 5 + 1) / 4
            lines.append({"type": "measure", "k": len(lines) + 1, "iteration": e * iters + n,
                          "epoch": e, "lr": lr, "batch_size": batch_sizes[0], "weight": 5,
                          "c_k": c_bar, "c_k_jacobian": math.sqrt(c_bar), "I_k": L / 20,
                          "trace": 1.0, "C_bar": c_bar, "C_bar_jacobian": math.sqrt(c_bar),
                          "L": L * frac, "grad_norm": 1.0, "lambda_max": 1.0, "rank": 2})
        lines.append({"type": "epoch", "epoch": e, "iterations": (e + 1) * iters,
                      "test_error": err, "train_error": err})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {"finished": True, "diverged": diverged, "label": label, "model": "resnet20",
               "dataset": "mnist5k", "lr": lr, "seed": seed, "batch_sizes": batch_sizes,
               "epochs": 2, "epochs_planned": 2, "C_bar": c_bar, "C_bar_jacobian": math.sqrt(c_bar),
               "L": L, "test_error": None if diverged else err,
               "train_error": None if diverged else err, "wall_time_s": wall}
    (d / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def fake_grid(tmp_path):
    root = tmp_path / "grid"
    for lr in (0.025, 0.05, 0.1, 0.2):
        for b in (16, 32, 64, 128):
            # by construction: C̄_K grows with b only, L_K ∝ lr · b^-1.5
            _fake_run(root, f"s{b}", lr, 0, [b], c_bar=10.0 * b, L=lr * b ** -1.5 * 100,
                      err=0.01 + 0.001 * b / lr / 100, wall=100.0 / b)
    _fake_run(root, "s16", 0.2, 1, [16], c_bar=1.0, L=1.0, err=0.5, wall=1.0, diverged=True)
    for seed, (e_fix, e_dyn, t_fix, t_dyn) in enumerate(
            [(0.020, 0.024, 10.0, 7.0), (0.022, 0.025, 11.0, 7.5), (0.021, 0.027, 10.5, 7.2)]):
        _fake_run(root, "s16", 0.1, seed + 10, [16], 160.0, 0.1 * 16 ** -1.5 * 100, e_fix, t_fix)
        _fake_run(root, "s16-to-128", 0.1, seed + 10, [16, 32, 64, 128], 500.0, 1.0, e_dyn, t_dyn)
    return root


def test_spearman_table_recovers_constructed_monotonicity(fake_grid):
    runs = load_runs(fake_grid)
    rows = {(r["measure"], r["hyper"]): r for r in spearman_table(runs)}
    assert rows[("C_bar", "batch")]["within_mean_rho"] == pytest.approx(1.0)
    assert rows[("L", "batch")]["within_mean_rho"] == pytest.approx(-1.0)
    assert rows[("L", "lr")]["within_mean_rho"] == pytest.approx(1.0)
    # the diverged run and the dynamic runs are excluded; the three extra s16 runs count
    assert rows[("C_bar", "batch")]["n"] == 16 + 3


def test_report_writes_figures_and_table_with_welch_p_values(fake_grid, tmp_path):
    out = make_report(fake_grid, tmp_path / "rep", title="Test report")
    md = (out / "report.md").read_text()
    for png in out.glob("*.png"):
        assert png.stat().st_size > 10_000
    assert len(list(out.glob("plane_*.png"))) == 1 and len(list(out.glob("trajectories_*.png"))) == 1
    assert "| s16-to-128 | 0.1 | 3 |" in md
    # s16 at LR 0.1 has the grid's seed 0 besides the three repeats, so n_B = 4
    assert "| s16-to-128 | s16 | 0.1 | 3 | 4 | " in md
    p4 = ttest_ind([0.024, 0.025, 0.027],
                   [0.020, 0.022, 0.021, 0.01 + 0.001 * 16 / 0.1 / 100], equal_var=False).pvalue
    assert f"{p4:.3g}" in md
    assert "MNIST-5k" in md and "not the paper's" in md


def test_report_without_runs_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished run"):
        make_report(tmp_path)


def test_demo_prints_both_runs_side_by_side_and_writes_figures(tmp_path, capsys, one_thread):
    from reference_training.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "5", "--subset", "48", "--width", "4",
                 "--measure-every", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "MNIST-5k" in text and "not the paper's" in text
    header = next(line for line in text.splitlines() if "s16-to-64" in line and "s64" in line)
    assert header.index("s64") < header.index("s16-to-64")
    for row in ("C̄_K", "L_K", "test error", "wall time"):
        assert any(line.startswith(row) for line in text.splitlines()), row
    assert (out / "report" / "report.md").is_file()
    assert len(list((out / "report").glob("*.png"))) == 2
    s = json.loads((out / "s16-to-64" / "summary.json").read_text())
    assert s["batch_sizes"] == [16, 23, 32, 45, 64] and s["lr"] == 0.05


def test_trajectory_ceiling_drawn_only_for_runs_with_limited_steps(tmp_path):
    from reference_training.report import Run, _measure_x

    epochs = [{"type": "epoch", "epoch": 0, "iterations": 4}]
    measures = [{"type": "measure", "epoch": 0, "iteration": i, "C_bar": 10.0, "L": 1.0 + i,
                 "c_limit": limit, "resolution_limited": limited}
                for i, (limit, limited) in enumerate([(100.0, False), (20.0, True), (None, False),
                                                      (60.0, False)])]
    run = Run(tmp_path, {}, {"label": "s4", "lr": 0.1, "batch_sizes": [4]}, measures, epochs)
    x, cbar, L, ceiling = _measure_x(run)
    np.testing.assert_allclose(x, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(ceiling, [100.0, 60.0, 60.0, 60.0])  # running mean of known limits
    for m in measures:
        m["resolution_limited"] = False
    assert _measure_x(run)[3] is None
    for m in measures:  # records of the previous release carry no limit fields
        m.pop("c_limit"), m.pop("resolution_limited")
    assert _measure_x(run)[3] is None
