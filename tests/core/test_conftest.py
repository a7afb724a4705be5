"""The backend selection rules of tests/conftest.py (required vs skipped backends)."""

from __future__ import annotations

import pytest

from tests import conftest


@pytest.mark.parametrize(
    ("env", "ci", "expected"),
    [
        (None, None, set()),
        (None, "true", conftest.KNOWN),
        ("all", None, conftest.KNOWN),
        ("numpy, jax.numpy,tf", "true", {"numpy", "jax", "tensorflow"}),
        ("", "true", set()),
    ],
)
def test_required_backends_from_environment(monkeypatch, env, ci, expected):
    for name, value in (("FIMCORE_TEST_BACKENDS", env), ("CI", ci)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert conftest.required_backends() == expected


def test_unknown_backend_name_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("FIMCORE_TEST_BACKENDS", "numpy,cupyy")
    with pytest.raises(pytest.UsageError, match="unknown \\['cupyy'\\]"):
        conftest.required_backends()


def test_missing_backend_skips_unless_required(monkeypatch):
    missing = "numpy._fimcore_no_such_module"
    monkeypatch.setenv("FIMCORE_TEST_BACKENDS", "torch")
    with pytest.raises(pytest.skip.Exception):
        conftest.import_backend(missing)
    monkeypatch.setenv("FIMCORE_TEST_BACKENDS", "numpy")
    with pytest.raises(ImportError, match="required by FIMCORE_TEST_BACKENDS"):
        conftest.import_backend(missing)
