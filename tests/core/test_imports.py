"""Optional frameworks stay optional; the public API is what ``__all__`` says."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import fimcore
from tests.conftest import import_backend

ROOT = pathlib.Path(__file__).resolve().parents[2]
FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "keras", "flax")


def _run(code: str, *, warnings_as_errors: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["-W", "error"] if warnings_as_errors else []
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def test_import_loads_no_framework():
    result = _run(
        f"""
        import sys
        import fimcore, fimcore_adapters
        loaded = sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)
        assert not loaded, f"importing fimcore/fimcore_adapters loaded {{loaded}}"
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_core_sources_import_no_framework():
    for path in (ROOT / "fimcore").rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                top = words[1].split(".")[0]
                assert top not in FRAMEWORKS, f"{path.name}: {line.strip()}"


def test_public_names_exist_and_are_exported():
    expected = {
        "gram", "spectrum", "truncated_condition_number", "energy", "weighted_energy",
        "default_rtol", "MeasureTracker", "Measurement", "MeasureState", "measure_init",
        "measure_update", "StagedBatchSchedule", "paper_lr_milestones",
    }
    assert expected <= set(fimcore.__all__)
    assert all(hasattr(fimcore, name) for name in fimcore.__all__)


def test_jax_without_x64_falls_back_to_float32_silently():
    import_backend("jax")
    result = _run(
        """
        import numpy as np, jax.numpy as jnp, fimcore
        G = jnp.asarray(np.diag([4.0, 1.0]), dtype=jnp.float32)
        eigs = fimcore.spectrum(G)
        assert eigs.dtype == jnp.float32, eigs.dtype
        assert float(fimcore.truncated_condition_number(G)) == 4.0
        m = fimcore.MeasureTracker().update(G, lr=0.1)
        assert m.c_k == 4.0 and m.rank == 2
        print("ok")
        """,
        warnings_as_errors=True,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
