"""fimcore.mbf: options, partition, update rules and the Gram view against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fimcore import mbf


def test_defaults_are_the_papers_cnn_settings():
    o = mbf.MBFOptions(lr=1e-4)
    assert (o.damping, o.momentum, o.curvature_decay, o.curvature_every, o.inverse_every,
            o.curvature, o.average_above, o.eps) == (0.003, 0.9, 0.9, 10, 100, "minibatch_outer",
                                                      2 ** 24, 1e-8)


@pytest.mark.parametrize("kw, match", [
    (dict(damping=0), r"damping must be a finite number > 0; received 0"),
    (dict(damping=math.nan), r"damping must be a finite number > 0; received nan"),
    (dict(lr=-1.0), r"lr must be a finite number >= 0; received -1.0"),
    (dict(curvature_decay=1.0), r"curvature_decay must be a finite number >= 0 and < 1; received 1.0"),
    (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0; received -0.1"),
    (dict(curvature_every=0), r"curvature_every must be a positive int; received 0"),
    (dict(inverse_every=2.5), r"inverse_every must be a positive int; received 2.5"),
    (dict(curvature_every=20, inverse_every=10), r"inverse_every must be >= curvature_every"),
    (dict(curvature="exact"), r"curvature must be one of \('minibatch_outer', 'per_sample', "
                              r"'sampled_labels'\); received 'exact'"),
    (dict(average_above=-1), r"average_above must be a number >= 0"),
    (dict(eps=0.0), r"eps must be a finite number > 0"),
    (dict(conv_average=1), r"conv_average must be a bool"),
])
def test_options_out_of_range_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        mbf.MBFOptions(**{"lr": 0.1, **kw})


def test_partition_counts_and_the_averaging_threshold():
    d = mbf.dense_layout(10, 64, has_bias=True, average_above=2 ** 24)      # ResNet-32 head
    assert (d.kind, d.block_size, d.num_blocks, d.stored_entries) == ("dense", 65, 10, 10 * 65 ** 2)
    big = mbf.dense_layout(4096, 4096, has_bias=True, average_above=2 ** 24)
    assert big.kind == "dense_averaged" and big.stored_entries == 4097 ** 2
    assert mbf.dense_layout(3, 4, has_bias=False, average_above=47).kind == "dense_averaged"
    assert mbf.dense_layout(3, 4, has_bias=False, average_above=48).kind == "dense"
    c = mbf.conv_layout(16, 1, (3, 3))                                    # depthwise, 16 channels
    assert (c.block_size, c.num_blocks, c.stored_entries) == (9, 16, 16 * 81)
    assert mbf.conv_layout(8, 4, (5, 5), conv_average=True).stored_entries == 625
    assert mbf.diagonal_layout(7, kind="conv_bias").block_size == 1


def test_schedule():
    assert [t for t in range(25) if mbf.is_curvature_step(t, 10)] == [0, 10, 20]
    assert [t for t in range(250) if mbf.is_inverse_step(t, 100)] == [0, 100, 200]


def test_update_rules_in_every_namespace(xp):
    rows = xp.asarray([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    ob = mbf.outer_blocks(rows)
    ref = np.array([[[1, -2, .5], [-2, 4, -1], [.5, -1, .25]], [[0, 0, 0], [0, 9, 3], [0, 3, 1]]])
    np.testing.assert_allclose(np.asarray(ob), ref)
    np.testing.assert_allclose(np.asarray(mbf.averaged_outer(rows)), ref.mean(0))
    np.testing.assert_allclose(np.asarray(mbf.ema(ob, ob * 3.0, 0.75)), ref * 1.5)


def _blocks_of(J, sizes):
    out, k = [], 0
    for s in sizes:
        out.append(J[:, k:k + s])
        k += s
    return out


def test_output_step_matrix_equals_the_parameter_space_step():
    rng = np.random.default_rng(0)
    n, sizes, lam = 5, (3, 1, 4, 2), 0.07
    J = rng.normal(size=(n, sum(sizes)))
    Js = _blocks_of(J, sizes)
    # parameter space: Δθ = −η blockdiag(J_jᵀJ_j/n + λI)⁻¹ Jᵀ r / n, Δu = J Δθ
    H = np.zeros((sum(sizes), sum(sizes)))
    k = 0
    for Jj, s in zip(Js, sizes):
        H[k:k + s, k:k + s] = np.linalg.inv(Jj.T @ Jj / n + lam * np.eye(s))
        k += s
    r = rng.normal(size=n)
    du_param = -J @ H @ J.T @ r / n
    S = mbf.output_step_matrix([Jj @ Jj.T for Jj in Js], n=n, damping=lam)
    np.testing.assert_allclose(-S @ r, du_param, rtol=1e-12, atol=1e-14)


def test_output_step_matrix_spectrum_and_small_damping_limit():
    rng = np.random.default_rng(1)
    n = 4
    grams = []
    for s in (6, 5, 7):                      # block sizes ≥ n: every G_j positive definite
        Jj = rng.normal(size=(n, s))
        grams.append(Jj @ Jj.T)
    for lam in (10.0, 1.0, 1e-2):
        ev = np.linalg.eigvals(mbf.output_step_matrix(grams, n=n, damping=lam)).real
        assert ev.min() >= -1e-12 and ev.max() <= 3 + 1e-12
    np.testing.assert_allclose(mbf.output_step_matrix(grams, n=n, damping=1e-10), 3 * np.eye(n), atol=1e-7)
    with pytest.raises(ValueError, match=r"every mini-block Gram must be \(4, 4\); block 1 has shape \(3, 3\)"):
        mbf.output_step_matrix([grams[0], np.eye(3)], n=4, damping=1.0)
