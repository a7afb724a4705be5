"""The three adapters share one file layout: the same concept lives in a module of the same name.

``_torch/``, ``_jax/`` and ``_tensorflow/`` each hold the rule registry (``registry``: the
module-type -> rule table; ``register_layer_rule`` adds a user's ``LayerRule`` to it), one module per built-in rule family (``dense``, ``convps``,
``embedding``, ``norm``), the generic path (``generic``), the public entry object (``recorder``:
``GramRecorder``, ``FlaxGram``, ``GramTape``), the cost model (``cost``) and the sampled-label
Fisher (``sampled``). Read with :mod:`ast` only: no framework is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ADAPTERS = Path(__file__).resolve().parents[2] / "adapters" / "fimcore_adapters"
PACKAGES = {"torch": "_torch", "jax": "_jax", "tensorflow": "_tensorflow"}
COMMON = ("registry", "dense", "convps", "embedding", "norm", "generic", "recorder", "cost", "sampled")
ENTRY = {"torch": "GramRecorder", "jax": "FlaxGram", "tensorflow": "GramTape"}


def _defines(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def _exports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {ast.literal_eval(e) for e in node.value.elts}
    return set()


@pytest.mark.parametrize("framework", sorted(PACKAGES))
def test_the_common_modules_exist(framework):
    base = ADAPTERS / PACKAGES[framework]
    missing = [m for m in COMMON if not (base / f"{m}.py").is_file()]
    assert not missing, f"{base.name}/ lacks {missing}; present: {sorted(p.stem for p in base.glob('*.py'))}"
    underscored = sorted(p.name for p in base.glob("_*.py") if p.name not in ("__init__.py", "_checks.py"))
    assert not underscored, f"{base.name}/ is private already; drop the leading underscore of {underscored}"


@pytest.mark.parametrize("framework", sorted(PACKAGES))
def test_registry_and_entry_object_live_where_their_names_say(framework):
    base = ADAPTERS / PACKAGES[framework]
    defined = set().union(*(_defines(p) for p in base.glob("*.py")))
    assert {"register_layer_rule", "LayerRule"} <= defined
    assert ENTRY[framework] in _defines(base / "recorder.py")
    public = _exports(ADAPTERS / f"{framework}.py")
    assert {"register_layer_rule", "LayerRule", ENTRY[framework]} <= public, sorted(public)
