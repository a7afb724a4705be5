"""fimcore.policy: shared constraints and hysteresis, the three rules, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fimcore
from fimcore import stats
from fimcore.policy import (BatchSizePolicy, Constraints, NoiseScaleRule, NormTestRule, PlaneRule,
                            policy_init, policy_update)


class Fixed(NoiseScaleRule):
    """A rule proposing whatever the measurement's 'target' says (for the machinery tests)."""

    name = "fixed"

    def propose(self, state, m, batch):
        t = m.get("target")
        return state, t, f"target {t}"


def test_constraints_snap_clip_and_validate():
    c = Constraints(min_size=10, max_size=100, multiple_of=8)
    assert c.legal(33, up=True) == 40 and c.legal(33, up=False) == 32
    assert c.legal(1, up=True) == 16 and c.legal(1000, up=True) == 96
    for bad in (dict(min_size=0), dict(min_size=5, max_size=4), dict(max_growth=1.0),
                dict(lr_coupling="cubic"), dict(min_size=5, max_size=7, multiple_of=8),
                dict(patience=0)):
        with pytest.raises(ValueError):
            Constraints(**bad)
    with pytest.raises(ValueError, match="positive int batch size"):
        policy_init(Fixed(), 0, Constraints())


def test_hysteresis_needs_patience_consecutive_agreeing_measurements():
    p = BatchSizePolicy(Fixed(), 16, Constraints(patience=3, max_growth=8))
    sizes = [p.update({"target": t}) for t in (64, 64, None, 64, 64, 48, 100)]
    assert sizes == [16, 16, 16, 16, 16, 48, 48]      # the gap reset the streak; min of 64, 64, 48
    assert [(d.old, d.new) for d in p.decisions] == [(16, 48)]
    assert "3 consecutive" in p.decisions[0].reason
    # alternating evidence never moves a size that may shrink
    q = BatchSizePolicy(Fixed(), 32, Constraints(patience=2, allow_shrink=True))
    assert [q.update({"target": t}) for t in (64, 16, 64, 16, 64)] == [32] * 5


def test_growth_bounds_shrink_and_lr_coupling():
    p = BatchSizePolicy(Fixed(), 16, Constraints(patience=1, max_growth=2, lr_coupling="sqrt",
                                                 allow_shrink=True, max_shrink=4))
    assert p.update({"target": 1000}) == 32 and p.update({"target": 1000}) == 64
    assert p.lr_factor == pytest.approx(2.0)         # sqrt(64/16)
    assert p.update({"target": 2}) == 16             # one shrink step is at most ÷4
    lin = BatchSizePolicy(Fixed(), 16, Constraints(patience=1, lr_coupling="linear"))
    lin.update({"target": 24})
    assert lin.lr_factor == pytest.approx(1.5)
    grow_only = BatchSizePolicy(Fixed(), 16, Constraints(patience=1))
    assert grow_only.update({"target": 4}) == 16 and not grow_only.decisions


def _synthetic_gradients(rng, batch, mean, sigma):
    return mean + sigma * rng.standard_normal((batch, mean.size))


def test_norm_test_rule_grows_to_byrds_sample_size():
    """g_i = μ + σε in P = 400 dimensions: tr Σ̂ ≈ Pσ² and the batch mean has ‖ḡ‖² ≈ ‖μ‖² + Pσ²/B,
    so θ_max² ≈ Pσ²/(B‖ḡ‖²) and Byrd's new size B(θ_max/θ)² ≈ Pσ²/(θ²(‖μ‖² + Pσ²/B))."""
    rng = np.random.default_rng(0)
    mean, sigma, theta, batch = np.full(400, 0.05), 1.0, 0.5, 64
    trace = 400 * sigma**2
    expected = trace / (theta**2 * (mean @ mean + trace / batch))   # ≈ 221
    targets = []
    for _ in range(20):
        J = _synthetic_gradients(rng, 64, mean, sigma)
        m = {"norm_test": float(stats.norm_test(J @ J.T))}
        targets.append(NormTestRule(theta=theta).propose(None, m, 64)[1])
    assert np.median(targets) == pytest.approx(expected, rel=0.15)
    ok = {"inner_product_test": 0.1, "orthogonality_test": 3.0}
    t = NormTestRule(test="augmented", theta=0.5, nu=1.5).propose(None, ok, 10)[1]
    assert t == pytest.approx(10 * (3.0 / 1.5) ** 2)
    with pytest.raises(ValueError, match="test must be one of"):
        NormTestRule(test="t")


def test_noise_scale_rule_follows_the_smoothed_noise_scale():
    rng = np.random.default_rng(1)
    mean, sigma = np.full(200, 0.1), 1.0
    tracker = fimcore.MeasureTracker(statistics=(stats.Condition(), stats.Energy(),
                                                 stats.NoiseScale(decay=0.9)))
    policy = BatchSizePolicy(NoiseScaleRule(), 16, Constraints(patience=2, max_growth=1e6,
                                                               max_size=10**6))
    for _ in range(40):
        J = _synthetic_gradients(rng, 32, mean, sigma)
        policy.update(tracker.update(J @ J.T, lr=0.1))
    b_noise = 200 * sigma**2 / (mean @ mean)                       # tr Σ/|g|² = 100
    assert policy.batch_size == pytest.approx(b_noise, rel=0.25)
    assert policy.decisions and policy.decisions[-1].reason.startswith("noise_scale")


def test_plane_rule_grows_when_the_energy_slope_flattens_and_respects_the_c_bar_bound():
    def run(c_bar):
        p = BatchSizePolicy(PlaneRule(window=3, slope_ratio=0.5, c_bar_max=1e4), 16,
                            Constraints(patience=1))
        L, out = 0.0, []
        for k in range(12):
            L += 1.0 if k < 6 else 0.1                              # the slope drops 10×
            out.append(p.update({"L": L, "weight": 5.0, "C_bar": c_bar}))
        return out

    sizes = run(100.0)
    assert sizes[:7] == [16] * 7 and sizes[-1] > 16
    assert run(1e5) == [16] * 12                                    # C̄_K above its bound


@given(cut=st.integers(1, 15), seed=st.integers(0, 2**16))
def test_state_dict_round_trip_mid_run_continues_identically(cut, seed):
    rng = np.random.default_rng(seed)
    feed = [{"L": float(k + rng.random()), "weight": 4.0, "C_bar": 10.0, "norm_test": 2 * rng.random()}
            for k in range(16)]
    for rule in (PlaneRule(window=3), NormTestRule(theta=0.8)):
        straight = BatchSizePolicy(rule, 8, Constraints(patience=2, max_size=512))
        sizes = [straight.update(m) for m in feed]
        first = BatchSizePolicy(rule, 8, Constraints(patience=2, max_size=512))
        for m in feed[:cut]:
            first.update(m)
        resumed = BatchSizePolicy(rule, 8)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert sizes[cut:] == [resumed.update(m) for m in feed[cut:]]
        assert resumed.state_dict() == straight.state_dict()


def test_policy_checkpoint_of_another_rule_is_refused():
    a = BatchSizePolicy(NormTestRule(theta=0.8), 8)
    with pytest.raises(ValueError, match="same rule"):
        BatchSizePolicy(NormTestRule(theta=0.5), 8).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="state must come from"):
        a.load_state_dict({"format": "other"})
    with pytest.raises(TypeError, match="Rule"):
        BatchSizePolicy(object(), 8)


def test_pure_pair_matches_the_wrapper():
    rule, c = NormTestRule(theta=0.5), Constraints(patience=1)
    state = policy_init(rule, 16, c)
    state, d = policy_update(state, {"norm_test": 1.0}, rule, c)
    assert state.batch_size == 32 and d.new == 32 and math.isclose(d.lr_factor, 1.0)
