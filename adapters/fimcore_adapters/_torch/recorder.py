"""``GramRecorder``: the exact per-sample Gram matrix from the user's own forward and backward."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._fisher import check_fisher_options
from .cost import STRATEGIES
from .distributed import GlobalGather, resolve_scope, unwrap_ddp
from .outer import add_outer
from .sampled import make_generator, output_cotangents, resolve_likelihood
from .select import select_parameters
from .uses import GradientTotal, UseTracker
from .report import Report
from .units import build_units

__all__ = ["GramRecorder"]

_REDUCTIONS = ("mean", "sum")
CONV_METHODS = ("auto", "grouped", "unfold", "channels_last")


class _Step:
    """Everything recorded during one ``with recorder:`` block."""

    def __init__(self):
        self.batch: int | None = None
        self.acc: torch.Tensor | None = None
        self.marks: list = []          # (unit, cumulative trace as a device scalar)
        self.backward_started = False
        self.pending: dict = {}        # id(param) -> [J sum (B, numel), received, expected, param]
        self.grad_dtype: torch.dtype | None = None
        self.stack: list = []          # units whose forward is running
        self.multi: set | None = None  # ids of units with a parameter used more than once
        self.blocks: dict | None = None  # unit name -> (B, B) block, when blocks are kept
        self.block_units: dict = {}      # unit name -> unit
        self.total: GradientTotal | None = None  # autograd's ‖∇L‖², on steps that check uses
        self.batch_src: tuple | None = None      # (unit, where it read B)
        self.seq_first: list = []      # units that declared their batch in dim 1
        self.sampled: torch.Tensor | None = None   # sum of the sampled-label draws' Grams
        self.sampled_blocks: dict | None = None    # and of their blocks, when blocks are kept
        self.labels: torch.Tensor | None = None    # the drawn labels (K, B, …)
        self.empirical: torch.Tensor | None = None  # the data-label Gram, fisher="sampled"
        self.ambiguous: list = []      # (unit, leading dims) with B in more than one of them


class GramRecorder:
    """Record the exact B×B Gram matrix ``G = J Jᵀ`` of per-sample gradients during a normal step.

    Row i of J is B × sample i's contribution to the gradient of the batch loss L (for
    ``loss_reduction="mean"``; with ``"sum"`` no rescaling): the gradient of sample i's own loss
    ℓ_i when no layer couples samples, and under BatchNorm in train mode the per-sample
    contribution read off the ordinary batch backward. Hence ``1ᵀ G 1 = B²‖∇L‖²`` always
    (``‖∇L‖²`` for ``"sum"``). Nothing of size B×P is formed: each layer adds its share of G in
    the backward pass, by the factored form ``Σ_{t,s}(a_it·a_js)(g_it·g_js)`` or by that layer's
    per-sample gradients J_l (``J_l J_lᵀ``), whichever the cost model finds cheaper.

    Use one recorder for a whole training loop::

        recorder = GramRecorder(model)
        for x, y in loader:
            opt.zero_grad()
            with recorder:                      # or: with recorder(measure=k % 10 == 0):
                loss = loss_fn(model(x), y)
                loss.backward()
            G = recorder.gram()                 # (B, B) on the model's device
            opt.step()

    ``.grad`` after the block equals that of a plain step (layers whose per-sample gradients are
    formed anyway return their sum as the batch gradient from their autograd function, so autograd
    does not compute it twice; it still accumulates it into ``.grad`` itself, so DDP's reducer,
    which hooks that accumulation, all-reduces it as usual).

    Args:
        model: the network. The batch is dim 0 of every covered layer's input, except where a
            module declares it: ``nn.RNN``/``nn.GRU``/``nn.LSTM``, ``nn.MultiheadAttention`` and
            the ``nn.Transformer*`` modules with ``batch_first=False`` (batch in dim 1; hidden
            states ``(layers, B, H)`` and key padding masks ``(B, S)`` in any case), and packed
            sequences (rows mapped to samples by ``batch_sizes`` and ``sorted_indices``). A step in
            which layers disagree on B, an unbatched call of such a module, or a dim-0 layer whose
            leading dimensions hold B more than once beside a ``batch_first=False`` module is
            refused with a ``ValueError`` naming the modules.
        loss_reduction: ``"mean"`` (the loss averages over the batch: G is scaled by B²) or
            ``"sum"``.
        params: None (all trainable parameters) or an iterable of parameter names, module names,
            ``nn.Module`` or ``nn.Parameter`` objects selecting the columns of J.
        strategy: ``"auto"`` (cost model), ``"factored"``, ``"materialize"`` (forced on every
            layer that has both forms), ``"generic"`` (every unit through ``torch.func``; slow,
            for checking), or a dict ``{module name: strategy}`` with ``"auto"`` elsewhere.
        dtype: None (accumulate G in the per-sample gradients' dtype) or e.g. ``torch.float64``.
            Accuracy: in float64 G agrees with a per-sample loop to ~1e-15 relative; for a
            float32 model with float32 accumulation, ``|G_ij − G*_ij| ≤ 1e-4·sqrt(G*_ii G*_jj)``
            against the float64 value G* on small networks (tested bound); the PyTorch benchmark
            tables (``benchmarks/RESULTS.md``) report ‖G − G*‖_F / ‖G*‖_F from 1.2e-7 (MLP) to
            6.6e-4 (BatchNorm ResNets).
        memory_budget: None or bytes: the largest per-layer work buffer; bigger layers are split
            into chunks of output channels (or samples, for the factored form).
        conv_method: how per-sample convolution weight gradients are formed: ``"auto"`` (time the
            candidates once per layer shape and cache), ``"grouped"`` (one convolution backward
            with groups = B), ``"unfold"`` (strided-view unfold + batched GEMM) or
            ``"channels_last"`` (patches of a channels-last copy + batched GEMM; layers without
            channel groups, others use ``"unfold"``).
        check_uses: ``"first"`` (default) watches, during the first measured step, every torch
            call for a selected parameter used with gradients outside the forward of the module
            that covers it (tied weights applied through a function — passed positionally, by
            keyword or inside a list/tuple/dict argument —, a penalty term in the loss), which
            would otherwise be missing from G, and raises; on the same step it checks the
            whole-batch identity ``1ᵀG1 = B²‖∇L‖²`` against autograd's own gradient, which catches
            the routes no torch call shows (a custom ``autograd.Function`` taking the parameter, a
            view of it made before the block, a gradient hook changing its gradient).
            ``"always"`` repeats both on every step (for models whose parameter use changes
            between steps; costs a few µs per op).
        keep_blocks: also keep each covered module's own block :math:`J_l J_l^\top` of G
            (:meth:`blocks`, :meth:`result`); G is then their sum, in module order, so the blocks
            sum to G exactly. Costs one (B, B) buffer per covered module.
        fisher: ``"empirical"`` (default: rows are loss gradients at the data labels) or
            ``"sampled"``: rows are loss gradients at labels ŷ_i drawn from the model's
            predictive distribution, the Monte-Carlo ("true") Fisher's Gram with
            E[Ĝ_ii] = tr(Λ_i 𝒥_i𝒥_iᵀ), E[Ĝ_ij] = 0 (i ≠ j), Λ_i = ∇²_h ℓ. The model's forward
            (the outermost call of ``model``, whose output h must be one tensor: logits with the
            class axis 1, or the regression mean) is followed by one extra backward of h per draw,
            recorded by the same layer rules and not written to ``.grad``; your own
            ``loss.backward()`` then gives the data-label gradient as usual (its Gram is
            :meth:`empirical_gram`). One forward of ``model`` per block.
        loss: with ``fisher="sampled"``, the likelihood: ``nn.CrossEntropyLoss()``/``F.cross_entropy``/
            ``"cross_entropy"`` (ŷ ~ Categorical(softmax(h)), Λ = diag(p) − ppᵀ) or
            ``nn.MSELoss()``/``F.mse_loss``/``"mse"`` (ŷ = h + σε with σ² = D/2 for a batch-mean
            MSE over D output elements per sample, 1/2 for a summed one; Λ = (2/D)·I or 2·I).
            Anything else is refused with a ``ValueError`` naming it.
        mc_samples: K draws per sample; :meth:`gram` is then the mean of the K (B, B) Grams (one
            backward each). The mean keeps the B×B shape and its trace is unbiased, but its
            off-diagonal entries average towards 0, so for Fisher spectra use K = 1 (the
            non-zero eigenvalues of Ĝ/B are those of the B-row estimate F̂ = ĴᵀĴ/B).
        seed: seeds the label draws (a CPU ``torch.Generator``, advanced every step, so a seed
            fixes the whole sequence); None seeds it from torch's global RNG.
        scope: data-parallel training (``torch.distributed``; README "Data-parallel training
            (PyTorch DDP)"). ``"global"``: :meth:`gram` is the exact (N, N) Gram of the global
            batch (N = Σ_r B_r over the W ranks, rows ordered by rank, then local index) on
            every rank, each layer's factors or per-sample rows all-gathered on a dedicated
            process group (module ``_torch.distributed``). Rows are scaled to the gradient DDP
            averages: ``J_i = N/(W·B_r)·∇ℓ_i`` for a mean loss (``∇ℓ_i`` itself when every rank
            has the same B), ``∇ℓ_i/W`` for a sum, so ``1ᵀG1 = N²‖∇L‖²`` (``‖∇L‖²``) with ∇L
            the averaged ``.grad``. ``"local"``: each rank's own (B_r, B_r) Gram, exactly as
            without DDP; average the measures with :func:`mean_over_ranks`. None (default):
            ``"global"`` when ``model`` is a ``DistributedDataParallel`` (the only scope whose G
            belongs to the gradient the optimiser applies), ``"local"`` otherwise — also for a
            plain module with torch.distributed initialised (pass ``scope="global"`` to gather
            over its ranks; rows are then scaled as under DDP). A DDP model is unwrapped: hooks
            go on ``model.module``, and names (``params``, ``strategy``, :meth:`report`,
            :meth:`blocks`) are those of ``model.module``, without the ``"module."`` prefix.
            Building a global recorder is a collective call (``dist.new_group``): every rank
            constructs it, in the same order, and every rank must run the same measured steps.
            Under ``no_sync()`` DDP does not all-reduce; a global recorder still gathers and
            returns the global Gram of that micro-batch (rows scaled as for a synchronised step)
            and leaves ``.grad`` to DDP (local). ``.grad`` is always DDP's own: the recorder's
            batch weight gradients are returned through autograd, whose accumulation DDP hooks.
            Written for gloo (tested) and NCCL (untested). SyncBatchNorm (CUDA only) makes a
            sample's row couple with the whole global batch; per-rank BatchNorm couples it only
            with its own rank's samples.
        process_group: with ``scope="global"``, the ranks whose batches form the global batch
            (default: the DDP model's group, else the world); the gathers run on a new group
            over the same ranks.
        timeout: seconds a global-scope gather waits for the other ranks before it raises a
            ``RuntimeError`` (None: the backend's default, 30 min for gloo).

    Raises:
        ValueError: no trainable parameter selected, an unknown ``params`` entry, a bad option,
            a module owning parameters beside parameterised submodules, ``scope="global"``
            without an initialised process group, or with ``fisher="sampled"``.
        RuntimeError: (in the ``with`` block, ``scope="global"``) a Gram gather on the dedicated
            group failed: another rank stopped or did not reach it within ``timeout``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> rec = GramRecorder(model)
        >>> with rec:
        ...     loss = nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        >>> G = rec.gram()
        >>> G.shape
        torch.Size([5, 5])
        >>> flat = torch.cat([p.grad.flatten() for p in model.parameters()])
        >>> bool(torch.allclose(G.sum(), 25 * flat.dot(flat)))
        True
    """

    def __init__(self, model: nn.Module, *, loss_reduction: str = "mean", params=None,
                 strategy="auto", dtype: torch.dtype | None = None, memory_budget: int | None = None,
                 conv_method: str = "auto", check_uses: str = "first", keep_blocks: bool = False,
                 fisher: str = "empirical", loss=None, mc_samples: int = 1, seed: int | None = None,
                 scope: str | None = None, process_group=None, timeout: float | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; received {type(model).__name__}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_REDUCTIONS}; received {loss_reduction!r}. "
                             "Pass the reduction your loss uses over the batch.")
        if isinstance(strategy, dict):
            bad = {k: v for k, v in strategy.items() if v not in STRATEGIES}
            if bad:
                raise ValueError(f"strategy values must be in {STRATEGIES}; received {bad}")
            self._strategy_map, default = dict(strategy), "auto"
        elif strategy in STRATEGIES:
            self._strategy_map, default = {}, strategy
        else:
            raise ValueError(f"strategy must be one of {STRATEGIES} or a dict of them; received {strategy!r}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a floating torch.dtype; received {dtype!r}")
        if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget <= 0):
            raise ValueError(f"memory_budget must be None or a positive number of bytes; received {memory_budget!r}")
        if check_uses not in ("first", "always"):
            raise ValueError(f"check_uses must be 'first' or 'always'; received {check_uses!r}")
        if conv_method not in CONV_METHODS:
            raise ValueError(f"conv_method must be one of {CONV_METHODS}; received {conv_method!r}")
        if not isinstance(keep_blocks, bool):
            raise ValueError(f"keep_blocks must be True or False; received {keep_blocks!r}")
        check_fisher_options(fisher, mc_samples, seed)
        model, self.ddp = unwrap_ddp(model)
        self.scope = resolve_scope(scope, self.ddp, process_group)
        if self.ddp is not None and process_group is None and self.scope == "global":
            process_group = self.ddp.process_group
        if self.scope == "global" and fisher == "sampled":
            raise ValueError("fisher='sampled' is not supported with scope='global' (its extra "
                             "backward passes are not gathered across ranks); received both. Use "
                             "scope='local' with mean_over_ranks, or fisher='empirical'")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout must be None or a positive number of seconds; received {timeout!r}")
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.likelihood = resolve_likelihood(loss) if fisher == "sampled" else None
        self._generator = make_generator(seed) if fisher == "sampled" else None
        self.model = model
        self.keep_blocks = keep_blocks
        self.loss_reduction = loss_reduction
        self.dtype = dtype
        self.memory_budget = memory_budget
        self.conv_method = conv_method
        self.check_uses = check_uses
        self._uses_checked = False
        self.strategy = strategy
        self.enabled = True
        selected = select_parameters(model, params)
        by_id = {id(p): p for p in model.parameters()}
        self._selected = [by_id[i] for i in selected]
        self._param_names = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self._param_names.setdefault(id(p), n)
        self._units = build_units(model, set(selected), default, self._strategy_map)
        self._gather = None
        if self.scope == "global":
            for u in self._units:
                if u.kind == "embedding":     # its factored form needs the token ids: gather rows
                    u.strategy = "materialize"
            self._gather = GlobalGather(process_group, timeout=timeout)
        unknown = set(self._strategy_map) - {u.name for u in self._units}
        if unknown:
            raise ValueError(f"strategy names modules that hold no selected parameter: {sorted(unknown)}; "
                             f"covered modules are {[u.name for u in self._units]}")
        self._param_units: dict[int, list] = {}
        for u in self._units:
            for _, p in u.params:
                if id(p) in u.selected:
                    self._param_units.setdefault(id(p), []).append(u)
        self._step: _Step | None = None
        self._last: _Step | None = None
        self._handles: list = []
        self._mode: UseTracker | None = None
        self._active = False
        self._measured = False

    # ------------------------------------------------------------------ context
    def __call__(self, measure: bool = True) -> "GramRecorder":
        """Set whether the next ``with`` block measures (``False`` costs nothing); return self."""
        self.enabled = bool(measure)
        return self

    def __enter__(self) -> "GramRecorder":
        if self._active:
            raise RuntimeError("this GramRecorder is already active; `with recorder:` blocks cannot nest")
        self._measured = False
        if not self.enabled:
            return self
        self._step = _Step()
        if self.keep_blocks:
            self._step.blocks = {}
        if self._gather is not None:
            self._gather.begin(self, synced=getattr(self.ddp, "require_backward_grad_sync", True))
        self._active = True
        try:
            for u in self._units:
                u.calls = 0
                u.bw_calls = 0
                self._handles.extend(u.install(self))
            if self.fisher == "sampled":
                self._handles.append(self.model.register_forward_hook(self._sampled_hook))
            if self.check_uses == "always" or not self._uses_checked:
                self._step.total = GradientTotal(self._selected)
                self._handles.extend(self._step.total.install())
                self._mode = UseTracker(self)
                self._mode.__enter__()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._active:
            return False
        step = self._step
        self._cleanup()
        if exc_type is None:
            self._finish(step)
        return False

    def _cleanup(self) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(None, None, None)
        finally:
            self._mode = None
            handles, self._handles = self._handles, []
            for h in reversed(handles):
                h.remove()
            self._active = False

    # ------------------------------------------------------------------ sampled-label Fisher
    def _sampled_hook(self, module, args, out) -> None:
        """After the model's forward: one backward of its output per draw of sampled labels."""
        step = self._step
        if not self._active or step is None or not torch.is_grad_enabled():
            return
        if step.labels is not None:
            raise RuntimeError(
                "fisher='sampled' draws labels at the end of the model's forward, once per `with "
                "recorder:` block; received a second forward of the model in one block. Run one "
                "forward per block")
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            what = type(out).__name__ if not isinstance(out, torch.Tensor) else "a tensor without grad"
            raise TypeError(
                f"fisher='sampled' needs the model's output to be one differentiable tensor "
                f"(logits or the regression mean); received {what}. Return the output tensor from "
                "the model's forward (wrap the model so it does), or use fisher='empirical'")
        cots, labels = output_cotangents(out, self.likelihood, self.mc_samples,
                                         self.loss_reduction, self._generator)
        step.labels = labels
        total = step.total
        params = [p for p in self._selected]
        for k in range(self.mc_samples):
            # through a scalar Σ h·v_k, so that h is an inner node: hooks on the model output
            # itself (the last layer's) fire as in the user's backward
            torch.autograd.grad((out * cots[k]).sum(), params, retain_graph=True, allow_unused=True)
            for entry in list(step.pending.values()):
                self._flush_pending(step, entry)
            step.pending.clear()
            acc = self._sum_blocks(step) if step.blocks else step.acc
            if acc is None:
                raise RuntimeError("the sampled-label backward reached no selected parameter: the "
                                   "model's output does not depend on the parameters the recorder covers")
            if total is not None:
                total.check(acc, step.grad_dtype)   # 1ᵀĜ_k1 = B²‖∇L̂_k‖²: every route recorded
                total.parts = []
            step.sampled = acc.clone() if step.sampled is None else step.sampled.add_(acc)
            if step.blocks:
                if step.sampled_blocks is None:
                    step.sampled_blocks = {n: b.clone() for n, b in step.blocks.items()}
                else:
                    for n, b in step.blocks.items():
                        step.sampled_blocks[n].add_(b)
                step.blocks = {}
            step.acc = None
            step.marks = []
            step.backward_started = False
            for u in self._units:
                u.bw_calls = 0
        step.sampled.div_(self.mc_samples)
        if step.sampled_blocks:
            for b in step.sampled_blocks.values():
                b.div_(self.mc_samples)

    def _finish(self, step: _Step) -> None:
        if self.fisher == "sampled" and step.labels is None and step.backward_started:
            raise RuntimeError(
                "fisher='sampled' draws labels after the forward of the model the recorder was "
                f"built on ({type(self.model).__name__}); no forward of it ran inside the block. "
                "Call the model itself inside `with recorder:`")
        for entry in list(step.pending.values()):
            self._flush_pending(step, entry)
        step.pending.clear()
        step.stack.clear()
        local = None
        if self._gather is not None and step.backward_started:
            local = self._gather.finish(step)   # the global Gram into step; this rank's block
        if step.blocks:                     # unscaled sum first: the use check reads it
            step.acc = self._sum_blocks(step)
        for u in self._units:
            u.record.calls = u.calls
            if u.calls == 0:
                u.set_path("not run", "module not called in the last step")
        self._last = step
        self._measured = step.backward_started
        if self._measured and step.total is not None and step.acc is not None:
            try:
                step.total.check(step.acc if local is None else local, step.grad_dtype)
            except RuntimeError:
                self._measured = False
                raise
        if self._measured:
            self._uses_checked = True
        if step.sampled is not None:        # gram() is the sampled one; keep the data-label one
            if step.blocks:
                step.empirical = self._sum_blocks(step).mul_(self._scale(step))
            elif step.acc is not None:
                step.empirical = step.acc * self._scale(step)
            step.acc = step.sampled
            if step.sampled_blocks is not None:
                step.blocks = step.sampled_blocks
        if step.blocks:                     # G is the sum of the kept (scaled) blocks, in order
            scale = self._scale(step)
            for block in step.blocks.values():
                block.mul_(scale)
            step.acc = self._sum_blocks(step)

    @staticmethod
    def _sum_blocks(step: _Step) -> torch.Tensor:
        total = None
        for block in step.blocks.values():
            total = block.clone() if total is None else total.add_(block)
        return total

    # ------------------------------------------------------------------ results
    @property
    def measured(self) -> bool:
        """True if the last ``with`` block recorded a backward pass (so ``gram()`` is available)."""
        return self._measured

    @property
    def grad_dtype(self) -> torch.dtype | None:
        """dtype of the per-sample gradients of the last step (sets the core's default rtol)."""
        return None if self._last is None else self._last.grad_dtype

    @property
    def batch_size(self) -> int | None:
        """B of the last recorded step."""
        return None if self._last is None else self._last.batch

    def gram(self) -> torch.Tensor:
        """The (B, B) Gram matrix ``G = J Jᵀ`` of the last step, on the model's device.

        Raises:
            RuntimeError: no backward pass was recorded in the last ``with`` block (or it ran with
                ``enabled=False``), or ``gram()`` is called inside the block.
            FloatingPointError: a layer produced non-finite per-sample gradients (it is named).
        """
        if self._active:
            raise RuntimeError("gram() was called inside the `with recorder:` block; call it after the block ends")
        step = self._last
        if step is None or not self._measured:
            why = ("the last block ran with measuring disabled (enabled=False)" if not self.enabled
                   else "no loss.backward() ran inside the last `with recorder:` block")
            raise RuntimeError(f"no Gram matrix was recorded: {why}. Run forward and loss.backward() "
                               "inside `with recorder:` and call gram() after it")
        if step.acc is None:
            raise RuntimeError("the backward pass reached no selected parameter: the loss does not depend "
                               "on the parameters the recorder covers")
        # finite trace ⇔ every ‖J_i‖² finite ⇒ every |G_ij| ≤ sqrt(G_ii G_jj) finite (one scalar
        # read instead of a B×B isfinite pass)
        if not math.isfinite(float(torch.trace(step.acc))):
            if step.blocks:
                unit = next(step.block_units[name] for name, b in step.blocks.items()
                            if not math.isfinite(float(torch.trace(b))))
            else:
                finite = torch.isfinite(torch.stack([t for _, t in step.marks])).tolist()
                unit = step.marks[finite.index(False)][0]
            raise FloatingPointError(
                f"non-finite per-sample gradients in layer {unit.name or '<model>'!r} "
                f"({type(unit.module).__name__}) at this step; the Gram matrix is undefined. Check the "
                "loss and learning rate, or skip this step's measurement")
        return step.acc if step.blocks else step.acc * self._scale(step)

    def empirical_gram(self) -> torch.Tensor:
        """With ``fisher="sampled"``: the data-label Gram of the same step (from your backward).

        Raises:
            RuntimeError: the recorder uses ``fisher="empirical"`` (then :meth:`gram` is it), or
                as :meth:`gram`.
        """
        if self.fisher != "sampled":
            raise RuntimeError("empirical_gram() is the data-label Gram kept beside the sampled one; "
                               "this recorder has fisher='empirical', so gram() is already it")
        self.gram()
        if self._last.empirical is None:
            raise RuntimeError("no data-label backward (loss.backward()) ran inside the last block")
        return self._last.empirical

    def sampled_labels(self) -> torch.Tensor:
        """With ``fisher="sampled"``: the labels drawn in the last step, shape (K, B, …): class
        indices for cross-entropy, regression targets for MSE.

        Raises:
            RuntimeError: no labels were drawn (``fisher="empirical"``, or no forward ran).
        """
        if self._last is None or self._last.labels is None:
            raise RuntimeError("no labels were drawn: build the recorder with fisher='sampled' and "
                               "run the model's forward inside `with recorder:`")
        return self._last.labels

    def _scale(self, step: _Step) -> float:
        return float(step.batch) ** 2 if self.loss_reduction == "mean" else 1.0

    def blocks(self) -> dict[str, torch.Tensor]:
        """``{module name: (B, B) block}`` of the last step, summing to :meth:`gram` exactly.

        A parameter used by several modules (tied weights) has its block under the name of the
        first module that covers it.

        Raises:
            RuntimeError: the recorder was built without ``keep_blocks=True``, or as
                :meth:`gram`.
        """
        if not self.keep_blocks:
            raise RuntimeError("per-layer blocks were not kept: build the recorder with "
                               "GramRecorder(model, keep_blocks=True)")
        self.gram()                       # the same checks (measured, finite, after the block)
        return {(name or "<model>"): b for name, b in self._last.blocks.items()}

    def result(self):
        """The last step as a :class:`fimcore.GramResult` (Gram, gradient dtype, B, P, report,
        and the per-layer blocks when ``keep_blocks=True``); ``MeasureTracker.update`` takes it.
        """
        from fimcore import GramResult

        gram = self.gram()
        selected = {id(p): p for u in self._units for _, p in u.params if id(p) in u.selected}
        return GramResult(gram=gram, grad_dtype=self.grad_dtype, batch_size=self.batch_size,
                          num_params=sum(p.numel() for p in selected.values()),
                          blocks=self.blocks() if self.keep_blocks else None,
                          report=self.report(), loss_reduction=self.loss_reduction,
                          checked=True)  # G = Σ J Jᵀ formed here, its trace checked by gram()

    def report(self) -> Report:
        """Per-layer path taken in the last step and why (a list of :class:`LayerRecord`)."""
        rep = Report()
        step = self._last
        shares = {}
        if step is not None and step.blocks:
            traces = torch.stack([torch.trace(b) for b in step.blocks.values()]).double().cpu().tolist()
            for name, t in zip(step.blocks, traces):     # blocks are scaled already
                shares[id(step.block_units[name])] = t
        elif step is not None and step.marks:
            vals = torch.stack([t for _, t in step.marks]).double().cpu().tolist()
            prev = 0.0
            for (u, _), v in zip(step.marks, vals):
                shares[id(u)] = shares.get(id(u), 0.0) + (v - prev) * self._scale(step)
                prev = v
        comm = self._gather.report() if self._gather is not None and step is not None else None
        for u in self._units:
            u.record.trace = shares.get(id(u)) if u.calls else None
            layer = comm["layers"].get(u.name or "<model>") if comm else None
            u.record.gathered = layer["form"] if layer else None
            u.record.bytes_sent = layer["bytes"] if layer else None
            rep.append(u.record)
        rep.communication = comm
        return rep

    # ------------------------------------------------------------------ used by the units
    def _forward(self, unit, batch: int, dtype: torch.dtype | None = None, *,
                 source: str = "dim 0 of its input", seq_first: bool = False,
                 lead: tuple | None = None) -> None:
        """A unit's forward begins: check the step's state and the batch size.

        Args:
            source: where the unit read ``batch`` (for messages).
            seq_first: the unit declared its batch outside dim 0 (``batch_first=False``).
            lead: the input's leading dimensions when any of them could hold the batch (dim 0
                is taken as the batch; checked against a sequence-first module at the backward).
        """
        step = self._step
        if not self._active or step is None:
            return
        if step.backward_started:
            raise RuntimeError(
                f"module {unit.name or '<model>'!r} ran a forward after a backward inside one "
                "`with recorder:` block; use one block per step (forward, loss, one backward)")
        if step.batch is None:
            step.batch = int(batch)
            step.batch_src = (unit, source)
            if self._gather is not None and torch.is_grad_enabled():
                self._gather.exchange_sizes(step.batch, unit.params[0][1].device)
        elif int(batch) != step.batch:
            first, first_src = step.batch_src
            raise ValueError(
                f"the batch dimension (dim 0) must be the same in every covered layer; "
                f"{_where(first)} read B = {step.batch} from {first_src}, but {_where(unit)} read "
                f"{int(batch)} from {source}. Layers other than RNN/GRU/LSTM, MultiheadAttention and "
                "Transformer modules (which declare it with batch_first) take the batch in dim 0: "
                "make the model batch-first (batch_first=True on those modules and (B, …) tensors "
                "everywhere), or permute to (B, …) before the layer"
                + ("; a layer applied to a PackedSequence's data sees tokens, not samples, in dim 0: "
                   "apply it to the padded (B, T, …) tensor" if "packed" in first_src + source else ""))
        if seq_first:
            step.seq_first.append(unit)
        if lead is not None and sum(int(n) == step.batch for n in lead) > 1:
            step.ambiguous.append((unit, tuple(int(n) for n in lead)))
        if dtype is not None and step.grad_dtype is None:
            step.grad_dtype = dtype
        if torch.is_grad_enabled():          # a forward under no_grad has no backward to record
            unit.calls += 1
        step.stack.append(unit)

    def _forward_done(self, unit) -> None:
        step = self._step
        if step is not None and step.stack and step.stack[-1] is unit:
            step.stack.pop()

    def _backward(self, unit) -> _Step:
        """A unit's backward begins: check we are inside the block and that this is one backward."""
        step = self._step
        if not self._active or step is None:
            raise RuntimeError(
                f"a backward pass reached layer {unit.name or '<model>'!r} after its `with recorder:` "
                "block had ended; call loss.backward() inside the block")
        if not step.backward_started and step.seq_first and step.ambiguous:
            u, lead = step.ambiguous[0]
            s = step.seq_first[0]
            raise ValueError(
                f"{_where(u)} takes an input with leading dimensions {lead} in a step where "
                f"{_where(s)} declares its batch in dim 1 (batch_first=False); with B = {step.batch} "
                "in more than one of those dimensions the recorder cannot tell which one is the "
                f"batch of {u.name or '<model>'!r}, which takes dim 0. Make the model batch-first: "
                f"batch_first=True on {s.name or '<model>'!r} with (B, T, …) inputs, so that every "
                "layer sees the batch in dim 0")
        unit.bw_calls += 1
        if unit.bw_calls > unit.calls:
            raise RuntimeError(
                f"a second backward pass reached layer {unit.name or '<model>'!r} inside one "
                "`with recorder:` block; use one backward per block (per measured step)")
        step.backward_started = True
        return step

    def _cost_batch(self, batch: int) -> int:
        """The B a layer's cost model uses: the local one, or the global N under global scope
        (so that every rank picks the same path and hands over the same form)."""
        g = self._gather
        return batch if g is None or g.sizes is None else g.total

    def _pick_conv(self, unit, pick) -> str:
        """The per-sample convolution method of ``unit``: ``pick()``, or under global scope the
        one rank 0 picked for it (agreed once per layer: the methods lay the rows of J out in
        different column orders, and cross-rank products need one order)."""
        g = self._gather
        if g is None:
            return pick()
        method = g.agreed.get(unit.name)
        if method is None:
            method = g.agreed[unit.name] = g.agree(pick(), CONV_METHODS)
        return method

    def _multi_use(self, unit) -> bool:
        """True if a selected parameter of ``unit`` is used more than once in this step."""
        step = self._step
        if step.multi is None:            # the forward is complete once a backward runs
            step.multi = set()
            for u in self._units:
                for _, p in u.params:
                    if id(p) in u.selected and sum(v.calls for v in self._param_units[id(p)]) > 1:
                        step.multi.add(id(u))
        return id(unit) in step.multi

    def _acc(self, like: torch.Tensor, unit=None) -> torch.Tensor:
        """The buffer ``unit``'s contribution is added into: the step's G, or the unit's own
        block when blocks are kept."""
        step = self._step
        if step.grad_dtype is None:
            step.grad_dtype = like.dtype
        if self._gather is not None:
            raise RuntimeError(
                f"{_where(unit) if unit is not None else 'a layer'} added a local Gram contribution "
                "that scope='global' cannot gather across ranks; use scope='local' for this model, "
                "or strategy={'<that module>': 'materialize'}")
        if step.blocks is not None:
            if unit is None:
                raise RuntimeError("internal: a contribution reached the Gram without its layer")
            block = step.blocks.get(unit.name)
            if block is None:
                block = step.blocks[unit.name] = torch.zeros(
                    step.batch, step.batch, dtype=self.dtype or like.dtype, device=like.device)
                step.block_units[unit.name] = unit
            return block
        if step.acc is None:
            dt = self.dtype or like.dtype
            step.acc = torch.zeros(step.batch, step.batch, dtype=dt, device=like.device)
        return step.acc

    def _add_rows(self, unit, blocks) -> None:
        """Add ``Σ_k J_k J_kᵀ`` for per-sample blocks J_k of shape (B, n_k) (one or more parameters).

        ``blocks`` is a list of ``(parameter, J)``; for a parameter used more than once in the step
        J is accumulated until every use has reported, and its Gram is formed then.
        """
        step = self._step
        multi = self._multi_use(unit)
        for p, J in blocks:
            if J is None:
                continue
            if multi and sum(u.calls for u in self._param_units[id(p)]) > 1:
                self._pend(step, p, J)
                continue
            if self._gather is not None:
                if step.grad_dtype is None:
                    step.grad_dtype = J.dtype
                self._gather.add_rows(unit, J)
                continue
            acc = self._acc(J, unit)
            J = J.reshape(J.shape[0], -1)
            if J.dtype != acc.dtype:
                J = J.to(acc.dtype)
            add_outer(acc, J)
        self._mark(unit)

    def _add_gram(self, unit, K: torch.Tensor) -> None:
        """Add a ready (B, B) contribution."""
        acc = self._acc(K, unit)
        acc.add_(K.to(acc.dtype) if K.dtype != acc.dtype else K)
        self._mark(unit)

    def _mark(self, unit) -> None:
        step = self._step
        if step.blocks is None and step.acc is not None:
            step.marks.append((unit, torch.trace(step.acc)))

    def _pend(self, step: _Step, p, J: torch.Tensor) -> None:
        J = J.reshape(J.shape[0], -1)
        entry = step.pending.get(id(p))
        expected = sum(u.calls for u in self._param_units[id(p)])
        if entry is None:
            entry = step.pending[id(p)] = [J.clone(), 0, expected, p]
        else:
            entry[0].add_(J)
        entry[1] += 1
        if entry[1] >= entry[2]:
            self._flush_pending(step, entry)
            del step.pending[id(p)]

    def _flush_pending(self, step: _Step, entry) -> None:
        J, _, _, p = entry
        owner = self._param_units[id(p)][0]
        if self._gather is not None:
            self._gather.add_rows(owner, J)
            return
        acc = self._acc(J, owner)
        J = J if J.dtype == acc.dtype else J.to(acc.dtype)
        add_outer(acc, J)
        self._mark(owner)


def _where(unit) -> str:
    return f"layer {unit.name or '<model>'!r} ({type(unit.module).__name__})"
