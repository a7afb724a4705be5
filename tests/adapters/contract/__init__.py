"""The adapter contract, framework by framework.

Each module here (``torch_cases``, ``jax_cases``, ``tensorflow_cases``) provides, for its
framework, the same model cases and one function::

    run(case: str, strategy: str) -> ContractRun

which builds the case's small float64 model and batch, runs ONE measured training step through
the adapter with ``strategy`` and per-layer blocks kept, runs a plain step of the framework on the
same model and batch, and computes the reference Gram with a float64 per-sample loop written in
the provider itself (sharing no code with the adapter: one gradient call per sample, or per
sample-masked cotangent for layers that couple samples such as BatchNorm in train mode).
``tests/adapters/test_contract.py`` checks every property on every (framework, case, strategy).
A combination a framework cannot take (a strategy that does not apply to a case) raises
:class:`NotApplicable` with the reason; the test then skips that one id.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

#: the model cases every framework provides
CASES = ("dense", "conv", "norm_train", "embedding", "tied", "generic")
#: the strategies of fimcore.layers.STRATEGIES
STRATEGIES = ("auto", "factored", "materialize", "generic")


class NotApplicable(Exception):
    """This (case, strategy) has no meaning for the framework (the message says why)."""


class ContractRun(NamedTuple):
    """What one measured step produced, as float64 NumPy, plus its references.

    Attributes:
        gram: the adapter's (B, B) Gram (converted to NumPy float64).
        gram_dtype: the dtype name the adapter returned G in (e.g. ``"float64"``).
        blocks: the adapter's per-layer blocks ``{layer: (B, B)}``.
        grad: the measured step's batch gradient, flattened in a fixed parameter order.
        plain_grad: a plain step's batch gradient, same order.
        reference_gram: the float64 per-sample-loop Gram (same loss reduction).
        batch_size: B.
        loss_reduction: ``"mean"`` or ``"sum"`` of the loss the step used.
        report_paths: ``{layer: path}`` from the adapter's report.
    """

    gram: np.ndarray
    gram_dtype: str
    blocks: dict[str, np.ndarray]
    grad: np.ndarray
    plain_grad: np.ndarray
    reference_gram: np.ndarray
    batch_size: int
    loss_reduction: str
    report_paths: dict[str, str]
    extra: dict[str, Any] = {}
