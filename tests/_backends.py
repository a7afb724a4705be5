"""The one skip policy for every optional library the test suite uses.

A library the suite can run without is a *backend* here: the array libraries and frameworks,
the oracles and baselines (BackPACK, Opacus, TorchJD), and the packages of the optional extras
(``reference``, ``tensorboard``, ``lightning``, ``distributed``). A test reaches one either

* by importing it at module level (``import torch``): the root ``conftest.py`` imports every
  collected module first and, when that fails because a backend is missing, replaces the
  module by a collector that applies this policy; or
* by calling :func:`import_backend` inside a test (or a fixture).

``pytest.importorskip`` and ``except ImportError`` are not used in the tests (a test checks
that): they would skip a missing library even where it is required.

Policy: a missing backend skips, unless it is *required*. ``FIMCORE_TEST_BACKENDS`` names the
required ones (comma list, e.g. ``numpy,torch``, or ``all``); when it is unset and ``CI`` is
set, all are required. A required backend that fails to import fails the test (or the module's
collection), never skips.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

#: every optional library the tests import, by its top-level module name
KNOWN = frozenset({
    "numpy", "array_api_strict", "scipy",                      # arrays
    "torch", "jax", "flax", "optax", "tensorflow", "keras",   # frameworks
    "backpack", "einops", "unfoldNd", "opacus", "torchjd",     # oracles and baselines
    "matplotlib", "tqdm", "mlxtend",                           # reference_training
    "tensorboard", "lightning", "submitit",                    # the other extras
})
_ALIASES = {"jax.numpy": "jax", "jnp": "jax", "tf": "tensorflow", "strict": "array_api_strict",
            "backpack-for-pytorch": "backpack", "tensorflow-cpu": "tensorflow"}


def required_backends() -> set[str]:
    """Libraries whose import failure must fail the tests (from the environment)."""
    raw = os.environ.get("FIMCORE_TEST_BACKENDS")
    if raw is None:
        raw = "all" if os.environ.get("CI") else ""
    names = {_ALIASES.get(n.strip(), n.strip()) for n in raw.split(",") if n.strip()}
    if "all" in names:
        return set(KNOWN)
    unknown = names - KNOWN
    if unknown:
        raise pytest.UsageError(
            f"FIMCORE_TEST_BACKENDS must list names from {sorted(KNOWN)} or 'all'; "
            f"received unknown {sorted(unknown)}."
        )
    return names


def backend_of(module_name: str) -> str:
    """The backend a module belongs to (its top-level package); ValueError when not optional."""
    top = module_name.split(".")[0]
    if top not in KNOWN:
        raise ValueError(
            f"{module_name!r} is not an optional library of the test suite; add its top-level "
            f"package to KNOWN in tests/_backends.py (known: {sorted(KNOWN)})."
        )
    return top


def missing(backend: str, exc: ImportError, *, where: str = "") -> None:
    """Apply the policy to a backend that failed to import: skip, or raise when required."""
    at = f"{where}: " if where else ""
    if backend in required_backends():
        raise ImportError(
            f"{at}backend {backend!r} is required by FIMCORE_TEST_BACKENDS/CI but failed to "
            f"import: {exc}"
        ) from exc
    pytest.skip(f"{at}{backend} is not installed", allow_module_level=True)


def import_backend(module_name: str) -> ModuleType:
    """Import a backend module; skip when absent unless required (then an ImportError)."""
    backend = backend_of(module_name)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        missing(backend, exc)
        raise  # unreachable: missing() skips or raises


def hide(names: str) -> list[str]:
    """Make the comma-listed backends unimportable in this process (``sys.modules[name] = None``).

    For checking the policy on a partial install (``FIMCORE_TEST_HIDE``). Raises
    ``pytest.UsageError`` for a name that is not a backend or was already imported.
    """
    import sys

    hidden = [n.strip() for n in names.split(",") if n.strip()]
    for name in hidden:
        if name not in KNOWN:
            raise pytest.UsageError(f"FIMCORE_TEST_HIDE lists {name!r}, not one of {sorted(KNOWN)}.")
        if sys.modules.get(name) is not None:
            raise pytest.UsageError(f"FIMCORE_TEST_HIDE: {name!r} was imported before the root conftest.")
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ModuleNotFoundError
    return hidden
