"""Old option and attribute spellings of the JAX and TensorFlow adapters, kept working.

The three adapters share one set of public names (``strategy``, ``params``, ``keep_blocks``,
``report()``, ``result()``). Where the JAX or TensorFlow adapter used another spelling before,
the old one still works and emits a ``DeprecationWarning`` naming the new one:

==========================================  ============================================
old spelling                                common spelling
==========================================  ============================================
``FlaxGram(dense_form="materialised")``     ``FlaxGram(strategy="materialize")``
``GramTape(mode="registry" | "generic")``   ``GramTape(strategy="auto" | "generic")``
``GramTape(layers=...)``                    ``GramTape(params=...)``
``FlaxGram.report`` / ``GramTape.report``   ``.report()`` (a :class:`fimcore.layers.Report`)
read as a dict / a list of tuples
==========================================  ============================================
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["LegacyReportDict", "LegacyReportList", "deprecated"]


def deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is an old spelling of ``new``."""
    warnings.warn(f"{old} is deprecated; use {new} (same meaning).", DeprecationWarning,
                  stacklevel=stacklevel)


def _warn_on(names, message):
    def wrap(method):
        def inner(self, *args, **kwargs):
            warnings.warn(message.format(owner=self._owner), DeprecationWarning, stacklevel=2)
            return method(self, *args, **kwargs)

        inner.__name__ = method.__name__
        return inner

    def decorate(cls):
        for name in names:
            setattr(cls, name, wrap(getattr(cls.__mro__[1], name)))
        return cls

    return decorate


_DICT_ACCESS = ("__getitem__", "__iter__", "__len__", "__contains__", "__eq__", "__ne__", "keys",
                "values", "items", "get")
_LIST_ACCESS = ("__getitem__", "__iter__", "__len__", "__contains__", "__eq__", "__ne__")
_MESSAGE = ("reading {owner}.report as a {kind} is deprecated; call {owner}.report(), which "
            "returns a fimcore.layers.Report (records with .name, .path, .reason; .paths() maps "
            "layer names to paths).")


@_warn_on(_DICT_ACCESS, _MESSAGE.replace("{kind}", "dict {{layer: description}}"))
class LegacyReportDict(dict):
    """``{layer: description}`` as the old ``FlaxGram.report`` attribute gave it; calling it
    returns the :class:`fimcore.layers.Report` without a warning."""

    def __init__(self, data: dict, report: Any, owner: str):
        super().__init__(data)
        self._report, self._owner = report, owner

    def __call__(self):
        return self._report

    __hash__ = None


@_warn_on(_LIST_ACCESS, _MESSAGE.replace("{kind}", "list of (name, type, path) tuples"))
class LegacyReportList(list):
    """``[(layer name, layer type, path)]`` as the old ``GramTape.report`` attribute gave it;
    calling it returns the :class:`fimcore.layers.Report` without a warning."""

    def __init__(self, data: list, report: Any, owner: str):
        super().__init__(data)
        self._report, self._owner = report, owner

    def __call__(self):
        return self._report

    __hash__ = None
