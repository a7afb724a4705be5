r"""``mbf``: the Mini-Block Fisher method as an ``optax.GradientTransformationExtraArgs``.

Bahamou, Goldfarb & Ren, AISTATS 2023 (arXiv 2202.04124); algorithm, partition and defaults in
:mod:`fimcore.mbf`. The partition is read from the parameter pytree (Flax ``linen`` layout): a
dict holding a 2-D ``kernel`` (d_in, d_out) is a dense layer (blocks are the rows of
``[kernelᵀ | bias]``, one per output neuron); a dict holding a ≥3-D ``kernel``
(*spatial, c_in/groups, c_out) is a convolution (one κ-block per (output, input-within-group)
pair, :math:`w_{o,i} = \operatorname{vec} K[..., i, o]` in row-major spatial order, the same
element order as PyTorch's ``W[o, i]``), its ``bias`` getting size-1 blocks; every other leaf is
preconditioned Adam-like. Pure ``init``/``update`` over :class:`MBFState`, jit-safe: the refresh
and the Cholesky factorisation run under ``lax.cond`` on the step counter, and a step with a
non-finite gradient, curvature estimate or direction returns zero updates, leaves the state
unchanged and increments ``state.skipped`` (no parameter ever becomes NaN).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.scipy.linalg import cho_solve

from fimcore.mbf import MBFOptions, conv_layout, dense_layout, diagonal_layout

__all__ = ["MBFState", "MBFTransformation", "mbf", "mbf_partition"]


class MBFState(NamedTuple):
    """``count`` (iterations done), ``skipped`` (non-finite steps), and per unit: ``momentum``
    μ in block-row layout, ``curvature`` F̄ (or v), ``factor`` (Cholesky factor of F̄+λI, or
    F̄_b+λ for convolution biases, or an unused 0 for Adam-like leaves)."""

    count: jax.Array
    skipped: jax.Array
    momentum: tuple
    curvature: tuple
    factor: tuple


class _Unit(NamedTuple):
    name: str
    kind: str
    kernel: int | None      # leaf index
    bias: int | None        # leaf index
    block_size: int
    num_blocks: int
    stored_entries: int


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def mbf_partition(params, *, average_above: float = 2 ** 24, conv_average: bool = False) -> list[_Unit]:
    """The units of a parameter pytree (see the module docstring); raises if none is a layer.

    Raises:
        ValueError: no dict in ``params`` holds a 2-D or higher ``kernel``.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [tuple(_key(k) for k in p) for p, _ in flat]
    index = {p: i for i, p in enumerate(paths)}
    units, claimed = [], set()
    for i, (p, leaf) in enumerate(zip(paths, (l for _, l in flat))):
        if p[-1] != "kernel" or jnp.ndim(leaf) < 2:
            continue
        b = index.get(p[:-1] + ("bias",))
        if b is not None and jnp.shape(flat[b][1]) != (jnp.shape(leaf)[-1],):
            b = None
        name = "/".join(p[:-1]) or "<root>"
        shape = jnp.shape(leaf)
        if len(shape) == 2:
            lay = dense_layout(shape[1], shape[0], has_bias=b is not None, average_above=average_above)
            units.append(_Unit(name, lay.kind, i, b, lay.block_size, lay.num_blocks, lay.stored_entries))
            claimed.update(j for j in (i, b) if j is not None)
        else:
            lay = conv_layout(shape[-1], shape[-2], shape[:-2], conv_average=conv_average)
            units.append(_Unit(name, lay.kind, i, None, lay.block_size, lay.num_blocks, lay.stored_entries))
            claimed.add(i)
            if b is not None:
                n = shape[-1]
                units.append(_Unit(name + "/bias", "conv_bias", None, b, 1, n, n))
                claimed.add(b)
    if not units:
        raise ValueError(
            "mbf needs at least one dense or convolution layer, i.e. a dict with a 2-D (Dense) or "
            ">=3-D (Conv, spatial..., c_in, c_out) 'kernel' leaf; received a pytree with leaves "
            f"{['/'.join(p) for p in paths][:8]}. Use optax.adam for such parameters.")
    for i, p in enumerate(paths):
        if i not in claimed:
            n = int(math.prod(jnp.shape(flat[i][1])))
            units.append(_Unit("/".join(p), "diagonal", None, i, 1, n, n))
    return units


# ---------------------------------------------------------------------------- layouts


def _rows(u: _Unit, leaves, lead: int = 0):
    """Block rows of unit ``u`` from leaves (with ``lead`` leading batch axes)."""
    if u.kind in ("dense", "dense_averaged"):
        k = jnp.swapaxes(leaves[u.kernel], -1, -2)                 # (..., d_out, d_in)
        if u.bias is None:
            return k
        return jnp.concatenate([k, leaves[u.bias][..., None]], -1)
    if u.kind in ("conv", "conv_averaged"):
        k = leaves[u.kernel]
        nd = k.ndim - lead
        perm = tuple(range(lead)) + (lead + nd - 1, lead + nd - 2) + tuple(range(lead, lead + nd - 2))
        k = jnp.transpose(k, perm)                                 # (..., O, I, *spatial)
        return k.reshape(k.shape[:lead + 2] + (-1,))
    return leaves[u.bias]


def _unrows(u: _Unit, rows, leaves) -> dict[int, Any]:
    if u.kind in ("dense", "dense_averaged"):
        out = {u.kernel: jnp.swapaxes(rows[:, :leaves[u.kernel].shape[0]], 0, 1)}
        if u.bias is not None:
            out[u.bias] = rows[:, -1]
        return out
    if u.kind in ("conv", "conv_averaged"):
        shape = leaves[u.kernel].shape                             # (*spatial, I, O)
        k = rows.reshape((shape[-1], shape[-2]) + shape[:-2])
        nd = len(shape)
        return {u.kernel: jnp.transpose(k, tuple(range(2, nd)) + (1, 0))}
    return {u.bias: rows}


def _estimate(u: _Unit, rows, per_sample_rows=None):
    if per_sample_rows is not None and u.kind != "diagonal":
        r = per_sample_rows
        m = r.shape[0]
        if u.kind in ("dense", "conv"):
            return jnp.einsum("n...i,n...j->...ij", r, r) / m
        if u.kind == "conv_bias":
            return jnp.mean(r * r, 0)
        flat = r.reshape(-1, r.shape[-1])
        return flat.T @ flat / flat.shape[0]
    if u.kind in ("dense", "conv"):
        return rows[..., :, None] * rows[..., None, :]
    if u.kind in ("dense_averaged", "conv_averaged"):
        flat = rows.reshape(-1, rows.shape[-1])
        return flat.T @ flat / flat.shape[0]
    return rows * rows


def _factor(u: _Unit, curv, damping):
    if u.kind == "diagonal":
        return jnp.zeros((), curv.dtype)
    if u.kind == "conv_bias":
        return curv + damping
    eye = jnp.eye(curv.shape[-1], dtype=curv.dtype)
    return jnp.linalg.cholesky(0.5 * (curv + jnp.swapaxes(curv, -1, -2)) + damping * eye)


def _direction(u: _Unit, mu, curv, factor, eps):
    if u.kind == "diagonal":
        return mu / (jnp.sqrt(curv) + eps)
    if u.kind == "conv_bias":
        return mu / factor
    if u.kind in ("dense", "conv"):
        return cho_solve((factor, True), mu[..., None])[..., 0]
    flat = mu.reshape(-1, mu.shape[-1])
    return cho_solve((factor, True), flat.T).T.reshape(mu.shape)


def _all_finite(xs) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])) if xs else jnp.array(True)


class _Update:
    """The ``update`` of :func:`mbf` (a callable holding the options and the partition)."""

    def __init__(self, opts: MBFOptions, learning_rate):
        self.opts = opts
        self.learning_rate = learning_rate

    def units(self, tree):
        return mbf_partition(tree, average_above=self.opts.average_above,
                             conv_average=self.opts.conv_average)

    def estimates(self, units, leaves, curvature):
        """Per-unit curvature estimates of one batch (mode as in ``opts.curvature``)."""
        mode = self.opts.curvature
        if mode != "minibatch_outer" and curvature is None:
            raise ValueError(
                f"mbf with curvature={mode!r} needs update(..., curvature=...): "
                + ("a pytree of per-example gradients ∇ℓ_n (leading batch axis), e.g. "
                   "jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)"
                   if mode == "per_sample" else
                   "the gradient pytree of the loss at labels sampled from the model")
                + "; received None.")
        cleaves = None if curvature is None else jax.tree_util.tree_leaves(curvature)
        out = []
        for u in units:
            rows = _rows(u, leaves)
            if mode == "per_sample":
                ps = None if u.kind == "diagonal" else _rows(u, cleaves, lead=1)
                out.append(_estimate(u, rows, ps))
            elif mode == "sampled_labels":
                out.append(_estimate(u, _rows(u, cleaves)))
            else:
                out.append(_estimate(u, rows))
        return out

    def __call__(self, updates, state: MBFState, params=None, *, curvature=None, **extra):
        o = self.opts
        if o.weight_decay and params is None:
            raise ValueError(f"mbf with weight_decay={o.weight_decay} needs params: "
                             "tx.update(grads, state, params).")
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        units = self.units(updates)
        pleaves = None if params is None else jax.tree_util.tree_leaves(params)
        t = state.count
        refresh = t % o.curvature_every == 0
        invert = t % o.inverse_every == 0
        est = self.estimates(units, leaves, curvature)
        curv = [jnp.where(refresh, o.curvature_decay * c + (1.0 - o.curvature_decay) * e, c)
                for c, e in zip(state.curvature, est)]
        factor = [jax.lax.cond(invert, lambda c=c, u=u: _factor(u, c, o.damping), lambda f=f: f)
                  for u, c, f in zip(units, curv, state.factor)]
        mu = [o.momentum * m + _rows(u, leaves) for u, m in zip(units, state.momentum)]
        dirs = [_direction(u, m, c, f, o.eps) for u, m, c, f in zip(units, mu, curv, factor)]
        ok = _all_finite(leaves) & (~refresh | _all_finite(est)) & _all_finite(dirs)
        lr = self.learning_rate(t) if callable(self.learning_rate) else self.learning_rate
        out = [jnp.zeros_like(x) for x in leaves]
        for u, d in zip(units, dirs):
            for i, v in _unrows(u, d, leaves).items():
                if o.weight_decay:
                    v = v + o.weight_decay * pleaves[i]
                out[i] = jnp.where(ok, -lr * v, jnp.zeros_like(v)).astype(leaves[i].dtype)
        keep = lambda new, old: [jnp.where(ok, a, b) for a, b in zip(new, old)]  # noqa: E731
        new_state = MBFState(count=jnp.where(ok, t + 1, t), skipped=state.skipped + (~ok).astype(jnp.int32),
                             momentum=tuple(keep(mu, state.momentum)),
                             curvature=tuple(keep(curv, state.curvature)),
                             factor=tuple(keep(factor, state.factor)))
        return jax.tree_util.tree_unflatten(treedef, out), new_state


class MBFTransformation(optax.GradientTransformationExtraArgs):
    """The optax transformation of :func:`mbf`, plus :meth:`warm_start` and :meth:`report`."""

    def warm_start(self, state: MBFState, batches) -> MBFState:
        """One pass: F̄ and v := arithmetic mean of the per-batch estimates; factors recomputed.

        Args:
            state: from ``init``.
            batches: iterable of mini-batch gradient pytrees; for ``curvature="per_sample"``
                of pairs ``(mean gradient, per-example gradients)``; for ``"sampled_labels"``
                of pairs ``(mean gradient, sampled-label gradient)``.

        Raises:
            ValueError: no batch; FloatingPointError: a non-finite estimate.
        """
        up: _Update = self.update
        sums, count, units = None, 0, None
        for item in batches:
            grads, curvature = (item, None) if up.opts.curvature == "minibatch_outer" else item
            leaves = jax.tree_util.tree_leaves(grads)
            units = up.units(grads)
            est = up.estimates(units, leaves, curvature)
            if not bool(_all_finite(est)):
                raise FloatingPointError(f"warm_start needs finite curvature; batch {count} gave "
                                         "non-finite estimates. Check the gradients.")
            sums = est if sums is None else [a + b for a, b in zip(sums, est)]
            count += 1
        if count == 0:
            raise ValueError("warm_start needs at least one batch; received an empty iterable.")
        curv = [s / count for s in sums]
        factor = [_factor(u, c, up.opts.damping) for u, c in zip(units, curv)]
        return state._replace(curvature=tuple(curv), factor=tuple(factor))

    def report(self, params) -> list[dict]:
        """How each unit of ``params`` is preconditioned (kind, block size, blocks, storage)."""
        return [dict(name=u.name, kind=u.kind, block_size=u.block_size, num_blocks=u.num_blocks,
                     stored_entries=u.stored_entries) for u in self.update.units(params)]


def mbf(learning_rate, *, damping: float = 0.003, momentum: float = 0.9,
        curvature_decay: float = 0.9, weight_decay: float = 0.0, curvature_every: int = 10,
        inverse_every: int = 100, curvature: str = "minibatch_outer",
        average_above: float = 2 ** 24, eps: float = 1e-8, conv_average: bool = False) -> MBFTransformation:
    r"""Mini-Block Fisher preconditioning (Bahamou, Goldfarb & Ren, AISTATS 2023) for optax.

    Per step, with ḡ the mini-batch gradient: :math:`\mu \leftarrow \beta_1\mu + \bar g`; every
    T1 steps :math:`\bar F_j \leftarrow \beta_2\bar F_j + (1-\beta_2)\hat F_j`; every T2 steps the
    Cholesky factor of :math:`\bar F_j + \lambda I`; updates
    :math:`-\alpha\,[(\bar F_j+\lambda I)^{-1}\mu_j + \gamma\theta]` on mini-blocks and
    :math:`-\alpha\,[\mu/(\sqrt v+\epsilon) + \gamma\theta]` on other leaves. Options and
    defaults as ``fimcore_adapters.torch.MBF`` (see :mod:`fimcore.mbf`).

    ``update(grads, state, params=None, *, curvature=None)``: ``params`` is needed with weight
    decay; ``curvature`` is, for ``"per_sample"``, the per-example gradients ∇ℓ_n (leading batch
    axis; other leaves use ḡ²), for ``"sampled_labels"`` the gradient at labels sampled from the
    model (needed on every call: the refresh is decided inside the traced step).

    Args:
        learning_rate: α, a float or an optax schedule of the step count.

    Raises:
        ValueError: an option out of range (at construction), or a pytree without dense/conv
            layers (at ``init``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
        ...           "LayerNorm_0": {"scale": jnp.ones(2)}}
        >>> tx = mbf(0.1, curvature_every=1, inverse_every=1)
        >>> [u["kind"] for u in tx.report(params)]
        ['dense', 'diagonal']
        >>> state = tx.init(params)
        >>> grads = jax.tree_util.tree_map(jnp.ones_like, params)
        >>> updates, state = tx.update(grads, state, params)
        >>> int(state.count), updates["Dense_0"]["kernel"].shape
        (1, (3, 2))
    """
    opts = MBFOptions(lr=0.0 if callable(learning_rate) else learning_rate, damping=damping,
                      momentum=momentum, curvature_decay=curvature_decay,
                      weight_decay=weight_decay, curvature_every=curvature_every,
                      inverse_every=inverse_every, curvature=curvature,
                      average_above=average_above, eps=eps, conv_average=conv_average)
    up = _Update(opts, learning_rate)

    def init(params) -> MBFState:
        leaves = jax.tree_util.tree_leaves(params)
        units = up.units(params)
        mom, curv, fac = [], [], []
        for u in units:
            rows = jnp.zeros_like(_rows(u, leaves))
            mom.append(rows)
            c = jnp.zeros_like(_estimate(u, rows))
            curv.append(c)
            fac.append(_factor(u, c, damping))
        return MBFState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), tuple(mom), tuple(curv),
                        tuple(fac))

    return MBFTransformation(init, up)
