"""JAX adapter against the PyTorch adapter on the same NumPy weights (float64, 1e-10).

Both Flax paths (``FlaxGram`` and the generic ``value_grad_and_gram``) are compared with
``fimcore_adapters.torch.per_sample_gram`` on an MLP and a small CNN whose weights are drawn once
with NumPy and copied into each framework (torch layouts: Linear (out, in), Conv2d (out, in, kh,
kw), NCHW; Flax: Dense (in, out), Conv (kh, kw, in, out), NHWC).
"""

from __future__ import annotations

import numpy as np
import pytest

import flax.linen as nn
import jax
import torch
import jax.numpy as jnp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fimcore_adapters.jax import FlaxGram, value_grad_and_gram  # noqa: E402
from fimcore_adapters.torch import per_sample_gram as torch_per_sample_gram  # noqa: E402

B = 6
F64 = dict(param_dtype=jnp.float64)


def cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(7, **F64)(x))
        x = nn.relu(nn.Dense(5, **F64)(x))
        return nn.Dense(3, **F64)(x)


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: NHWC
        x = nn.max_pool(nn.relu(nn.Conv(4, (3, 3), padding=1, **F64)(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding=1, **F64)(x))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # flatten in torch's (C, H, W) order
        return nn.Dense(3, **F64)(x)


class TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def _torch_mlp():
    return torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.ReLU(),
                               torch.nn.Linear(5, 3))


def _copy_weights(torch_model, rng):
    """Draw float64 NumPy weights, load them into ``torch_model``, return them in Flax layout."""
    torch_model.double()
    flax_layers = []
    for module in torch_model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = np.prod(module.weight.shape[1:])
            w = rng.normal(size=module.weight.shape) / np.sqrt(fan_in)
            b = 0.1 * rng.normal(size=module.bias.shape)
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(w))
                module.bias.copy_(torch.from_numpy(b))
            kernel = w.T if w.ndim == 2 else np.transpose(w, (2, 3, 1, 0))
            flax_layers.append({"kernel": jnp.asarray(kernel), "bias": jnp.asarray(b)})
    return flax_layers


def _flax_params(layers, names):
    return {"params": {name: layer for name, layer in zip(names, layers)}}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_jax_paths_match_torch_adapter(arch):
    rng = np.random.default_rng(7)
    if arch == "mlp":
        torch_model, flax_model = _torch_mlp(), FlaxMLP()
        x_np = rng.normal(size=(B, 4))
        names = ["Dense_0", "Dense_1", "Dense_2"]
        x_jax = jnp.asarray(x_np)
    else:
        torch_model, flax_model = TorchCNN(), FlaxCNN()
        x_np = rng.normal(size=(B, 3, 8, 8))
        names = ["Conv_0", "Conv_1", "Dense_0"]
        x_jax = jnp.asarray(np.transpose(x_np, (0, 2, 3, 1)))
    y_np = rng.integers(0, 3, size=B)
    variables = _flax_params(_copy_weights(torch_model, rng), names)

    g_torch = torch_per_sample_gram(torch_model, torch.nn.CrossEntropyLoss(), torch.from_numpy(x_np),
                                    torch.from_numpy(y_np)).detach().numpy()
    y = jnp.asarray(y_np)
    loss, _, g_flax = jax.jit(FlaxGram(flax_model, cross_entropy))(variables, x_jax, y)
    per_example = lambda p, xi, yi: cross_entropy(flax_model.apply({"params": p}, xi[None]), yi[None])[0]  # noqa: E731
    _, _, g_generic = jax.jit(value_grad_and_gram(per_example))(variables["params"], x_jax, y)

    with torch.no_grad():
        torch_loss = float(F.cross_entropy(torch_model(torch.from_numpy(x_np)), torch.from_numpy(y_np)))
    assert float(loss) == pytest.approx(torch_loss, rel=1e-12)
    scale = np.abs(g_torch).max()
    np.testing.assert_allclose(np.asarray(g_flax), g_torch, rtol=1e-10, atol=1e-10 * scale)
    np.testing.assert_allclose(np.asarray(g_generic), g_torch, rtol=1e-10, atol=1e-10 * scale)
