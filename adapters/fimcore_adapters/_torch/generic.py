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
reproduce the recorded batch output. Buffers are cloned for the re-run, so running statistics are
not updated twice, and the RNG state of the user's forward is replayed.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .units import Unit

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
        pending_rng = []

        def pre(module, args, kwargs):
            if self.replaying:
                return None
            leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            b = leaves[0].shape[0] if leaves and leaves[0].dim() > 0 else None
            dev = self.params[0][1].device
            if b is not None:
                rec._forward(self, b, self.params[0][1].dtype)
            else:
                rec._forward(self, rec._step.batch or 0, self.params[0][1].dtype)
            pending_rng.append(_rng_state(dev))

        def post(module, args, kwargs, out):
            if self.replaying:
                return None
            rec._forward_done(self)
            rng = pending_rng.pop() if pending_rng else None
            if not rec._active:
                return None
            flat, _ = tree_flatten(out)
            pos = [k for k, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not pos:
                return None
            # outputs are kept (cloned: a later in-place op may overwrite them) only while the
            # separable/coupled check for this train/eval mode is still to be made
            first = module.training not in self.checked
            outs = [flat[k].detach().clone() if first else None for k in pos]
            call = {"args": args, "kwargs": kwargs, "out": outs,
                    "pos": pos, "rng": rng}
            torch.autograd.graph.register_multi_grad_hook(
                [flat[k] for k in pos], lambda grads: self._grad(call, grads))
            return None

        return [m.register_forward_pre_hook(pre, with_kwargs=True),
                m.register_forward_hook(post, with_kwargs=True, always_call=True)]

    # ------------------------------------------------------------------
    def _functional(self, call, batch_leaves_one):
        """f(selected params, batched input leaves) -> output leaves of the recorded positions."""
        m = self.module
        flat, spec = tree_flatten((call["args"], call["kwargs"]))
        B = self.rec._step.batch
        batched = [k for k, t in enumerate(flat)
                   if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == B]
        consts = {n: p.detach() for n, p in self.local if id(p) not in self.selected}
        buffers = dict(m.named_buffers())
        pos = call["pos"]

        def f(sel, *leaves):
            full = list(flat)
            for k, t in zip(batched, leaves):
                full[k] = t.unsqueeze(0) if batch_leaves_one else t
            a, kw = tree_unflatten(full, spec)
            fresh = {n: b.clone() for n, b in buffers.items()}   # the re-run must not update them
            out = functional_call(m, {**sel, **consts, **fresh}, a, kw, strict=False)
            out_flat, _ = tree_flatten(out)
            return tuple(out_flat[k] for k in pos)

        return f, [flat[k] for k in batched]

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
        for c in cots:
            if c.dim() == 0 or c.shape[0] != B:
                raise ValueError(
                    f"module {self.name or '<model>'!r} ({type(m).__name__}) returned an output of shape "
                    f"{tuple(c.shape)} that the loss depends on, without the batch (B = {B}) in dim 0; the "
                    "generic path needs batch-first outputs (set batch_first=True where offered)")
        chunk = None
        if rec.memory_budget is not None:
            per = sum(p.numel() for p in sel.values()) * next(iter(sel.values())).element_size()
            chunk = max(1, rec.memory_budget // max(per, 1))
        key = m.training
        res = None
        check = call["out"][0] is not None
        if self.separable.get(key, True):
            try:
                res = self._per_sample(call, sel, cots, chunk, check=check)
                self.why_coupled = "per-sample re-run differs from the batch output"
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
        f, leaves = self._functional(call, batch_leaves_one=True)

        def one(*xs):
            inputs, cot = xs[:len(leaves)], xs[len(leaves):]
            out, fn = vjp(lambda p: f(p, *inputs), sel)
            return fn(tuple(c.unsqueeze(0) for c in cot))[0], out

        with torch.enable_grad():
            res, outs = vmap(one, chunk_size=chunk)(*leaves, *cots)
        if check:
            for o, ref in zip(outs, call["out"]):
                if o.shape[0] != ref.shape[0] or not _close(o.reshape(ref.shape), ref):
                    return None
        return res

    def _coupled(self, call, sel, cots, chunk, check):
        f, leaves = self._functional(call, batch_leaves_one=False)
        B = self.rec._step.batch
        with torch.enable_grad(), _Replay(call["rng"]):
            out, fn = vjp(lambda p: f(p, *leaves), sel)
        if check:
            for o, ref in zip(out, call["out"]):
                if not _close(o, ref):
                    raise RuntimeError(
                        f"module {self.name or '<model>'!r} ({type(self.module).__name__}) did not "
                        "reproduce its output when re-run with the same inputs, parameters and RNG "
                        "state; its per-sample contributions cannot be formed exactly. Make its "
                        "forward deterministic or exclude its parameters with params=...")
        eye = torch.eye(B, dtype=cots[0].dtype, device=cots[0].device)

        def one(e):
            return fn(tuple(c * e.view(B, *([1] * (c.dim() - 1))) for c in cots))[0]

        return vmap(one, chunk_size=chunk)(eye)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    eps = torch.finfo(b.dtype).eps if b.dtype.is_floating_point else 0.0
    tol = 1e3 * eps
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max()) if b.numel() else 0.0))
