"""The one adapter contract, checked on every framework × model case × strategy.

For each id the provider in ``tests/adapters/contract/<framework>_cases.py`` runs one measured
float64 step (see that package's docstring). Checked here, each as its own assertion message:

* shape (B, B), symmetry, float64 dtype (the models are float64);
* ``1ᵀ G 1 = B²‖∇L‖²`` for a mean loss (``‖∇L‖²`` for a sum) with the step's own gradient;
* the per-layer blocks sum to G;
* the measured step's gradient equals a plain step's;
* G equals the float64 per-sample-loop reference;
* every layer in the report took a path of ``fimcore.layers.PATHS``, and a forced strategy
  shows in the paths where it applies.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from fimcore.layers import PATHS
from tests.adapters.contract import CASES, STRATEGIES, NotApplicable
from tests.conftest import import_backend

FRAMEWORKS = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}
TOL = 1e-10


def _provider(framework: str):
    """The framework's cases module; a missing one is an error (every adapter provides it)."""
    import_backend(FRAMEWORKS[framework])
    return importlib.import_module(f"tests.adapters.contract.{framework}_cases")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_adapter_contract(framework, case, strategy):
    provider = _provider(framework)
    try:
        run = provider.run(case, strategy)
    except NotApplicable as why:
        pytest.skip(f"{framework}/{case}/{strategy} not applicable: {why}")
    G, B = run.gram, run.batch_size
    assert G.shape == (B, B), "shape"
    assert run.gram_dtype == "float64", "dtype of a float64 model's Gram"
    np.testing.assert_allclose(G, G.T, rtol=0, atol=TOL * np.abs(G).max(), err_msg="symmetry")
    scale = B**2 if run.loss_reduction == "mean" else 1.0
    ones = G.sum()
    assert ones == pytest.approx(scale * float(run.grad @ run.grad), rel=TOL), "1ᵀG1 = B²‖∇L‖²"
    total = sum(run.blocks.values())
    np.testing.assert_allclose(total, G, rtol=TOL, atol=TOL * np.abs(G).max(),
                               err_msg="per-layer blocks sum to G")
    np.testing.assert_allclose(run.grad, run.plain_grad, rtol=1e-12, atol=1e-14 * np.abs(run.plain_grad).max(),
                               err_msg="the measured step's gradient equals a plain step's")
    np.testing.assert_allclose(G, run.reference_gram, rtol=TOL,
                               atol=TOL * np.abs(run.reference_gram).max(),
                               err_msg="G equals the float64 per-sample loop")
    assert set(run.report_paths.values()) <= set(PATHS), run.report_paths
    if strategy == "generic":
        assert set(run.report_paths.values()) <= {"generic", "generic-coupled", "not run"}, run.report_paths
