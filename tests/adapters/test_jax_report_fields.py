"""``report()`` of the JAX objects carries the same per-layer fields as PyTorch's ``Report``."""

from __future__ import annotations

import dataclasses

import numpy as np

from tests.conftest import import_backend

jax = import_backend("jax")
flax = import_backend("flax")
torch = import_backend("torch")
jnp = jax.numpy
nn = flax.linen

from fimcore.layers import PATHS  # noqa: E402
from fimcore.layers import LayerRecord as CoreRecord  # noqa: E402
from fimcore_adapters.jax import FlaxGram, value_grad_and_gram  # noqa: E402
from fimcore_adapters.torch import GramRecorder  # noqa: E402
from fimcore_adapters.torch import LayerRecord as TorchRecord  # noqa: E402


def fields(record):
    return [f.name for f in dataclasses.fields(record)]


def test_jax_report_records_have_the_torch_field_names_and_paths():
    want = fields(TorchRecord)
    assert want == fields(CoreRecord)
    torch_model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    rec = GramRecorder(torch_model)
    with rec:
        torch.nn.functional.cross_entropy(torch_model(torch.ones(4, 3)), torch.zeros(4, dtype=torch.long),
                                          reduction="mean").backward()
    torch_record = rec.report()[0]

    x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
    model = nn.Dense(2)
    variables = model.init(jax.random.key(0), x)

    def ce(logits, t):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, None], 1)[:, 0]

    flax_step = FlaxGram(model, ce, keep_blocks=True)
    flax_step(variables, x, y)
    plain = value_grad_and_gram(lambda p, xi, yi: ce((xi @ p["w"])[None], yi[None])[0], keep_blocks=True)
    _, _, gram, blocks = plain({"w": jnp.ones((3, 2))}, x, y)
    plain_record = plain.report()[0]
    for record, params in ((torch_record, 8), (flax_step.report()[0], 8), (plain_record, 6)):
        assert fields(record) == want
        assert record.path in PATHS and record.params == params and record.calls == 1
        assert isinstance(record.trace, float), record
    np.testing.assert_allclose(plain_record.trace, float(np.trace(np.asarray(gram))), rtol=1e-12)
