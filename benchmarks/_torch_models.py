"""The PyTorch models of the benchmark and their synthetic batches.

Small models are defined here (MLP 784-512-256-10, a small CNN with three convolutions and a
dense layer on 3×32×32 inputs, a one-block transformer encoder classifier with T = 128 tokens);
the ResNets and the DenseNet come from :mod:`reference_training.models`. Inputs are synthetic
(standard normal images, uniform token ids, uniform labels): the cost of a step does not depend on
the data's values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
"""Classes of every benchmark model."""

MODEL_LABELS = {
    "resnet20-bn": "ResNet-20, BatchNorm (train mode)",
    "resnet20-gn": "ResNet-20, GroupNorm",
    "liao-resnet110": "Liao et al. ResNet-110 (BatchNorm)",
    "liao-densenet110": "Liao et al. DenseNet-110 (BatchNorm)",
    "mlp": "MLP 784-512-256-10",
    "cnn": "small CNN (3 conv + dense, 3×32×32)",
    "transformer": "transformer encoder block (T = 128, d = 128, 4 heads)",
}
"""Benchmark model names and their table labels, in report order."""

MODEL_NAMES = tuple(MODEL_LABELS)


class MLP(nn.Module):
    """784-512-256-10 perceptron with ReLU."""

    def __init__(self, sizes: tuple[int, ...] = (784, 512, 256, NUM_CLASSES)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Three 3×3 convolutions (16, 32, 64 channels, each ReLU + 2×2 max pool) and a dense layer."""

    def __init__(self, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (image_size // 8) ** 2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.fc(torch.flatten(x, 1))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block built from ``nn.Linear`` and ``nn.LayerNorm``.

    ``x + MHA(LN(x))`` then ``x + MLP(LN(x))``; attention is written out (no
    ``nn.MultiheadAttention``) so every parameterised module is a standard layer that each
    per-sample tool in the comparison supports.
    """

    def __init__(self, d_model: int = 128, heads: int = 4, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (b, heads, t, d_head)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TransformerClassifier(nn.Module):
    """Token embedding plus fixed sinusoidal positions, one :class:`EncoderBlock`, mean pool, head.

    Positions are a buffer (no parameters), so every parameterised module sees the batch
    dimension first.
    """

    def __init__(self, vocab: int = 1000, seq_len: int = 128, d_model: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.block = EncoderBlock(d_model, heads)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, NUM_CLASSES)
        pos = torch.arange(seq_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(seq_len, d_model)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("positions", table, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions[: ids.shape[1]]
        return self.head(self.norm(self.block(x)).mean(dim=1))


def build(name: str) -> nn.Module:
    """A freshly initialised float32 model by benchmark name (seed torch first for repeatability).

    Raises:
        ValueError: If ``name`` is not one of :data:`MODEL_NAMES`.
    """
    if name == "mlp":
        return MLP()
    if name == "cnn":
        return SmallCNN()
    if name == "transformer":
        return TransformerClassifier()
    if name in ("resnet20-bn", "resnet20-gn", "liao-resnet110", "liao-densenet110"):
        from reference_training.models import build_model

        common = dict(in_channels=3, num_classes=NUM_CLASSES, image_size=32)
        if name.startswith("resnet20"):
            return build_model("resnet20", norm="batch" if name.endswith("bn") else "group", **common)
        return build_model(name.removesuffix("110"), depth=110, **common)
    raise ValueError(f"model must be one of {MODEL_NAMES}; received {name!r}.")


def batch(name: str, batch_size: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch ``(inputs, labels)`` of ``batch_size`` samples for model ``name``."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=gen)
    if name == "mlp":
        return torch.randn(batch_size, 784, generator=gen), labels
    if name == "transformer":
        return torch.randint(0, 1000, (batch_size, 128), generator=gen), labels
    if name in MODEL_NAMES:
        return torch.randn(batch_size, 3, 32, 32, generator=gen), labels
    raise ValueError(f"model must be one of {MODEL_NAMES}; received {name!r}.")
