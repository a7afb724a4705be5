"""Generic exact path for any module with trainable parameters and no layer rule.

The module runs normally in the user's forward; its inputs, its output and (for replay) the RNG
state are kept, and a hook on its output tensors receives the output gradients δ of the batch
backward. Its share of J is then formed with ``torch.func``:

* *separable* modules (each output sample depends only on the same input sample):
  ``vmap`` over samples of the VJP of the module applied to that one sample, with cotangent δ_i;
* *coupled* modules (the output of sample i depends on other samples, e.g. a custom batch
  normalisation, or randomness such as dropout inside the module): the VJP of the whole batch
  forward with the cotangent masked to sample i's slice, ``vmap``-ed over i. This is exactly the
  per-sample contribution of the batch backward (the contributions sum to the batch gradient,
  as for BatchNorm in train mode), at B times the module's backward cost.

Which case holds is checked once per module and train/eval mode: the per-sample forward must
reproduce the recorded batch output, and its parameter Jacobian that of the batch forward
(compared on one pseudo-random parameter tangent in forward mode: equal outputs alone miss a
parameter that multiplies a batch statistic and happens to be zero). Buffers are cloned for the re-run, so running statistics are
not updated twice, and the RNG state of the user's forward is replayed.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jvp, vjp, vmap
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_unflatten

from .layout import PACKED, Layout, declared_kind
from .registry import Unit

__all__ = ["GenericUnit"]


def _rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = (device, torch.cuda.get_rng_state(device))
    return state


class _Replay:
    def __init__(self, state):
        self.state = state

    def __enter__(self):
        self.saved = _rng_state(self.state.get("cuda", (None,))[0])
        torch.set_rng_state(self.state["cpu"])
        if "cuda" in self.state:
            torch.cuda.set_rng_state(self.state["cuda"][1], self.state["cuda"][0])

    def __exit__(self, *exc):
        torch.set_rng_state(self.saved["cpu"])
        if "cuda" in self.saved:
            torch.cuda.set_rng_state(self.saved["cuda"][1], self.saved["cuda"][0])
        return False


class GenericUnit(Unit):
    kind = "generic"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        prefix = self.name + "." if self.name else ""
        self.local = [(n[len(prefix):], p) for n, p in self.params]
        self.separable: dict[bool, bool] = {}
        self.replaying = False
        self.checked: set = set()
        self.why_coupled = ""

    def install(self, rec):
        self.rec = rec
        m = self.module
        pending = []

        def pre(module, args, kwargs):
            if self.replaying:
                return None
            dtype = self.params[0][1].dtype
            if declared_kind(module) is not None:
                layout = Layout(self.name, module, args, kwargs)
                how = ("a packed sequence" if layout.rows is not None else
                       f"dim {layout.seq_dim} of its sequence input (batch_first="
                       f"{layout.seq_dim == 0})")
                rec._forward(self, layout.batch, dtype, source=how,
                             seq_first=layout.seq_first_call)
            else:
                layout = None
                if any(isinstance(a, PackedSequence) for a in (*args, *kwargs.values())):
                    raise ValueError(
                        f"module {self.name or '<model>'!r} ({type(module).__name__}) takes a "
                        "PackedSequence; the recorder splits packed sequences by sample only for "
                        "nn.RNN/GRU/LSTM. Unpack it first (nn.utils.rnn.pad_packed_sequence with "
                        "batch_first=True) or exclude this module's parameters with params=...")
                leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                if leaves and leaves[0].dim() > 0:
                    rec._forward(self, leaves[0].shape[0], dtype, lead=tuple(leaves[0].shape[:-1]))
                else:
                    rec._forward(self, rec._step.batch or 0, dtype)
            pending.append((_rng_state(self.params[0][1].device), layout))

        def post(module, args, kwargs, out):
            if self.replaying:
                return None
            rec._forward_done(self)
            rng, layout = pending.pop() if pending else (None, None)
            if not rec._active:
                return None
            flat, spec = tree_flatten(out)
            pos = [k for k, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not pos:
                return None
            replaced = None
            if len(pos) > 1:
                # one output may be computed from another (LSTMCell: h' = o·tanh(c')), or returned
                # twice: a hook on the output itself would see the gradient through the module's own
                # use of it as well. Fresh aliases receive only the gradient from outside.
                flat = list(flat)
                for k in pos:
                    flat[k] = flat[k].view_as(flat[k])
                replaced = tree_unflatten(flat, spec)
            out_dims = layout.out_dims(out) if layout is not None else [0] * len(flat)
            # outputs are kept (cloned: a later in-place op may overwrite them) only while the
            # separable/coupled check for this train/eval mode is still to be made
            first = module.training not in self.checked
            outs = [flat[k].detach().clone() if first else None for k in pos]
            call = {"args": args, "kwargs": kwargs, "out": outs, "pos": pos, "rng": rng,
                    "layout": layout, "out_dims": [out_dims[k] for k in pos]}
            torch.autograd.graph.register_multi_grad_hook(
                [flat[k] for k in pos], lambda grads: self._grad(call, grads))
            return replaced

        return [m.register_forward_pre_hook(pre, with_kwargs=True),
                m.register_forward_hook(post, with_kwargs=True, always_call=True)]

    # ------------------------------------------------------------------
    def _functional(self, call, batch_leaves_one):
        """f(selected params, batched input leaves) -> output leaves of the recorded positions.

        Also returns the batched leaves and their batch dims: the declared ones for a module
        with a :class:`Layout`, else dim 0 of every tensor whose dim 0 has size B.
        """
        m = self.module
        flat, spec = tree_flatten((call["args"], call["kwargs"]))
        flat = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat]   # θ-gradients only
        B = self.rec._step.batch
        layout = call["layout"]
        if layout is not None:
            dims = layout.in_dims
        else:
            dims = [0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == B else None
                    for t in flat]
        batched = [k for k, d in enumerate(dims) if isinstance(d, int)]
        consts = {n: p.detach() for n, p in self.local if id(p) not in self.selected}
        buffers = dict(m.named_buffers())
        pos = call["pos"]

        def f(sel, *leaves):
            full = list(flat)
            for k, t in zip(batched, leaves):
                full[k] = t.unsqueeze(dims[k]) if batch_leaves_one else t
            a, kw = tree_unflatten(full, spec)
            fresh = {n: b.clone() for n, b in buffers.items()}   # the re-run must not update them
            out = functional_call(m, {**sel, **consts, **fresh}, a, kw, strict=False)
            out_flat, _ = tree_flatten(out)
            return tuple(out_flat[k] for k in pos)

        return f, [flat[k] for k in batched], [dims[k] for k in batched]

    def _grad(self, call, grads):
        self.rec._backward(self)
        self.replaying = True
        try:
            self._grad_body(call, grads)
        finally:
            self.replaying = False

    def _grad_body(self, call, grads):
        rec = self.rec
        m = self.module
        B = rec._step.batch
        sel = {n: p.detach() for n, p in self.local if id(p) in self.selected}
        reached = [k for k, g in enumerate(grads) if g is not None]
        if not reached:
            return
        cots = tuple(grads[k] for k in reached)
        call = dict(call, pos=[call["pos"][k] for k in reached], out=[call["out"][k] for k in reached])
        call["out_dims"] = [call["out_dims"][k] for k in reached]
        for c, d in zip(cots, call["out_dims"]):
            if d == PACKED or (d is not None and c.dim() > d and c.shape[d] == B):
                continue
            where = "dim 0" if call["layout"] is None else f"its declared batch dim {d}"
            raise ValueError(
                f"module {self.name or '<model>'!r} ({type(m).__name__}) returned an output of shape "
                f"{tuple(c.shape)} that the loss depends on, without the batch (B = {B}) in {where}; "
                "the generic path needs every output the loss uses to carry the batch (batch-first "
                "for modules that do not declare their batch dimension). Return batch-first "
                "outputs from this module, or exclude its parameters with params=...")
        chunk = None
        if rec.memory_budget is not None:
            per = sum(p.numel() for p in sel.values()) * next(iter(sel.values())).element_size()
            chunk = max(1, rec.memory_budget // max(per, 1))
        key = m.training
        res = None
        check = call["out"][0] is not None
        packed = call["layout"] is not None and call["layout"].rows is not None
        if packed:                      # variable lengths: no per-sample vmap
            res = self._coupled(call, sel, cots, chunk, check=check)
            self.set_path("generic-coupled", "packed sequence: masked batch VJP per sample "
                                             "(B × the module's backward)")
            by_name = dict(self.local)
            rec._add_rows(self, [(by_name[n], J.reshape(B, -1)) for n, J in res.items()])
            return
        if self.separable.get(key, True):
            try:
                self.why_coupled = "per-sample re-run differs from the batch output"
                res = self._per_sample(call, sel, cots, chunk, check=check)
            except (RuntimeError, ValueError) as exc:
                res = None
                self.why_coupled = f"per-sample vmap failed ({str(exc).splitlines()[0][:80]})"

            if check:
                self.separable[key] = res is not None
        if res is None:
            res = self._coupled(call, sel, cots, chunk, check=check)
        if check:
            self.checked.add(key)
        if not self.separable.get(key, True):
            self.set_path("generic-coupled", f"{self.why_coupled}: masked batch VJP per sample "
                                             "(B × the module's backward)")
        else:
            self.set_path("generic", "no layer rule: torch.func vmap over per-sample VJPs")
        by_name = dict(self.local)
        rec._add_rows(self, [(by_name[n], J.reshape(B, -1)) for n, J in res.items()])

    def _per_sample(self, call, sel, cots, chunk, check):
        f, leaves, in_dims = self._functional(call, batch_leaves_one=True)
        out_dims = call["out_dims"]

        def one(*xs):
            inputs, cot = xs[:len(leaves)], xs[len(leaves):]
            out, fn = vjp(lambda p: f(p, *inputs), sel)
            return fn(tuple(c.unsqueeze(d) for c, d in zip(cot, out_dims)))[0], out

        with torch.enable_grad():
            res, outs = vmap(one, in_dims=(*in_dims, *out_dims), chunk_size=chunk)(*leaves, *cots)
        if check:
            for o, ref, d in zip(outs, call["out"], out_dims):
                o = o.movedim(0, d)          # (…, B, 1, …): sample i's output in slot i of dim d
                if o.numel() != ref.numel() or not _close(o.reshape(ref.shape), ref):
                    return None
            if not self._same_parameter_jacobian(call, sel, f, leaves, in_dims, out_dims):
                self.why_coupled = "per-sample parameter Jacobian differs from the batch one"
                return None
        return res

    def _same_parameter_jacobian(self, call, sel, f, leaves, in_dims, out_dims) -> bool:
        """Whether ∂out_i/∂θ of the per-sample re-run equals that of the batch forward.

        Row i of the module's share of J is ``(∂out_i/∂θ)ᵀ δ_i`` with the *batch* forward's
        Jacobian; the per-sample VJP uses the one-sample forward's. Equal outputs do not imply
        equal Jacobians (``h·s + a·mean_b(h)`` at ``a = 0``), so both are applied to one fixed
        pseudo-random parameter tangent t (forward mode: ``∂out_i/∂θ · t`` for every i) and
        compared. Where an operation has no forward-mode rule (e.g. the CPU flash-attention
        kernel) the check runs in reverse mode instead: with one pseudo-random output
        cotangent v, ``Σ_i (∂out_i/∂θ)ᵀ v_i`` of the batch forward against the sum of the
        per-sample VJPs; the difference is ``ΔJᵀ v`` for the stacked Jacobian difference ΔJ,
        which vanishes for a random v only when ΔJ = 0. If neither mode runs, the module is
        treated as coupled (the masked batch VJP is exact either way).
        """
        gen = torch.Generator().manual_seed(0x5EED)

        def noise(t):
            return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

        f_batch, batch_leaves, _ = self._functional(call, batch_leaves_one=False)
        try:
            tangent = {n: noise(p) for n, p in sel.items()}

            def one(*xs):
                return jvp(lambda p: f(p, *xs), (sel,), (tangent,))[1]

            with torch.enable_grad(), _Replay(call["rng"]):
                _, batch = jvp(lambda p: f_batch(p, *batch_leaves), (sel,), (tangent,))
            per = vmap(one, in_dims=tuple(in_dims))(*leaves)
        except NotImplementedError:
            return self._same_parameter_vjp(call, sel, f, leaves, in_dims, out_dims, noise,
                                            f_batch, batch_leaves)
        except (RuntimeError, ValueError):
            return False
        for o, ref, d in zip(per, batch, out_dims):
            o = o.movedim(0, d)
            if o.numel() != ref.numel() or not _close(o.reshape(ref.shape), ref):
                return False
        return True

    def _same_parameter_vjp(self, call, sel, f, leaves, in_dims, out_dims, noise, f_batch,
                            batch_leaves) -> bool:
        """Reverse-mode form of :meth:`_same_parameter_jacobian` (one random cotangent)."""
        try:
            with torch.enable_grad(), _Replay(call["rng"]):
                out, fn = vjp(lambda p: f_batch(p, *batch_leaves), sel)
            cot = tuple(noise(o) for o in out)
            batch = fn(cot)[0]

            def one(*xs):
                inputs, c = xs[:len(leaves)], xs[len(leaves):]
                _, fn1 = vjp(lambda p: f(p, *inputs), sel)
                return fn1(tuple(ci.unsqueeze(d) for ci, d in zip(c, out_dims)))[0]

            with torch.enable_grad():
                per = vmap(one, in_dims=(*in_dims, *out_dims))(*leaves, *cot)
        except (RuntimeError, NotImplementedError, ValueError):
            return False
        return all(_close(per[n].sum(0), batch[n]) for n in batch)

    def _coupled(self, call, sel, cots, chunk, check):
        f, leaves, _ = self._functional(call, batch_leaves_one=False)
        B = self.rec._step.batch
        rows = call["layout"].rows if call["layout"] is not None else None
        masks = []
        for c, d in zip(cots, call["out_dims"]):
            shape = [1] * c.dim()
            if d == PACKED:             # row r of the packed data belongs to sample rows[r]
                shape[0] = -1
                masks.append((rows.to(c.device), shape))
            else:
                shape[d] = B
                masks.append((None, shape))

        def masked(e):
            return tuple(c * (e if r is None else e[r]).view(shape) for c, (r, shape) in zip(cots, masks))

        eye = torch.eye(B, dtype=cots[0].dtype, device=cots[0].device)
        if rows is not None:
            # the packed-sequence RNN kernels do not run under torch.func transforms: plain
            # autograd, one masked backward per sample
            return self._coupled_autograd(call, f, leaves, sel, eye, masked, check)
        with torch.enable_grad(), _Replay(call["rng"]):
            out, fn = vjp(lambda p: f(p, *leaves), sel)
        if check:
            self._check_replay(out, call["out"])
        return vmap(lambda e: fn(masked(e))[0], chunk_size=chunk)(eye)

    def _coupled_autograd(self, call, f, leaves, sel, eye, masked, check):
        params = {n: p.detach().requires_grad_() for n, p in sel.items()}
        with torch.enable_grad(), _Replay(call["rng"]):
            out = f(params, *leaves)
        if check:
            self._check_replay(out, call["out"])
        names = list(params)
        per = []
        for e in eye:
            g = torch.autograd.grad(out, [params[n] for n in names], grad_outputs=masked(e),
                                    retain_graph=True, allow_unused=True)
            per.append([torch.zeros_like(params[n]) if x is None else x for n, x in zip(names, g)])
        return {n: torch.stack([r[k] for r in per]) for k, n in enumerate(names)}

    def _check_replay(self, out, ref) -> None:
        for o, r in zip(out, ref):
            if not _close(o, r):
                raise RuntimeError(
                    f"module {self.name or '<model>'!r} ({type(self.module).__name__}) did not "
                    "reproduce its output when re-run with the same inputs, parameters and RNG "
                    "state; its per-sample contributions cannot be formed exactly. Make its "
                    "forward deterministic or exclude its parameters with params=...")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    eps = torch.finfo(b.dtype).eps if b.dtype.is_floating_point else 0.0
    tol = 1e3 * eps
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max()) if b.numel() else 0.0))
