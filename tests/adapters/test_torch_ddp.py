"""GramRecorder under torch DDP: 2- and 4-process gloo runs against a float64 per-sample loop.

Each world size is spawned once (process start-up dominates) and runs every case inside; the
ranks save their Grams and gradients to files, which the test compares with references computed
here by a per-sample loop (one autograd call per sample) that shares no code with the recorder.
Row convention under test (see ``_torch/distributed.py``): row i of rank r is
``N/(W·B_r)·∇ℓ_i`` for a mean loss, ``∇ℓ_i/W`` for a sum, where ``ℓ_i`` is taken from the
rank's own batch forward (per-rank BatchNorm couples a sample with its own rank's samples only).
"""

from __future__ import annotations

import pytest

from tests.conftest import import_backend

torch = import_backend("torch")
F = torch.nn.functional
nn = torch.nn

from tests.adapters._ddp_worker import CASES, _loss, _spawn, make_data, make_model  # noqa: E402
from tests.adapters._torch_reference import contribution_gram, loop_gram  # noqa: E402


# ---------------------------------------------------------------------------------- references
def reference_rows(kind, sizes, red, seed):
    """Per-rank references: (N, P) rows of the global J, each rank's local J, the DDP gradient.

    Rank r's rows are the per-sample contributions of its own batch backward
    (BatchNorm model: ``contribution_gram``, one autograd call per module and sample with the
    cotangent masked to the sample; otherwise ``loop_gram``, one forward and backward per sample,
    ``∇ℓ_i/B_r`` for a mean loss), scaled
    by N/W (mean) or 1/W (sum); the local J is scaled by B_r (mean) or 1 (sum).
    """
    model = make_model(kind)
    x, y = make_data(kind, sum(sizes), seed)
    W, N = len(sizes), sum(sizes)
    rows, locals_, grad = [], [], 0.0
    lo = 0
    for B in sizes:
        xb, yb = x[lo:lo + B], y[lo:lo + B]
        lo += B
        if kind == "bn":          # couples samples: contributions of the rank's batch backward
            _, C = contribution_gram(model, lambda o, t: _loss(o, t, red), xb, yb, scale=1.0)
        else:                     # independent samples: one forward and backward per sample
            _, C = loop_gram(model, lambda o, t: _loss(o, t, "sum"), xb, yb)
            C = C / B if red == "mean" else C
        rows.append(C * ((N / W) if red == "mean" else 1.0 / W))
        locals_.append(C * (B if red == "mean" else 1.0))
        grad = grad + C.sum(0) / W
    return torch.cat(rows), locals_, grad


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------- tests
_RUNS: dict = {}      # one spawn per world size for the whole module


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def world_results(request):
    w = request.param
    if w not in _RUNS:
        _RUNS[w] = _spawn(w, die=w == 2)
    return w, _RUNS[w]


def test_global_gram_equals_concatenated_batch_per_sample_loop(world_results):
    world, res = world_results
    for name, (kind, sizes, red, scope, _) in CASES.items():
        if world not in sizes or CASES[name][3] == "local":
            continue
        sizes = sizes[world]
        J, _, grad = reference_rows(kind, sizes, red, seed=len(name))
        G_ref = J @ J.T
        for r in range(world):
            G = res[r][name]["G"]
            assert G.shape == (sum(sizes), sum(sizes)), (name, G.shape)
            assert _rel(G, G_ref) <= 1e-12, (name, r, _rel(G, G_ref))
        # the report's per-layer shares of Tr G add up to it
        assert abs(res[0][name]["trace_sum"] - float(G_ref.trace())) <= 1e-12 * float(G_ref.trace()), name
        if name == "plain_module":      # no DDP: .grad is the rank's own, not averaged
            continue
        # the invariant with the DDP gradient: 1ᵀG1 = N²‖∇L‖² (mean), ‖∇L‖² (sum)
        N = sum(sizes)
        g = _flat(res[0][name]["grads"])
        scale = N ** 2 if red == "mean" else 1.0
        assert abs(float(G_ref.sum()) - scale * float(g @ g)) <= 1e-10 * scale * float(g @ g), name


def test_equal_batches_give_the_single_process_gram_of_the_concatenated_batch(world_results):
    """For equal local batches (mean) the rows are ∇ℓ_i themselves: one process, whole batch."""
    world, res = world_results
    kind, sizes, *_ = CASES["mlp"]
    sizes = sizes[world]
    model = make_model(kind)
    x, y = make_data(kind, sum(sizes), seed=len("mlp"))
    rows = []
    for i in range(sum(sizes)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(_flat([p.grad for p in model.parameters()]))
    J = torch.stack(rows)
    assert _rel(res[world - 1]["mlp"]["G"], J @ J.T) <= 1e-12


def test_gradient_equals_plain_ddp_and_the_averaged_reference(world_results):
    world, res = world_results
    for name, (kind, sizes, red, scope, _) in CASES.items():
        if world not in sizes:
            continue
        _, _, grad = reference_rows(kind, sizes[world], red, seed=len(name))
        for r in range(world):
            got, plain = _flat(res[r][name]["grads"]), _flat(res[r][name]["plain_grads"])
            if name == "plain_module":            # no DDP: the rank's own gradient
                _, locals_, _ = reference_rows(kind, sizes[world], red, seed=len(name))
                assert _rel(got, locals_[r].sum(0) / sizes[world][r]) <= 1e-12, r
                continue
            assert _rel(got, plain) <= 1e-13, (name, r)
            assert _rel(got, grad) <= 1e-12, (name, r)


def test_per_rank_batchnorm_blocks_sum_to_g_and_rows_couple_within_a_rank(world_results):
    world, res = world_results
    G = res[0]["bn"]["G"]
    blocks = res[0]["bn"]["blocks"]
    total = sum(blocks.values())
    assert _rel(total, G) <= 1e-13
    assert set(blocks) == {"0", "1", "3", "5"}
    # the rows are those of per-rank statistics (checked against the loop above); one
    # BatchNorm over the whole global batch would give a different Gram
    sizes = CASES["bn"][1][world]
    J_whole, _, _ = reference_rows("bn", [sum(sizes)], "mean", seed=len("bn"))
    assert _rel(G, J_whole @ J_whole.T) > 1e-3

def test_local_scope_is_each_ranks_own_gram(world_results):
    world, res = world_results
    kind, sizes, *_ = CASES["local"]
    sizes = sizes[world]
    _, locals_, _ = reference_rows(kind, sizes, "mean", seed=len("local"))
    for r in range(world):
        G = res[r]["local"]["G"]
        assert res[r]["local"]["scope"] == "local" and res[r]["local"]["report"] is None
        assert _rel(G, locals_[r] @ locals_[r].T) <= 1e-12, r


@pytest.mark.parametrize("world_results", [2], indirect=True, ids=["world2"])
def test_default_scope_under_ddp_is_global_and_report_counts_bytes(world_results):
    world, res = world_results
    case = res[0]["default"]
    assert case["scope"] == "global" and case["G"].shape == (6, 6)
    comm = case["report"]
    assert comm["world_size"] == 2 and comm["sizes"] == [3, 3] and comm["synced"]
    # MLP 5-6-3 on the factored path: inputs (3, 1, 5) + output gradients (3, 1, 6) in float64,
    # then (3, 1, 6) + (3, 1, 3)
    assert comm["layers"]["0"] == {"form": "factors", "bytes": 3 * (5 + 6) * 8,
                                   "rows_bytes": 3 * (5 * 6 + 6) * 8, "factor_bytes": 3 * 11 * 8}
    assert comm["layers"]["2"]["bytes"] == 3 * (6 + 3) * 8
    assert comm["bytes"] == 3 * (11 + 9) * 8
    assert case["gathered"] == {"0": "factors", "2": "factors"}
    # the conv layers of the BN model gather rows, its BatchNorm its affine rows
    g = res[0]["bn"]["gathered"]
    assert g["0"] == "rows" and g["1"] == "rows" and g["5"] == "factors"
    assert res[0]["bn_factored"]["gathered"]["0"] == "mixed"   # conv factors + bias rows


def test_no_sync_micro_batch_gets_its_global_gram_and_ddp_gradients(world_results):
    world, res = world_results
    n = 3 * world
    model = make_model("mlp")
    x, y = make_data("mlp", 2 * n, seed=99)
    for k, key in ((0, "G0"), (1, "G1")):
        rows = []
        for i in range(k * n, (k + 1) * n):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            rows.append(_flat([p.grad for p in model.parameters()]))
        J = torch.stack(rows)
        for r in range(world):
            assert _rel(res[r]["no_sync"][key], J @ J.T) <= 1e-12, (key, r)
    for r in range(world):
        d = res[r]["no_sync"]
        assert d["synced0"] is False and d["synced1"] is True
        assert _rel(_flat(d["mid"]), _flat(d["plain_mid"])) <= 1e-13
        assert _rel(_flat(d["end"]), _flat(d["plain_end"])) <= 1e-13
    # under no_sync the ranks' gradients differ (not all-reduced)
    assert not torch.allclose(_flat(res[0]["no_sync"]["mid"]), _flat(res[1]["no_sync"]["mid"]))


def test_sampled_fisher_is_refused_under_global_scope(world_results):
    world, res = world_results
    assert "fisher='sampled' is not supported with scope='global'" in res[0]["sampled"]


def test_mean_over_ranks(world_results):
    world, res = world_results
    want = {"a": 1.0, "b": float(world - 1)}
    for r in range(world):
        assert res[r]["mean"] == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("world_results", [2], indirect=True, ids=["world2"])
def test_a_rank_that_stopped_makes_the_others_fail_with_a_clear_error_not_hang(world_results):
    """The 2-process run ends with rank 1 exiting just before a measured step (the recorder has
    timeout=5): rank 0 raises at its first Gram collective, naming the dedicated group."""
    world, res = world_results
    err = res[0]["error"]
    assert err is not None and "dedicated process group" in err, err
    assert res[0]["seconds"] < 60


def test_mean_over_ranks_is_the_identity_without_distributed():
    from fimcore_adapters.torch import mean_over_ranks

    assert mean_over_ranks({"c_k": 3.5, "I_k": 2}) == {"I_k": 2.0, "c_k": 3.5}
    with pytest.raises(ValueError, match="real numbers"):
        mean_over_ranks({"c_k": "x"})


def test_global_scope_without_distributed_is_refused():
    from fimcore_adapters.torch import GramRecorder

    with pytest.raises(ValueError, match="needs torch.distributed initialised"):
        GramRecorder(nn.Linear(2, 2), scope="global")
    with pytest.raises(ValueError, match="scope must be one of"):
        GramRecorder(nn.Linear(2, 2), scope="world")
    with pytest.raises(ValueError, match="process_group is used by scope='global' only"):
        GramRecorder(nn.Linear(2, 2), scope="local", process_group=object())
    with pytest.raises(ValueError, match="timeout must be None or a positive number"):
        GramRecorder(nn.Linear(2, 2), timeout=-1)
