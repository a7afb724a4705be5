"""PyTorch sampled-label ("true") Fisher Gram and output-Jacobian Gram, against float64 loops.

References written here share no code with the adapter: a per-sample loop of ``autograd.grad``
with the drawn labels (exact), and the exact Fisher Gram in 𝒥ᵀΛ𝒥 form from a per-sample,
per-output loop for the output Jacobian 𝒥 and the softmax Hessian Λ = diag(p) − ppᵀ.
"""

from __future__ import annotations

import math

import pytest

from tests.conftest import import_backend

torch = import_backend("torch")
nn = torch.nn
F = torch.nn.functional

from fimcore_adapters.torch import GramRecorder, output_jacobian_gram, per_sample_gram  # noqa: E402

B, D, C = 6, 4, 3


def mlp(C=C):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()


def data(C=C):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g, dtype=torch.float64), torch.randint(0, C, (B,), generator=g)


def params_of(model):
    return [p for p in model.parameters()]


def loop_rows(model, x, per_sample_loss, labels):
    """Row i = ∇_θ per_sample_loss(model(x_i), labels_i), one backward per sample."""
    rows = []
    for i in range(x.shape[0]):
        loss = per_sample_loss(model(x[i:i + 1]), labels[i:i + 1])
        g = torch.autograd.grad(loss, params_of(model))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def output_jacobian(model, x):
    """𝒥 of shape (B, C_out, P) by a loop over samples and outputs."""
    out = []
    for i in range(x.shape[0]):
        h = model(x[i:i + 1]).reshape(-1)
        rows = []
        for c in range(h.numel()):
            g = torch.autograd.grad(h[c], params_of(model), retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
        out.append(torch.stack(rows))
    return torch.stack(out)


def softmax_hessian(model, x):
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def sqrtm_psd(M):
    w, V = torch.linalg.eigh(M)
    w = torch.where(w < 1e-13 * w.max(), torch.zeros_like(w), w)   # Λ1 = 0: an exact zero
    return (V * w.sqrt()) @ V.T


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny steps: one torch thread avoids oversubscribing the shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- sampled Fisher
@pytest.mark.parametrize("K", [1, 3])
def test_sampled_cross_entropy_equals_loop_with_the_drawn_labels(K):
    model, (x, y) = mlp(), data()
    rec = GramRecorder(model, fisher="sampled", loss=nn.CrossEntropyLoss(), mc_samples=K, seed=3)
    with rec:
        F.cross_entropy(model(x), y).backward()
    labels = rec.sampled_labels()
    assert labels.shape == (K, B) and labels.dtype == torch.int64
    ce_sum = lambda out, t: F.cross_entropy(out, t, reduction="sum")  # noqa: E731
    want = sum(J @ J.T for J in (loop_rows(model, x, ce_sum, labels[k]) for k in range(K))) / K
    torch.testing.assert_close(rec.gram(), want, rtol=1e-12, atol=1e-14)
    # the empirical Gram of the same step is the default recorder's
    Je = loop_rows(model, x, ce_sum, y)
    torch.testing.assert_close(rec.empirical_gram(), Je @ Je.T, rtol=1e-12, atol=1e-14)


def test_sampled_leaves_the_data_label_gradient_unchanged():
    model, (x, y) = mlp(), data()
    F.cross_entropy(model(x), y).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    rec = GramRecorder(model, fisher="sampled", loss="cross_entropy", mc_samples=2, seed=0)
    with rec:
        F.cross_entropy(model(x), y).backward()
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sampled_mse_equals_loop_with_the_drawn_targets(reduction):
    model, (x, _) = mlp(C=2), data(C=2)
    y = torch.randn(B, 2, dtype=torch.float64)
    rec = GramRecorder(model, fisher="sampled", loss=nn.MSELoss(reduction=reduction),
                       loss_reduction=reduction, seed=5, keep_blocks=True)
    with rec:
        F.mse_loss(model(x), y, reduction=reduction).backward()
    yhat = rec.sampled_labels()[0]
    # per-sample loss c‖h_i − ŷ_i‖², c = 1/D (batch mean over D = 2 elements) or 1 (sum)
    c = 0.5 if reduction == "mean" else 1.0
    J = loop_rows(model, x, lambda out, t: c * ((out - t) ** 2).sum(), yhat)
    torch.testing.assert_close(rec.gram(), J @ J.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sum(rec.blocks().values()), rec.gram(), rtol=1e-12, atol=1e-14)
    # the drawn targets have the Gaussian's variance 1/(2c) around the output
    with torch.no_grad():
        resid = (yhat - model(x)) * math.sqrt(2 * c)
    assert resid.shape == (B, 2)


def test_sampled_expectation_matches_the_exact_fisher_gram():
    """E[Ĝ_ii] = tr(Λ_i Θ_ii), E[Ĝ_ij] = 0 and E[Ĝ_ij²] = ‖Λ_i^½ Θ_ij Λ_j^½‖_F² (i ≠ j).

    Tolerance: S = 150 independent single-draw Grams; each mean is compared with 5 standard
    errors of that mean (estimated from the same draws) — a 5σ band fails by chance with
    probability < 1e-5 per entry — plus 1e-12 for entries whose variance is 0.
    """
    model, (x, y) = mlp(), data()
    Jo = output_jacobian(model, x)                       # (B, C, P)
    Lam = softmax_hessian(model, x)                      # (B, C, C)
    Theta = torch.einsum("icp,jdp->icjd", Jo, Jo)        # C×C NTK blocks
    R = torch.stack([sqrtm_psd(L) for L in Lam])
    W = torch.einsum("iab,ibjc,jcd->iajd", R, Theta, R)  # Λ^½ Θ Λ^½, (B, C, B, C)
    diag_want = torch.einsum("iaia->i", W)
    sq_want = (W ** 2).sum(dim=(1, 3))
    rec = GramRecorder(model, fisher="sampled", loss="cross_entropy", seed=11)
    S = 150
    grams = []
    for _ in range(S):
        with rec:
            F.cross_entropy(model(x), y).backward()
        grams.append(rec.gram())
        model.zero_grad(set_to_none=True)
    Gs = torch.stack(grams)
    for stat, want in ((Gs, torch.diag(diag_want)), (Gs ** 2, sq_want)):
        mean, se = stat.mean(0), stat.std(0) / math.sqrt(S)
        off = ~torch.eye(B, dtype=torch.bool)
        if stat is Gs:
            assert torch.all((mean - want).abs() <= 5 * se + 1e-12)
        else:
            assert torch.all(((mean - want).abs() <= 5 * se + 1e-12)[off])


def test_sampled_mean_over_draws_has_the_exact_expected_trace():
    """tr E[Ĝ] = Σ_i tr(Λ_i Θ_ii) = tr of the weighted output-Jacobian Gram (the 𝒥ᵀΛ𝒥 form).

    K = 2000 draws in one step: the relative standard error of the mean trace, measured from the
    draws' spread on this model, is below 1 %; the bound 5 % is > 5σ.
    """
    model, (x, y) = mlp(), data()
    Jo = output_jacobian(model, x)
    Lam = softmax_hessian(model, x)
    want = float(torch.einsum("icp,icd,idp->", Jo, Lam, Jo))
    rec = GramRecorder(model, fisher="sampled", loss="cross_entropy", mc_samples=2000, seed=2)
    with rec:
        F.cross_entropy(model(x), y).backward()
    assert abs(float(torch.trace(rec.gram())) / want - 1) < 0.05


def test_per_sample_gram_reads_the_likelihood_from_loss_fn():
    model, (x, y) = mlp(), data()
    G = per_sample_gram(model, nn.CrossEntropyLoss(), x, y, fisher="sampled", seed=4)
    rec = GramRecorder(model, fisher="sampled", loss="cross_entropy", seed=4)
    with rec:
        F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(G, rec.gram(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss, match", [
    (nn.NLLLoss(), "received 'NLLLoss'"),
    (nn.BCEWithLogitsLoss(), "received 'BCEWithLogitsLoss'"),
    (nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing=0.1"),
    (None, "received loss=None"),
    ("poisson", "received 'poisson'"),
])
def test_sampled_refuses_losses_it_cannot_sample(loss, match):
    with pytest.raises(ValueError, match=match):
        GramRecorder(mlp(), fisher="sampled", loss=loss)


def test_sampled_option_errors():
    with pytest.raises(ValueError, match="fisher must be one of"):
        GramRecorder(mlp(), fisher="true")
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        GramRecorder(mlp(), fisher="sampled", loss="mse", mc_samples=0)
    with pytest.raises(ValueError, match="needs fisher='sampled'"):
        GramRecorder(mlp(), mc_samples=3)
    with pytest.raises(RuntimeError, match="fisher='empirical'"):
        rec = GramRecorder(mlp())
        rec.empirical_gram()


def test_sampled_refuses_a_non_tensor_output():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, C).double()

        def forward(self, x):
            return {"logits": self.lin(x)}

    model, (x, y) = Pair(), data()
    rec = GramRecorder(model, fisher="sampled", loss="cross_entropy")
    with pytest.raises(TypeError, match="received dict"):
        with rec:
            F.cross_entropy(model(x)["logits"], y).backward()


# ----------------------------------------------------------------------------- output Jacobian
@pytest.mark.parametrize("weighted_by", [None, "softmax"])
def test_output_jacobian_gram_equals_the_loop(weighted_by):
    model, (x, _) = mlp(), data()
    Jo = output_jacobian(model, x)                                   # (B, C, P)
    if weighted_by == "softmax":
        R = torch.stack([sqrtm_psd(L) for L in softmax_hessian(model, x)])
        Jo = torch.einsum("iab,ibp->iap", R, Jo)
    flat = Jo.reshape(B * C, -1)
    got = output_jacobian_gram(model, x, weighted_by=weighted_by)
    assert got.shape == (B * C, B * C)
    torch.testing.assert_close(got, flat @ flat.T, rtol=1e-11, atol=1e-13)


def test_output_jacobian_gram_mse_weighting_and_errors():
    model, (x, _) = mlp(), data()
    plain = output_jacobian_gram(model, x)
    torch.testing.assert_close(output_jacobian_gram(model, x, weighted_by="mse"), plain * (2 / C),
                               rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="weighted_by must be one of"):
        output_jacobian_gram(model, x, weighted_by="hinge")
    with pytest.raises(ValueError, match="at most"):
        output_jacobian_gram(nn.Linear(D, 101).double(), x)


@pytest.mark.parametrize("strategy", ["auto", "materialize", "generic"])
def test_sampled_through_conv_and_every_layer_path(strategy):
    """Convolution (materialised per-sample kernels), dense and the generic torch.func path all
    record the sampled-label backward exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 16, C)).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    rec = GramRecorder(model, fisher="sampled", loss="cross_entropy", mc_samples=2, seed=1,
                       strategy=strategy)
    with rec:
        F.cross_entropy(model(x), y).backward()
    labels = rec.sampled_labels()
    ce_sum = lambda out, t: F.cross_entropy(out, t, reduction="sum")  # noqa: E731
    want = sum(J @ J.T for J in (loop_rows(model, x, ce_sum, labels[k]) for k in range(2))) / 2
    torch.testing.assert_close(rec.gram(), want, rtol=1e-11, atol=1e-13)
    Je = loop_rows(model, x, ce_sum, y)
    torch.testing.assert_close(rec.empirical_gram(), Je @ Je.T, rtol=1e-11, atol=1e-13)
