"""Hypothesis strategies for per-sample gradient matrices and Gram matrices.

Everything is generated as float64 NumPy arrays (the reference side of every test); tests
convert to the backend under test with ``xp.asarray``. Random draws go through a NumPy
generator seeded by Hypothesis, so examples shrink on shape, kind and scale while the
entries stay well spread (element-wise float strategies produce degenerate matrices that
test Hypothesis more than the code).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import strategies as st

__all__ = ["JCase", "SPDCase", "j_matrices", "orthogonal", "spd_with_spectrum"]

J_KINDS = ("generic", "rank_deficient", "duplicated_rows", "row_scales")


class JCase(NamedTuple):
    """A per-sample gradient matrix and how it was built."""

    J: np.ndarray
    kind: str
    scale: float


class SPDCase(NamedTuple):
    """A symmetric positive semi-definite matrix with its exact spectrum (ascending)."""

    G: np.ndarray
    eigs: np.ndarray


seeds = st.integers(min_value=0, max_value=2**32 - 1)

#: sizes drawn for B and P: few distinct shapes keep JAX's per-shape compilation cheap,
#: while covering B = 1, P = 1, wide (P > B) and tall (B > P) matrices
ROWS = (1, 2, 5, 8)
COLS = (1, 3, 12)


@st.composite
def j_matrices(
    draw: st.DrawFn,
    *,
    rows: tuple[int, ...] = ROWS,
    cols: tuple[int, ...] = COLS,
    min_exponent: int = -6,
    max_exponent: int = 6,
    kinds: tuple[str, ...] = J_KINDS,
) -> JCase:
    """(B, P) matrices: wide and tall, rank-deficient, duplicated rows, 1e-6..1e6 scales.

    Kinds: ``generic`` Gaussian; ``rank_deficient`` a product of (B, r)(r, P) with
    r < min(B, P); ``duplicated_rows`` some rows copied onto others; ``row_scales`` rows of
    magnitudes spread over up to two decades. The whole matrix is then scaled by 10**e.
    """
    rows = draw(st.sampled_from(rows), label="B")
    cols = draw(st.sampled_from(cols), label="P")
    kind = draw(st.sampled_from(kinds), label="kind")
    exponent = draw(st.integers(min_exponent, max_exponent), label="exponent")
    rng = np.random.default_rng(draw(seeds, label="seed"))
    J = rng.standard_normal((rows, cols))
    if kind == "rank_deficient" and min(rows, cols) > 1:
        rank = draw(st.integers(1, min(rows, cols) - 1), label="rank")
        J = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
    elif kind == "duplicated_rows" and rows > 1:
        sources = rng.integers(0, rows, size=rows)
        keep = rng.random(rows) < 0.5
        J = np.where(keep[:, None], J, J[sources])
    elif kind == "row_scales":
        J = J * 10.0 ** rng.uniform(-1.0, 1.0, size=(rows, 1))
    scale = 10.0**exponent
    return JCase(J * scale, kind, scale)


def orthogonal(rng: np.random.Generator, size: int) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    return q * np.sign(np.diag(r))


@st.composite
def spd_with_spectrum(
    draw: st.DrawFn,
    *,
    sizes: tuple[int, ...] = ROWS,
    max_log10_condition: float = 6.0,
    allow_zeros: bool = True,
) -> SPDCase:
    """G = Q diag(λ) Qᵀ with a random orthogonal Q and a known spectrum λ.

    The non-zero eigenvalues span at most ``10**max_log10_condition``; with
    ``allow_zeros`` some eigenvalues are exactly 0 (G is then only semi-definite), at
    least one is non-zero. The overall scale varies over 1e-6..1e6.
    """
    size = draw(st.sampled_from(sizes), label="B")
    rng = np.random.default_rng(draw(seeds, label="seed"))
    log_cond = draw(st.floats(0.0, max_log10_condition), label="log10 condition")
    logs = rng.uniform(-log_cond, 0.0, size=size)
    logs[rng.integers(size)] = 0.0
    if size > 1 and log_cond > 0:
        logs[np.argmin(logs)] = -log_cond
    eigs = 10.0**logs
    if allow_zeros and size > 1:
        zeros = draw(st.integers(0, size - 1), label="zeros")
        eigs[np.argsort(eigs)[:zeros]] = 0.0
    eigs = eigs * 10.0 ** draw(st.integers(-6, 6), label="exponent")
    q = orthogonal(rng, size)
    G = (q * eigs) @ q.T
    G = (G + G.T) / 2
    return SPDCase(G, np.sort(eigs))
