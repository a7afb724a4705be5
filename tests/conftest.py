"""Shared test configuration: array backends, frameworks, Hypothesis profiles.

Backends
    The ``xp`` fixture runs a test once per array namespace (numpy, array_api_strict,
    torch, jax.numpy); the ``framework`` fixture once per framework (torch, jax,
    tensorflow). Whether a library that is not installed skips or fails is decided in one
    place, ``tests/_backends.py`` (``FIMCORE_TEST_BACKENDS``, ``CI``), for these fixtures,
    for :func:`import_backend` in tests and for module-level imports (root ``conftest.py``).

JAX
    float64 is switched on once here (``jax_enable_x64``) when jax is installed, so the
    exactness tests compare float64 against float64 in every backend.

Hypothesis
    Profiles ``ci`` (derandomised, no deadline, 50 examples, failing examples printed as
    reproduction blobs) and ``dev`` (no deadline: first calls compile in JAX/torch; 25
    examples). ``ci`` is loaded when ``CI`` is set, ``dev`` otherwise;
    ``HYPOTHESIS_PROFILE`` overrides both.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
from hypothesis import HealthCheck, settings

from tests._backends import KNOWN, import_backend, required_backends  # noqa: F401  (re-exported)


# --- Hypothesis ---------------------------------------------------------------------------

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=50,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)

# --- backends -----------------------------------------------------------------------------

#: array namespaces of the ``xp`` fixture: test id -> module to import
# Scripts the tests start as child processes: they read argv and configure devices when imported,
# so --doctest-modules must not import them.
collect_ignore = ["adapters/_tensorflow_mirrored_child.py"]

ARRAY_BACKENDS = {
    "numpy": "numpy",
    "array_api_strict": "array_api_strict",
    "torch": "torch",
    "jax.numpy": "jax.numpy",
}
#: frameworks of the ``framework`` fixture: test id -> module to import
FRAMEWORKS = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}


def pytest_configure(config: pytest.Config) -> None:
    required_backends()  # fail early on a misspelt backend name


def _enable_jax_x64() -> None:
    try:
        jax = importlib.import_module("jax")
    except ImportError:
        return
    jax.config.update("jax_enable_x64", True)


_enable_jax_x64()


def array_namespace_of(module_name: str) -> ModuleType:
    """The array-API namespace for a backend module (numpy and torch via array_api_compat)."""
    module = import_backend(module_name)
    if module_name in ("numpy", "torch"):
        import array_api_compat

        return array_api_compat.array_namespace(module.asarray(0.0))
    return module


@pytest.fixture(scope="session", params=list(ARRAY_BACKENDS), ids=list(ARRAY_BACKENDS))
def xp(request: pytest.FixtureRequest) -> ModuleType:
    """An array-API namespace: numpy, array_api_strict, torch or jax.numpy."""
    return array_namespace_of(ARRAY_BACKENDS[request.param])


@pytest.fixture(scope="session", params=list(FRAMEWORKS), ids=list(FRAMEWORKS))
def framework(request: pytest.FixtureRequest) -> ModuleType:
    """A deep-learning framework module: torch, jax or tensorflow."""
    return import_backend(FRAMEWORKS[request.param])
