r"""Sampled-label ("true") Fisher Gram: the options and formulas shared by the three adapters.

The default Gram of every adapter is the *empirical* one: rows of J are gradients of the loss at
the data labels. With ``fisher="sampled"`` the rows are gradients of the loss at labels drawn from
the model's own predictive distribution, ŷ_i ~ p(· | x_i; θ):

.. math::

    \hat g_i = \mathcal J_i^\top \hat r_i,\qquad \hat r_i = \nabla_h \ell(h_i, \hat y_i),\qquad
    \mathbb E[\hat r_i \hat r_i^\top] = \Lambda_i = \nabla_h^2 \ell(h_i, \cdot),

with h_i the network output of sample i (logits, or the regression mean) and 𝒥_i = ∂h_i/∂θ.
Hence F̂ = (1/B) Σ_i ĝ_i ĝ_iᵀ is unbiased for the Fisher F = (1/B) Σ_i 𝒥_iᵀ Λ_i 𝒥_i, and the Gram
Ĝ_ij = ĝ_i·ĝ_j = r̂_iᵀ Θ_ij r̂_j (Θ_ij = 𝒥_i 𝒥_jᵀ, the C×C NTK block) has

.. math::

    \mathbb E[\hat G_{ii}] = \operatorname{tr}(\Lambda_i \Theta_{ii}),\qquad
    \mathbb E[\hat G_{ij}] = 0,\qquad
    \mathbb E[\hat G_{ij}^2] = \|\Lambda_i^{1/2}\Theta_{ij}\Lambda_j^{1/2}\|_F^2 \quad (i \ne j),

the diagonal traces and off-diagonal block norms of the loss-Hessian-weighted output-Jacobian Gram
Λ^{1/2}𝒥𝒥ᵀΛ^{1/2}, whose non-zero eigenvalues are B × those of F.

Likelihoods that can be sampled (h is the model output; reductions as in the adapters):

* ``"cross_entropy"``: softmax cross-entropy on logits h ∈ ℝ^C (class axis 1, optional further
  positions after it, each its own categorical): ŷ ~ Categorical(softmax(h)), r̂ = softmax(h) − e_ŷ,
  Λ = diag(p) − ppᵀ. With several positions per sample, the per-sample loss is their mean (the
  batch-mean convention of the adapters), so r̂ is divided by the number of positions.
* ``"mse"``: squared error c‖h − y‖² read as the negative log-likelihood of a Gaussian
  N(h, σ²I) with σ² = 1/(2c): ŷ = h + σ ε, ε ~ N(0, I), r̂ = 2c(h − ŷ), Λ = 2c I. For a
  batch-mean MSE over D output elements per sample (the frameworks' default ``mean``), c = 1/D; for
  a summed MSE, c = 1.

``mc_samples = K`` draws K labels per sample and returns the **mean of the K (B, B) Grams**,
Ĝ = (1/K) Σ_k Ĝ_k, not a (KB, KB) Gram of all K·B rows. Why: the mean keeps the (B, B) shape and
the row convention every statistic, tracker and batch-size policy expects
(1ᵀĜ1 = B² · mean_k ‖∇L̂_k‖²), and each draw is one more backward through the same exact layer
rules, whereas the K·B-row Gram needs the cross-draw products ĝ_{k,i}·ĝ_{k',j}, i.e. all K draws'
per-sample factors alive at once (K times the per-layer memory). What the mean does: its trace is
unbiased for B·tr F for every K and its variance falls as 1/K; its off-diagonal entries average
towards their expectation 0, so for K > 1 its eigenvalues are **not** an estimate of F's spectrum.
For spectral statistics of the Fisher use ``mc_samples=1`` (the non-zero eigenvalues of Ĝ/B are
those of F̂, a B-row Monte-Carlo Fisher) or the exact :func:`output_jacobian_gram` with
``weighted_by="softmax"``; raise K for traces, m_λ and the diagonal.

Cost: one more backward pass per draw through the recorded forward (no extra forward); the step's
gradient stays the data-label gradient.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FISHER_KINDS", "LIKELIHOODS", "check_fisher_options", "unsampled_loss", "WEIGHTINGS"]

FISHER_KINDS = ("empirical", "sampled")
LIKELIHOODS = ("cross_entropy", "mse")
#: loss-Hessian weightings Λ^{1/2} of the output-Jacobian Gram
WEIGHTINGS = (None, "softmax", "mse")


def check_fisher_options(fisher: Any, mc_samples: Any, seed: Any = None) -> None:
    """Validate ``fisher``, ``mc_samples`` and ``seed`` (shared by the three adapters).

    Raises:
        ValueError: ``fisher`` not in :data:`FISHER_KINDS`, ``mc_samples`` not a positive int,
            ``mc_samples`` ≠ 1 with the empirical Fisher, ``seed`` not an int or None.

    Example:
        >>> check_fisher_options("sampled", 4)
        >>> check_fisher_options("true", 1)
        Traceback (most recent call last):
        ...
        ValueError: fisher must be one of ('empirical', 'sampled'); received 'true'. Use 'sampled' for labels drawn from the model's predictive distribution, 'empirical' for the data labels
    """
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher must be one of {FISHER_KINDS}; received {fisher!r}. Use 'sampled' "
                         "for labels drawn from the model's predictive distribution, 'empirical' for "
                         "the data labels")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int; received {mc_samples!r}")
    if fisher == "empirical" and mc_samples != 1:
        raise ValueError(f"mc_samples={mc_samples} needs fisher='sampled' (the empirical Gram uses "
                         "the data labels, one set); received fisher='empirical'")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None; received {seed!r}")


def unsampled_loss(received: str) -> ValueError:
    """The error for a loss whose labels cannot be drawn from the model."""
    return ValueError(
        f"fisher='sampled' can draw labels only for softmax cross-entropy on logits and for "
        f"Gaussian regression (mean squared error); received {received}. Pass loss='cross_entropy' "
        "(model outputs logits, class axis 1) or loss='mse' if your loss is one of those, or use "
        "fisher='empirical' (data labels)")


def check_likelihood(loss: Any) -> str:
    """Return ``loss`` if it is a name in :data:`LIKELIHOODS`, else raise :func:`unsampled_loss`."""
    if loss in LIKELIHOODS:
        return loss
    raise unsampled_loss(repr(loss))
