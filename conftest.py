"""Collection of every test and doctest module through the backend policy of ``tests/_backends.py``.

Each collected Python file (a test module, or a module of ``fimcore``/``fimcore_adapters`` for
its doctests) is imported here first, when pytest collects it. If that import fails because an
optional library is missing, the module is skipped, or, when the library is required
(``FIMCORE_TEST_BACKENDS``, ``CI``), its collection fails with the reason. Any other import
error is left to pytest, which reports it as usual.

``FIMCORE_TEST_HIDE=jax,flax`` makes the listed libraries unimportable for the run, to check
this policy on a partial install without uninstalling anything.

TensorFlow: ``TF_ENABLE_ONEDNN_OPTS=1`` is set (unless already set) before anything imports
it: the oneDNN kernels hold the grouped filter gradient the float32 convolution rule uses,
and TensorFlow enables them by default only on CPUs with AVX-512 neural-network
instructions. The fallback without them is tested by switching the probe off.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

from tests import _backends

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # before any import of TensorFlow
_backends.hide(os.environ.get("FIMCORE_TEST_HIDE", ""))


def _module_name(path: Path) -> tuple[str, Path]:
    """Dotted module name of a file and the directory its top package sits in."""
    parts = [path.stem]
    directory = path.parent
    while (directory / "__init__.py").exists():
        parts.insert(0, directory.name)
        directory = directory.parent
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts), directory


def _missing_backend(path: Path) -> tuple[str, ImportError] | None:
    """(backend, error) when importing the module fails for a missing optional library."""
    name, base = _module_name(path)
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))  # as pytest's default import mode does
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top in _backends.KNOWN:
            return top, exc
    except (Exception, pytest.skip.Exception):  # noqa: BLE001 - pytest reports any other outcome
        pass
    return None


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    collectors = yield
    if file_path.suffix != ".py" or file_path.name == "conftest.py":
        return collectors
    for collector in collectors:  # the check runs when the module is collected, not listed
        collector.collect = _through_policy(collector.collect, file_path, parent.config.rootpath)
    return collectors


def _through_policy(collect, path: Path, root: Path):
    def collect_unless_a_backend_is_missing():
        found = _missing_backend(path)
        if found is not None:
            _backends.missing(*found, where=str(path.relative_to(root)))
        return collect()

    return collect_unless_a_backend_is_missing
