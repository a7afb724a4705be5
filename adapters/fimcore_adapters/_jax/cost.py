"""Cost model: factored versus materialised Gram contribution of a dense or embedding layer.

For a weight applied at T positions per sample with inputs of width d_in and output cotangents of
width d_out (both exact, the cheaper wins; ``strategy`` overrides):

- factored: ``G_ij = Σ_{t,s} (a_it·a_js)(g_it·g_js)`` costs ≈ ``B²T²(d_in + d_out)`` multiply-adds;
- materialised: per-sample ``J_i = Σ_t a_itᵀ g_it`` then ``J Jᵀ``, ≈ ``B·T·d_in·d_out + B²·d_in·d_out``.

For an embedding table (V rows of width d) the factored id-equality form costs ≈ ``B²T²(d + 1)``
and the one-hot materialisation ``T·V·d + B·V·d``.
"""

from __future__ import annotations

__all__ = ["choose_dense_form", "choose_embed_form"]


def choose_dense_form(batch, positions, d_in, d_out, form="auto"):
    """``"factored"`` or ``"materialised"`` for a dense-like layer, by multiply-add count.

    factored ≈ B²T²(d_in + d_out); materialised ≈ B·T·d_in·d_out + B²·d_in·d_out.
    """
    if form in ("factored", "materialised"):
        return form
    factored = batch * batch * positions * positions * (d_in + d_out)
    materialised = batch * positions * d_in * d_out + batch * batch * d_in * d_out
    return "factored" if factored <= materialised else "materialised"


def choose_embed_form(batch, positions, num_embeddings, features, form="auto"):
    """``"factored"`` or ``"materialised"`` for an embedding lookup, by multiply-add count."""
    if form in ("factored", "materialised"):
        return form
    t, v, f = positions, num_embeddings, features
    return "factored" if batch * t * t * (f + 1) <= t * v * f + batch * v * f else "materialised"
