"""Generic path: per-sample gradients of any per-example JAX loss via ``vmap(grad)``.

The Gram ``G = J Jᵀ`` (B×B) is accumulated leaf by leaf, ``G = Σ_l J_l J_lᵀ`` with
``J_l`` the (B, P_l) per-sample gradients of parameter leaf ``l``; the B×P matrix ``J`` is
never concatenated. With ``chunk_size = c`` only ``c`` (diagonal blocks) or ``2c``
(off-diagonal blocks) per-sample gradients are alive at once: the off-diagonal blocks
``J_a J_bᵀ`` of chunks ``b < a`` are formed by recomputing chunk ``b``'s gradients, so the
result is exact at the price of ``n(n+1)/2`` chunk gradient evaluations for ``n = ⌈B/c⌉``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fimcore.layers import LayerRecord, PerLayerSink

from .._fisher import check_fisher_options
from .sampled import OutputLoss, sampled_grads
from ._checks import (
    accumulation_dtype,
    batch_size,
    check_finite_if_concrete,
    check_params,
    gradient_dtype,
)
from .report import StepInfo, leaf_groups
from .sharding import replicate_before_vmapped_conv

__all__ = ["per_sample_gram", "value_grad_and_gram"]


def _leaf_gram(a, b, dtype):
    """``Σ_leaves A_l B_lᵀ`` for two pytrees of per-sample gradients with leading axes."""
    total = None
    for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        fa = jnp.reshape(la, (la.shape[0], -1)).astype(dtype)
        fb = jnp.reshape(lb, (lb.shape[0], -1)).astype(dtype)
        block = fa @ fb.T
        total = block if total is None else total + block
    return total


def _grouped_gram(groups, a, b, dtype):
    """``{layer: Σ_{leaves l of layer} A_l B_lᵀ}`` (the per-layer blocks of :func:`_leaf_gram`)."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    out = {}
    for name, index in groups:
        out[name] = _leaf_gram([la[i] for i in index], [lb[i] for i in index], dtype)
    return out


def _check_loss_shape(per_example, params, batch, has_aux):
    one = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
    out = jax.eval_shape(lambda p, b: per_example(p, *b), params, one)
    if has_aux and not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            "with has_aux=True the loss function must return a pair (loss, aux); "
            f"received {type(out).__name__}. Return (loss, aux) or set has_aux=False."
        )
    loss = out[0] if has_aux else out
    if getattr(loss, "shape", None) != () or not jnp.issubdtype(loss.dtype, jnp.floating):
        raise ValueError(
            "the loss function must return a real scalar for ONE example (shape ()), "
            f"received shape {getattr(loss, 'shape', None)} and dtype "
            f"{getattr(loss, 'dtype', type(loss).__name__)}. Write the loss of a single "
            "example; value_grad_and_gram vmaps it over the batch."
        )


def value_grad_and_gram(loss_fn, *, has_aux=False, chunk_size=None, dtype=None, check_finite=True,
                        keep_blocks=False, memory_budget=None, fisher="empirical", mc_samples=1,
                        seed=0, axis_name=None):
    """Transform a per-example loss into ``(params, *batch) -> (mean loss, mean gradient, Gram)``.

    ``loss_fn(params, *example)`` is the loss ℓ_i of ONE example (the
    ``jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, ...))`` idiom). The returned function
    maps every batch leaf's leading axis (size B) and gives

    - ``mean_loss = (1/B) Σ_i ℓ_i``,
    - ``mean_grad = ∇_θ mean_loss`` (a pytree like ``params``, for the optimiser step),
    - ``gram = J Jᵀ`` (B×B) with rows ``J_i = ∇_θ ℓ_i`` (``1ᵀ G 1 = B²·‖mean_grad‖²``).

    With ``has_aux=True`` the loss returns ``(ℓ_i, aux_i)`` and the first output is
    ``(mean_loss, aux)`` with ``aux`` stacked over the batch. The function is pure and
    jit-able, and it composes with ``jax.vmap`` (e.g. over an ensemble of parameters).

    With ``keep_blocks=True`` a fourth output holds the per-layer blocks
    ``{layer: J_l J_lᵀ}`` (a layer is the container of parameter leaves, e.g. ``"Dense_0"``
    for ``params["Dense_0"]["kernel"]``; top-level leaves are their own layer), and the Gram
    is their sum, so they add up to it exactly. The returned function also has
    ``report()`` (the layers of the last trace, each on the ``"generic"`` path) and
    ``result(gram, blocks=None)``, the :class:`fimcore.GramResult` of a step's outputs for
    ``fimcore.MeasureTracker.update`` (call it on the host, outside ``jit``).

    Args:
        loss_fn: per-example loss ``loss_fn(params, *example) -> scalar``.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
        chunk_size: process at most this many samples' gradients at once (exact; costs
            ``n(n+1)/2`` chunk evaluations for ``n = ⌈B/chunk_size⌉``). ``None``: one chunk.
        dtype: Gram dtype. ``None``: float64 if ``jax_enable_x64`` is on, otherwise the
            gradients' dtype (float32). Per-sample gradients are cast to it before the products.
        check_finite: outside ``jit``, raise if a parameter is NaN/Inf (one host sync).
        keep_blocks: also return ``{layer: (B, B) block}`` summing to the Gram.
        memory_budget: None or bytes for the per-sample gradients alive at once (the PyTorch
            ``GramRecorder`` option): sets ``chunk_size = memory_budget // (2·P·itemsize)`` (two
            chunks of P-sized gradients are alive for an off-diagonal block; with
            ``fisher="sampled"`` each sample holds K of them, ``// (2·K·P·itemsize)``); a budget
            below two samples' gradients is refused. Exclusive with ``chunk_size``.
        fisher: ``"empirical"`` (rows at the data labels) or ``"sampled"``: the Gram's rows are
            ``∇_θ ℓ(h_i, ŷ_i)`` at labels drawn from the model (ŷ ~ softmax(h) or the Gaussian of
            the MSE), the Monte-Carlo ("true") Fisher's Gram; loss, gradient stay the data-label
            ones. Needs ``loss_fn`` built by :func:`output_loss` (so the model output and the
            likelihood are known); per example one forward (``jax.vjp``) and 1 + K pullbacks.
        mc_samples: K draws per example; the Gram is the mean of the K (B, B) Grams (unbiased
            trace; off-diagonal entries average to 0, so for Fisher spectra use K = 1; see
            :mod:`fimcore_adapters._fisher`).
        seed: with ``fisher="sampled"``, the step takes a keyword ``key=`` (a ``jax.random`` key;
            pass a fresh one every step); without it ``jax.random.key(seed)`` is used.
            :func:`sample_labels` gives the labels a key draws.
        axis_name: None, or the mesh axis the batch is split over when the step runs inside
            ``jax.shard_map`` (each device sees its b = B/n samples). The per-sample gradients
            ``J_r`` (b, P_l) of every leaf are all-gathered along it (``lax.all_gather``,
            ``tiled=True``: rows in global batch order, shard r holding rows r·b … r·b + b − 1)
            before the products, so every device returns the same global (B, B) Gram
            ``[J_r J_sᵀ]_{r,s}``; ``mean_loss`` and ``mean_grad`` are ``lax.pmean`` over the axis
            (the global mean; shards are equal-sized under ``shard_map``); ``aux`` stays per
            shard. With ``fisher="sampled"`` the labels are those of the unsharded step with the
            same key (key i of the B-way split goes to global sample i). Memory: B × P per
            device, so ``chunk_size``/``memory_budget`` are refused with it. Not needed under
            ``jax.jit`` with a ``NamedSharding``-sharded batch (the README's "Data-parallel
            JAX"): there the global batch is one array and XLA partitions the step itself.

    Returns:
        The transformed function (with ``report()`` and ``result()`` attached).

    Raises:
        TypeError: integer (non-float) parameter leaves; ``has_aux`` mismatch; non-float dtype;
            a non-string ``axis_name``.
        ValueError: non-scalar per-example loss, batch leaves with different leading sizes,
            non-positive ``chunk_size`` or ``memory_budget``, both given, a ``memory_budget``
            smaller than two samples' gradients (the error gives the bytes needed), float64
            requested with x64 off, non-finite parameters (outside ``jit``), ``axis_name`` with
            ``chunk_size`` or ``memory_budget``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fimcore_adapters.jax import value_grad_and_gram
        >>> def loss(w, x, y):
        ...     return 0.5 * (x @ w - y) ** 2
        >>> step = jax.jit(value_grad_and_gram(loss))
        >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]]); y = jnp.array([1.0, 0.0])
        >>> mean_loss, grad, gram = step(jnp.zeros(2), x, y)
        >>> gram.shape, float(gram[0, 0])
        ((2, 2), 1.0)
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"chunk_size must be a positive int or None; received {chunk_size!r}. "
            "Pass e.g. chunk_size=32 to bound memory, or None for one chunk."
        )
    if not isinstance(keep_blocks, bool):
        raise ValueError(f"keep_blocks must be True or False; received {keep_blocks!r}.")
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
            raise ValueError(f"memory_budget must be None or a positive number of bytes; received "
                             f"{memory_budget!r}.")
        if chunk_size is not None:
            raise ValueError(f"pass chunk_size or memory_budget, not both; received chunk_size="
                             f"{chunk_size!r} and memory_budget={memory_budget!r}.")
    check_fisher_options(fisher, mc_samples, seed)
    if axis_name is not None:
        if not isinstance(axis_name, str):
            raise TypeError(f"axis_name must be None or a mesh axis name (str); received "
                            f"{type(axis_name).__name__} {axis_name!r}.")
        if chunk_size is not None or memory_budget is not None:
            raise ValueError("axis_name gathers every shard's per-sample gradients (B × P per device) "
                             "and takes neither chunk_size nor memory_budget; received "
                             f"chunk_size={chunk_size!r}, memory_budget={memory_budget!r}. Drop them, "
                             "or run the step under jax.jit with a NamedSharding-sharded batch instead")
    if fisher == "sampled":
        if keep_blocks:
            raise ValueError("fisher='sampled' does not take keep_blocks; received "
                             f"keep_blocks={keep_blocks!r}. Drop it")
        return _sampled_step(loss_fn, has_aux, chunk_size, dtype, check_finite, mc_samples, seed,
                             memory_budget, axis_name)
    per_example = jax.value_and_grad(loss_fn, has_aux=has_aux)
    info = StepInfo()

    @functools.wraps(loss_fn)
    def step(params, *batch):
        check_params(params)
        if check_finite:
            check_finite_if_concrete(params)
        size = batch_size(batch)
        _check_loss_shape(loss_fn, params, batch, has_aux)
        if axis_name is not None:
            params = _varying(params, axis_name)
        else:
            batch = replicate_before_vmapped_conv(loss_fn, params, batch, "value_grad_and_gram")
        acc = accumulation_dtype(dtype, params)
        groups = leaf_groups(params)
        leaves = jax.tree_util.tree_leaves(params)
        info.records = [LayerRecord(name, "pytree", "generic", "vmap(grad) per-sample gradients",
                                    sum(int(np.size(leaves[i])) for i in index), 1)
                        for name, index in groups]
        info.grad_dtype, info.batch_size = gradient_dtype(params), size
        info.num_params = sum(int(np.size(x)) for x in leaves)
        form = (lambda a, b: _grouped_gram(groups, a, b, acc)) if keep_blocks else (
            lambda a, b: _leaf_gram(a, b, acc))
        chunk = chunk_size
        if memory_budget is not None:
            chunk = _budget_chunk(memory_budget, leaves, 1, "its per-sample gradients")
        if chunk is None or chunk >= size:
            out, grads = jax.vmap(per_example, in_axes=(None,) + (0,) * len(batch))(params, *batch)
            mean_grad = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
            if axis_name is not None:
                grads = _gather(grads, axis_name)
                mean_grad = lax.pmean(mean_grad, axis_name)
                info.batch_size = size * lax.axis_size(axis_name)
            gram = form(grads, grads)
        else:
            out, mean_grad, gram = _chunked(per_example, params, batch, size, chunk, acc, form)
        extra = ()
        if keep_blocks:
            sink = PerLayerSink()                       # the core's per-layer sink
            for name, block in gram.items():
                sink.add_block(name, block)
            gram, blocks = sink.gram(), sink.blocks()
            extra = (blocks,)
            concrete = not any(isinstance(b, jax.core.Tracer) for b in blocks.values())
            info.blocks = blocks if concrete else None
        mean = (lambda v: lax.pmean(jnp.mean(v), axis_name)) if axis_name is not None else jnp.mean
        if has_aux:
            losses, aux = out
            return ((mean(losses), aux), mean_grad, gram) + extra
        return (mean(out), mean_grad, gram) + extra

    step.report = info.report
    step.result = lambda gram, blocks=None: info.result(gram, blocks, what="the step")
    return step


def _budget_chunk(budget, leaves, copies, what):
    """Samples per chunk under ``memory_budget``: two chunks of ``copies`` P-sized gradients each."""
    per_sample = copies * sum(int(np.size(x)) * jnp.dtype(jnp.result_type(x)).itemsize for x in leaves)
    if 2 * per_sample > budget:
        raise ValueError(
            f"memory_budget must hold two samples' worth of {what} (two chunks are alive for an "
            f"off-diagonal block): 2 × {per_sample} = {2 * per_sample} bytes; received "
            f"memory_budget={budget!r}. Raise memory_budget to at least {2 * per_sample}, or pass None")
    return int(budget // (2 * per_sample))


def _varying(params, axis_name):
    """Mark replicated parameters as varying over ``axis_name`` inside ``shard_map``: otherwise the
    gradient of an invariant input is summed over the axis (its transpose is a ``psum``), which
    would add every shard's sample k into row k of each shard's per-sample gradients."""
    def cast(p):
        if axis_name in getattr(jax.typeof(p), "vma", frozenset()):
            return p
        return lax.pcast(p, axis_name, to="varying")
    return jax.tree_util.tree_map(cast, params)


def _gather(tree, axis_name):
    """Every shard's rows, in global batch order (``tiled``: (n·b, …) from (b, …) per shard)."""
    return jax.tree_util.tree_map(
        lambda g: lax.all_gather(g, axis_name, axis=0, tiled=True, to="invarying"), tree)


def _sampled_step(loss_fn, has_aux, chunk_size, dtype, check_finite, K, seed, memory_budget=None,
                  axis_name=None):
    if not isinstance(loss_fn, OutputLoss):
        raise TypeError(
            "fisher='sampled' needs the model output and the likelihood to draw labels from; "
            f"received loss_fn {getattr(loss_fn, '__name__', type(loss_fn).__name__)!r}, an opaque "
            "per-example loss. Build it as output_loss(predict, 'cross_entropy') or "
            "output_loss(predict, 'mse') (predict(params, x) -> logits or mean of one example), "
            "or use fisher='empirical'")
    if has_aux or chunk_size is not None:
        raise ValueError("fisher='sampled' takes neither has_aux nor chunk_size (use memory_budget "
                         f"to bound memory); received has_aux={has_aux!r}, chunk_size={chunk_size!r}. "
                         "Drop them")

    def per_example(params, xi, yi, ki):
        value, grad, sampled = sampled_grads(loss_fn, params, xi, yi, ki, K)
        return value, (grad, sampled)

    def form(a, b):
        # sampled leaves are (c, K, …): Gram of draw k, averaged over k
        sa = jax.tree_util.tree_map(lambda g: jnp.moveaxis(g, 1, 0), a[1])
        sb = jax.tree_util.tree_map(lambda g: jnp.moveaxis(g, 1, 0), b[1])
        return jax.vmap(lambda x, y: _leaf_gram(x, y, acc_of[0]))(sa, sb).mean(axis=0)

    acc_of = [None]

    def step(params, x, y, *, key=None):
        check_params(params)
        if check_finite:
            check_finite_if_concrete(params)
        size = batch_size((x, y))
        acc = accumulation_dtype(dtype, params)
        if axis_name is not None:
            params = _varying(params, axis_name)
        else:
            x, y = replicate_before_vmapped_conv(loss_fn, params, (x, y),
                                                 "value_grad_and_gram(fisher='sampled')")
        base = jax.random.key(seed) if key is None else key
        if axis_name is None:
            keys = jax.random.split(base, size)
        else:                   # this shard's slice of the global B-way split
            n = lax.axis_size(axis_name)
            keys = lax.dynamic_slice_in_dim(jax.random.split(base, size * n),
                                            lax.axis_index(axis_name) * size, size)
        acc_of[0] = acc
        if memory_budget is not None:
            chunk = _budget_chunk(memory_budget, jax.tree_util.tree_leaves(params), K,
                                  f"its K = {K} sampled-label gradients")
            if chunk < size:
                values, mean_grad, gram = _chunked(per_example, params, (x, y, keys), size, chunk,
                                                   acc, form, mean=lambda g: g[0])
                return jnp.mean(values), mean_grad, gram
        values, grads, sampled = jax.vmap(
            lambda xi, yi, ki: sampled_grads(loss_fn, params, xi, yi, ki, K))(x, y, keys)
        # sampled leaves are (B, K, …): Gram of draw k, averaged over k
        per_draw = jax.tree_util.tree_map(lambda g: jnp.moveaxis(g, 1, 0), sampled)
        mean_grad = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
        mean_loss = jnp.mean(values)
        if axis_name is not None:
            per_draw = jax.tree_util.tree_map(     # (K, b, …) -> (K, B, …)
                lambda g: lax.all_gather(g, axis_name, axis=1, tiled=True, to="invarying"), per_draw)
            mean_grad, mean_loss = lax.pmean((mean_grad, mean_loss), axis_name)
        gram = jax.vmap(lambda g: _leaf_gram(g, g, acc))(per_draw).mean(axis=0)
        return mean_loss, mean_grad, gram

    return step


def _chunked(per_example, params, batch, size, chunk, acc, form, mean=lambda g: g):
    """Outputs, mean gradient and ``form``-Gram in chunks of ``chunk`` samples (exact).

    ``per_example(params, *example) -> (out, grads)``; ``mean(grads)`` is the part averaged into
    the mean gradient (all of it for the empirical Gram, the data-label gradient for the sampled
    one)."""
    n = -(-size // chunk)
    padded = n * chunk
    index = jnp.minimum(jnp.arange(padded), size - 1)  # pad with copies of the last sample
    mask = (jnp.arange(padded) < size).reshape(n, chunk)
    chunks = jax.tree_util.tree_map(
        lambda x: jnp.take(x, index, axis=0).reshape((n, chunk) + x.shape[1:]), batch
    )
    in_axes = (None,) + (0,) * len(batch)

    def chunk_grads(k):
        example = jax.tree_util.tree_map(lambda x: lax.dynamic_index_in_dim(x, k, keepdims=False), chunks)
        out, grads = jax.vmap(per_example, in_axes=in_axes)(params, *example)
        m = mask[k]
        grads = jax.tree_util.tree_map(
            lambda g: g * m.reshape((chunk,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads
        )
        return out, grads

    zero_grad = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.result_type(p)), params)
    grad_shapes = jax.eval_shape(lambda k: chunk_grads(k)[1], 0)

    def outer(carry, a):
        gram, grad_sum = carry
        out, ja = chunk_grads(a)
        put = lambda g, block, at: jax.tree_util.tree_map(  # noqa: E731
            lambda x, y: lax.dynamic_update_slice(x, y, at), g, block)
        gram = put(gram, form(ja, ja), (a * chunk, a * chunk))

        def inner(b, g):
            _, jb = chunk_grads(b)
            block = form(ja, jb)
            g = put(g, block, (a * chunk, b * chunk))
            return put(g, jax.tree_util.tree_map(lambda x: x.T, block), (b * chunk, a * chunk))

        gram = lax.fori_loop(0, a, inner, gram)
        grad_sum = jax.tree_util.tree_map(lambda s, g: s + jnp.sum(g, axis=0), grad_sum, mean(ja))
        return (gram, grad_sum), out

    shape = jax.eval_shape(lambda g: form(g, g), grad_shapes)
    zeros = jax.tree_util.tree_map(lambda _: jnp.zeros((padded, padded), acc), shape)
    init = (zeros, zero_grad)
    (gram, grad_sum), outs = lax.scan(outer, init, jnp.arange(n))
    outs = jax.tree_util.tree_map(lambda o: o.reshape((padded,) + o.shape[2:])[:size], outs)
    mean_grad = jax.tree_util.tree_map(lambda s: s / size, grad_sum)
    return outs, mean_grad, jax.tree_util.tree_map(lambda g: g[:size, :size], gram)


def per_sample_gram(loss_fn, params, *batch, has_aux=False, chunk_size=None, dtype=None,
                    memory_budget=None, fisher="empirical", mc_samples=1, seed=0, key=None,
                    axis_name=None):
    """Gram ``G = J Jᵀ`` (B×B) of the per-sample gradients ``J_i = ∇_θ loss_fn(params, *example_i)``.

    One-off form of :func:`value_grad_and_gram` (same arguments and errors; ``key`` goes to
    the step with ``fisher="sampled"``); returns only the Gram. Wrap it in ``jax.jit`` (with ``loss_fn`` static) for repeated use.

    Example:
        >>> import jax.numpy as jnp
        >>> from fimcore_adapters.jax import per_sample_gram
        >>> loss = lambda w, x: jnp.dot(w, x)      # gradient of sample i is x_i
        >>> per_sample_gram(loss, jnp.ones(2), jnp.array([[1.0, 2.0], [3.0, 4.0]])).tolist()
        [[5.0, 11.0], [11.0, 25.0]]
    """
    step = value_grad_and_gram(loss_fn, has_aux=has_aux, chunk_size=chunk_size, dtype=dtype,
                               memory_budget=memory_budget, fisher=fisher, mc_samples=mc_samples,
                               seed=seed, axis_name=axis_name)
    if fisher == "sampled":
        return step(params, *batch, key=key)[2]
    return step(params, *batch)[2]
