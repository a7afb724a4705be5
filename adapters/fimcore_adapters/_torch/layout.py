"""Where the batch sits in the tensors of modules that declare it (not always dim 0).

Recurrent modules (``nn.RNN``/``nn.GRU``/``nn.LSTM``; their cells are batch-first by
definition), ``nn.MultiheadAttention`` and the ``nn.Transformer*`` modules say where their batch
is: ``batch_first=False`` puts it in dim 1 of the sequence tensors, hidden states are
``(layers, B, H)`` whatever ``batch_first`` says, key padding masks and attention weights are
batch-first, and a ``PackedSequence`` holds sample ``sorted_indices[k]`` in row k of each time
step's block of ``batch_sizes[t]`` rows. A :class:`Layout` records that, per tensor of one call,
for the generic path: it splits inputs and masks cotangents along the declared dimension, never
along a dimension guessed from shapes. Unbatched calls (a 2-D sequence input, a 1-D cell input)
are refused: a per-sample Gram needs a batch."""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import GetAttrKey, MappingKey, SequenceKey, tree_flatten_with_path

__all__ = ["PACKED", "Layout", "declared_kind", "seq_first", "TRANSFORMER_TYPES"]

PACKED = "packed"      # the rows of a PackedSequence's data, mapped to samples by ``Layout.rows``

TRANSFORMER_TYPES: tuple[type, ...] = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                                       nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_SEQ_ARGS = {"rnn": ("input",), "cell": ("input",), "attention": ("query", "key", "value"),
             "transformer": ("src", "tgt", "memory")}
_SHAPES = {"rnn": "(T, B, features) with batch_first=False or (B, T, features) with batch_first=True, "
                  "or a PackedSequence",
           "cell": "(B, features)",
           "attention": "(L, B, E) with batch_first=False or (B, L, E) with batch_first=True",
           "transformer": "(S, B, E) with batch_first=False or (B, S, E) with batch_first=True"}


def declared_kind(module: nn.Module) -> str | None:
    """``"rnn"``, ``"cell"``, ``"attention"`` or ``"transformer"`` for modules that declare their batch dim."""
    if isinstance(module, nn.RNNBase):
        return "rnn"
    if isinstance(module, nn.RNNCellBase):
        return "cell"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    if isinstance(module, TRANSFORMER_TYPES):
        return "transformer"
    return None


def _batch_first(module: nn.Module) -> bool:
    if isinstance(module, nn.RNNCellBase):
        return True
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return bool(module.layers[0].self_attn.batch_first) if len(module.layers) else True
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    return bool(module.batch_first)


def seq_first(module: nn.Module) -> bool:
    """True for a module that declares its sequence tensors batch-second (``batch_first=False``)."""
    return declared_kind(module) is not None and not _batch_first(module)


@lru_cache(maxsize=None)
def _positional_names(cls: type) -> tuple[str, ...]:
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return tuple(p.name for p in params
                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


class Layout:
    """Batch dimension of every tensor of one call of a declaring module.

    Attributes:
        kind: ``"rnn"``, ``"cell"``, ``"attention"`` or ``"transformer"``.
        seq_dim: the batch dim of the sequence tensors (0 if ``batch_first`` else 1).
        in_dims: per leaf of ``tree_flatten((args, kwargs))``: an int dim, :data:`PACKED` or None
            (a tensor without batch, e.g. an attention mask, or not a tensor).
        batch: B.
        rows: for a packed input, the sample index of every row of its data (else None).
    """

    def __init__(self, unit_name: str, module: nn.Module, args, kwargs):
        self.kind = declared_kind(module)
        self.module = module
        self.where = f"module {unit_name or '<model>'!r} ({type(module).__name__})"
        self.seq_dim = 0 if _batch_first(module) else 1
        self.rows: torch.Tensor | None = None
        names = _positional_names(type(module))
        first = args[0] if args else kwargs.get(names[0] if names else "input")
        if isinstance(first, PackedSequence):
            self.rows = packed_rows(first)
            self.packed_batch = int(first.batch_sizes[0])
        leaves = tree_flatten_with_path((args, kwargs))[0]
        self.in_dims = []
        sizes = []
        for path, leaf in leaves:
            if path[0] == SequenceKey(0):
                k = path[1].idx
                arg = names[k] if k < len(names) else f"argument {k}"
            else:
                arg = path[1].key if isinstance(path[1], MappingKey) else str(path[1])
            d = self._input_dim(arg, path[2:], leaf)
            self.in_dims.append(d)
            if isinstance(d, int):
                sizes.append((arg, leaf.shape[d]))
        if self.rows is not None:
            self.batch = self.packed_batch
        elif sizes:
            self.batch = int(sizes[0][1])
        else:
            raise ValueError(
                f"{self.where} was called without a batched tensor input; pass "
                f"{' / '.join(_SEQ_ARGS[self.kind])} as {_SHAPES[self.kind]}. The batch is read from "
                "the arguments named as in torch's own forward; a subclass whose forward takes "
                f"other names (here {names}) must keep torch's names or wrap the module instead")
        bad = [(a, s) for a, s in sizes if s != self.batch]
        if bad:
            raise ValueError(f"{self.where}: its inputs disagree on the batch size (B = {self.batch} "
                             f"in the first, {bad} elsewhere, read along their declared batch "
                             "dimensions); pass every input with the same batch")
        self.seq_first_call = self.seq_dim != 0 and self.rows is None

    def _input_dim(self, arg: str, rest, leaf):
        if not isinstance(leaf, torch.Tensor):
            return None
        kind = self.kind
        if arg in _SEQ_ARGS[kind]:
            if rest and isinstance(rest[0], GetAttrKey):       # a PackedSequence's fields
                if rest[0].name != "data":
                    return None
                return PACKED
            if leaf.dim() != (2 if kind == "cell" else 3):
                raise ValueError(
                    f"{self.where} got an unbatched {arg} of shape {tuple(leaf.shape)}; a per-sample "
                    f"Gram matrix needs a batch: pass {arg} as {_SHAPES[kind]}")
            return self.seq_dim
        if kind == "cell" and arg == "hx":
            if leaf.dim() != 2:
                raise ValueError(f"{self.where} got an unbatched hx of shape {tuple(leaf.shape)}; pass "
                                 "hx as (B, hidden) with a batched input")
            return 0
        if kind == "rnn" and arg == "hx":
            if leaf.dim() != 3:
                raise ValueError(f"{self.where} got an unbatched hx of shape {tuple(leaf.shape)}; pass "
                                 "hx as (num_layers · directions, B, hidden) with a batched input")
            return 1                                           # (layers, B, H) for any batch_first
        if arg.endswith("key_padding_mask"):
            return 0                                           # (B, S) for any batch_first
        return None                                            # masks, flags: shared by the batch

    def out_dims(self, out) -> list:
        """Per leaf of ``tree_flatten(out)``: its batch dim, :data:`PACKED` or None."""
        dims = []
        for path, leaf in tree_flatten_with_path(out)[0]:
            if not isinstance(leaf, torch.Tensor):
                dims.append(None)
                continue
            top = path[0].idx if path and isinstance(path[0], SequenceKey) else None
            if self.kind == "rnn":
                if top == 0:
                    if len(path) > 1 and isinstance(path[1], GetAttrKey):
                        dims.append(PACKED if path[1].name == "data" else None)
                    else:
                        dims.append(self.seq_dim)
                else:
                    dims.append(1)                              # h_n (and c_n): (layers, B, H)
            elif self.kind == "cell":
                dims.append(0)                                  # h' (and c'): (B, hidden)
            elif self.kind == "attention":
                dims.append(self.seq_dim if top == 0 else 0)    # attention weights: (B, L, S)
            else:
                dims.append(self.seq_dim)
        return dims


def packed_rows(seq: PackedSequence) -> torch.Tensor:
    """Sample index of every row of ``seq.data``: time step t holds sorted samples 0..batch_sizes[t]-1."""
    order = seq.sorted_indices
    if order is None:
        order = torch.arange(int(seq.batch_sizes[0]), device=seq.data.device)
    return torch.cat([order[:int(n)] for n in seq.batch_sizes])
