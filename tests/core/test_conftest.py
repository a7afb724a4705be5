"""The backend selection rules of tests/conftest.py (required vs skipped backends)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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


# --- the policy end to end: a partial install, simulated by hiding libraries ----------------

ROOT = Path(__file__).resolve().parents[2]
OPTIONAL = sorted(conftest.KNOWN - {"numpy"})


def _pytest(args, *, hide, ci):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "FIMCORE_TEST_BACKENDS")}
    env["FIMCORE_TEST_HIDE"] = ",".join(hide)
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_whole_suite_collects_without_the_optional_libraries_and_fails_under_ci():
    """Every test and doctest module, with only numpy of the optional libraries: no collection
    error without CI (modules needing a missing library are reported as skipped), a collection
    error naming the requirement with CI=true."""
    partial = _pytest(["--collect-only"], hide=OPTIONAL, ci=False)
    assert partial.returncode == 0, partial.stdout[-3000:] + partial.stderr[-2000:]
    assert not re.search(r"\d+ errors?\b|^ERROR ", partial.stdout, re.MULTILINE), partial.stdout[-3000:]
    assert "skipped" in partial.stdout and "torch is not installed" in partial.stdout
    strict = _pytest(["--collect-only"], hide=OPTIONAL, ci=True)
    assert strict.returncode not in (0, 5), strict.stdout[-3000:]
    assert "required by FIMCORE_TEST_BACKENDS/CI" in strict.stdout


def test_missing_backend_skips_cleanly_or_fails_the_run_under_ci():
    """The issue's case: jax, flax and BackPACK absent. Module-level imports (test_jax.py and the
    JAX adapter's doctests) and an import inside a test (the BackPACK oracle) skip and the run
    exits 0; with CI=true the same run fails."""
    args = ["tests/adapters/test_jax.py", "adapters/fimcore_adapters/jax.py",
            "tests/adapters/test_torch_exact.py::test_batchnorm_train_against_backpack_batchgrad"]
    hide = ["jax", "flax", "backpack"]
    partial = _pytest(args, hide=hide, ci=False)
    assert partial.returncode == 0, partial.stdout[-3000:] + partial.stderr[-2000:]
    summary = partial.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ skipped in .*", summary), partial.stdout[-2000:]
    for reason in ("tests/adapters/test_jax.py: jax is not installed",
                   "adapters/fimcore_adapters/jax.py: jax is not installed", "backpack is not installed"):
        assert reason in partial.stdout, partial.stdout[-2000:]
    strict = _pytest(args, hide=hide, ci=True)
    assert strict.returncode not in (0, 5), strict.stdout[-3000:]
    assert strict.stdout.count("required by FIMCORE_TEST_BACKENDS/CI") >= 3, strict.stdout[-3000:]


def test_no_test_module_bypasses_the_policy():
    """``pytest.importorskip`` and ``except ImportError`` skip a library even where it is required."""
    allowed = {ROOT / "tests" / "_backends.py", ROOT / "tests" / "conftest.py", Path(__file__)}
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "importorskip" in line or re.search(r"except\s*\(?\s*ImportError\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "use tests.conftest.import_backend instead:\n" + "\n".join(offenders)
