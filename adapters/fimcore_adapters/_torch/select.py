"""The ``params=`` filter of a recorder: which trainable parameters are columns of J."""

from __future__ import annotations

from torch import nn

__all__ = ["select_parameters"]


def select_parameters(model: nn.Module, params) -> list[int]:
    """ids of the selected trainable parameters."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (none with requires_grad=True); "
                         "there is no gradient to measure")
    if params is None:
        return [id(p) for _, p in trainable]
    if isinstance(params, (str, nn.Module, nn.Parameter)):
        params = [params]
    by_name = dict(trainable)
    modules = dict(model.named_modules())
    ids: list[int] = []
    for entry in params:
        if isinstance(entry, nn.Parameter):
            if not any(entry is p for _, p in trainable):
                raise ValueError("a parameter passed in params= is not a trainable parameter of the model")
            ids.append(id(entry))
        elif isinstance(entry, nn.Module):
            found = [p for p in entry.parameters() if p.requires_grad]
            if not any(entry is m for m in modules.values()) or not found:
                raise ValueError(f"module {type(entry).__name__} in params= is not a submodule of the "
                                 "model with trainable parameters")
            ids.extend(id(p) for p in found)
        elif isinstance(entry, str):
            if entry in by_name:
                ids.append(id(by_name[entry]))
            elif entry in modules:
                found = [p for p in modules[entry].parameters() if p.requires_grad]
                if not found:
                    raise ValueError(f"module {entry!r} in params= has no trainable parameters")
                ids.extend(id(p) for p in found)
            else:
                raise ValueError(f"params= entry {entry!r} names neither a trainable parameter nor a "
                                 f"module of the model; parameter names look like {next(iter(by_name))!r}")
        else:
            raise TypeError(f"params= entries must be names, modules or parameters; received {type(entry).__name__}")
    if not ids:
        raise ValueError("params= selects no trainable parameter; pass at least one")
    return list(dict.fromkeys(ids))
