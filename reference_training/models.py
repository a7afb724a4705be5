"""Networks of the reproduction: the authors' ResNet and DenseNet, and He et al.'s CIFAR ResNets.

All models take the dataset's channels, image size and number of classes, so the same code runs on
CIFAR (3×32×32) and MNIST (1×28×28). The final 8×8 average pool of the CIFAR models is an adaptive
global average pool, which is the same operation on 32×32 inputs and also works on 28×28 (7×7 maps).

* ``liao_resnet`` — the "CBRCB" ResNet of Liao et al.'s released code (``models/cbrcbresnet.lua``): stem conv+BN
  without ReLU; blocks conv→BN→ReLU→conv→BN plus shortcut, no ReLU after the addition; shortcut is
  identity, 2×2 average pool when downsampling and zero channels appended when widening; head
  BN→ReLU→pool→FC. Depth 6n+2, default 110 (1,728,090 parameters on CIFAR-10).
* ``liao_densenet`` — the authors' non-bottleneck DenseNet: stem conv; three dense blocks of
  N = (depth−2)/6 layers with growth rates 8, 10, 14 (BN→ReLU→3×3 conv, concatenated);
  transitions BN→ReLU→1×1 conv (same width)→2×2 average pool; head BN→ReLU→pool→FC.
  Default depth 110 (1,724,890 parameters on CIFAR-10).
* ``resnet20/32/56`` — He et al. (2016) CIFAR ResNets with the parameter-free "option A" shortcut
  (stride-2 subsampling, zero channels appended); ResNet-20 has 269,722 parameters on CIFAR-10.

Convolutions have no bias. Initialisation follows the released code: conv weights
N(0, 2/(k·k·C_out)), norm scale 1 and shift 0, FC bias 0 (FC weight: PyTorch's default).
``norm="group"`` swaps every BatchNorm for a GroupNorm with the same affine parameters (for tools
that refuse BatchNorm); the parameter count is unchanged.

Example:
    >>> m = build_model("resnet20", in_channels=3, num_classes=10, image_size=32)
    >>> count_parameters(m)
    269722
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "count_parameters",
    "liao_densenet",
    "liao_resnet",
    "resnet",
    "resnet20",
    "resnet32",
    "resnet56",
]

MODEL_NAMES = ("resnet20", "resnet32", "resnet56", "liao-resnet", "liao-densenet")
_NORMS = ("batch", "group")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars P (the number of columns of J)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # Group count: the largest of 8, 4, 2, 1 dividing the channel count.
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _pad_channels(x: torch.Tensor, c_out: int) -> torch.Tensor:
    extra = c_out - x.shape[1]
    if extra == 0:
        return x
    return F.pad(x, (0, 0, 0, 0, 0, extra))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            k_h, k_w = m.kernel_size
            std = math.sqrt(2.0 / (k_h * k_w * m.out_channels))
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _check_common(in_channels: int, num_classes: int, image_size: int | None, norm: str) -> None:
    if not (isinstance(in_channels, int) and in_channels >= 1):
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}.")
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    if image_size is not None and not (isinstance(image_size, int) and image_size >= 4):
        raise ValueError(
            f"image_size must be an int >= 4 (three stages halve it twice), got {image_size!r}."
        )
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}.")


def _blocks_per_stage(depth: int, name: str) -> int:
    if not (isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0):
        raise ValueError(
            f"{name} depth must be 6n+2 with n >= 1 (e.g. 20, 32, 56, 110), got {depth!r}; "
            "pick a depth of that form."
        )
    return (depth - 2) // 6


# --------------------------------------------------------------------------- He et al. ResNet


class _BasicBlock(nn.Module):
    """conv→norm→ReLU→conv→norm, add the option-A shortcut, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = _norm(norm, c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = _norm(norm, c_out)
        self.stride = stride
        self.c_out = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        return F.relu(out + _pad_channels(shortcut, self.c_out))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet of depth 6n+2 with option-A shortcuts."""

    def __init__(
        self,
        depth: int,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int | None = None,
        norm: str = "batch",
        width: int = 16,
    ) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, image_size, norm)
        n = _blocks_per_stage(depth, "ResNet")
        widths = (width, 2 * width, 4 * width)
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = _norm(norm, width)
        layers: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate(widths):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(_BasicBlock(c_in, c_out, stride, norm))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet(depth: int, **kwargs) -> CifarResNet:
    """He et al. CIFAR ResNet of depth 6n+2 (keyword arguments as :class:`CifarResNet`)."""
    return CifarResNet(depth, **kwargs)


def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 (3 blocks per stage; 269,722 parameters on CIFAR-10 at width 16)."""
    return CifarResNet(20, **kwargs)


def resnet32(**kwargs) -> CifarResNet:
    """ResNet-32 (5 blocks per stage)."""
    return CifarResNet(32, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56 (9 blocks per stage)."""
    return CifarResNet(56, **kwargs)


# --------------------------------------------------------------------------- Liao et al. ResNet


class _CBRCBBlock(_BasicBlock):
    """conv→BN→ReLU→conv→BN plus shortcut (average pool, zero channels); no ReLU after the sum.

    Same layers as :class:`_BasicBlock`; only the shortcut and the missing final ReLU differ.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride > 1:
            # ceil_mode keeps the shape equal to the strided conv's on odd maps (7 -> 4).
            shortcut = F.avg_pool2d(x, 2, stride=2, ceil_mode=True)
        return out + _pad_channels(shortcut, self.c_out)


class LiaoResNet(nn.Module):
    """The authors' CBRCB ResNet (their ``models/cbrcbresnet.lua``), depth 6n+2."""

    def __init__(
        self,
        depth: int = 110,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int | None = None,
        norm: str = "batch",
        width: int = 16,
    ) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, image_size, norm)
        n = _blocks_per_stage(depth, "Liao ResNet")
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = _norm(norm, width)
        layers: list[nn.Module] = []
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(_CBRCBBlock(c_in, c_out, stride, norm))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.bn_out = _norm(norm, c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        out = self.layers(out)
        out = F.relu(self.bn_out(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def liao_resnet(depth: int = 110, **kwargs) -> LiaoResNet:
    """The authors' CBRCB ResNet (1,728,090 parameters at depth 110 on CIFAR-10)."""
    return LiaoResNet(depth, **kwargs)


# --------------------------------------------------------------------------- Liao et al. DenseNet


class _DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, norm: str) -> None:
        super().__init__()
        self.bn = _norm(norm, c_in)
        self.conv = _conv3x3(c_in, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], dim=1)


class _Transition(nn.Module):
    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.bn = _norm(norm, channels)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(F.relu(self.bn(x)))
        return F.avg_pool2d(out, 2, stride=2, ceil_mode=True)


class LiaoDenseNet(nn.Module):
    """The authors' DenseNet (their ``models/densenet.lua``): three blocks of (depth−2)/6 layers, growth 8, 10, 14."""

    def __init__(
        self,
        depth: int = 110,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int | None = None,
        norm: str = "batch",
        growth_rates: Sequence[int] = (8, 10, 14),
        stem_channels: int = 16,
    ) -> None:
        super().__init__()
        _check_common(in_channels, num_classes, image_size, norm)
        n = _blocks_per_stage(depth, "Liao DenseNet")
        if len(growth_rates) != 3 or any(int(g) < 1 for g in growth_rates):
            raise ValueError(
                f"growth_rates must be three positive ints (one per block), got {growth_rates!r}."
            )
        self.conv1 = _conv3x3(in_channels, stem_channels)
        blocks: list[nn.Module] = []
        c = stem_channels
        for b, growth in enumerate(growth_rates):
            for _ in range(n):
                blocks.append(_DenseLayer(c, int(growth), norm))
                c += int(growth)
            if b < 2:
                blocks.append(_Transition(c, norm))
        self.blocks = nn.Sequential(*blocks)
        self.bn_out = _norm(norm, c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.out_channels = c
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn_out(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def liao_densenet(depth: int = 110, **kwargs) -> LiaoDenseNet:
    """The authors' DenseNet (1,724,890 parameters at depth 110 on CIFAR-10)."""
    return LiaoDenseNet(depth, **kwargs)


# --------------------------------------------------------------------------- factory

_FIXED_DEPTH = {"resnet20": 20, "resnet32": 32, "resnet56": 56}


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    depth: int | None = None,
    norm: str = "batch",
    width: int | None = None,
) -> nn.Module:
    """Build a model by its command-line name.

    Args:
        name: one of ``resnet20``, ``resnet32``, ``resnet56``, ``liao-resnet``, ``liao-densenet``
            (underscores are accepted for hyphens).
        in_channels: image channels (3 for CIFAR/SVHN, 1 for MNIST).
        num_classes: number of classes.
        image_size: input height/width (checked, the global pool adapts to it).
        depth: depth 6n+2 for the Liao models (default 110); for ``resnetNN`` it must be NN or None.
        norm: ``"batch"`` (default, as the paper) or ``"group"``.
        width: first-stage channels of the ResNets (default 16; smaller values make tiny test
            models). For the DenseNet it is the stem width and growth rates are scaled by
            ``width / 16``.

    Returns:
        A freshly initialised ``torch.nn.Module`` (float32, CPU).

    Raises:
        ValueError: unknown name, or a depth/width/norm that the model cannot take.
    """
    key = name.lower().replace("_", "-")
    if key not in MODEL_NAMES:
        raise ValueError(f"model must be one of {MODEL_NAMES}, got {name!r}.")
    if width is not None and not (isinstance(width, int) and width >= 1):
        raise ValueError(f"width must be a positive int or None, got {width!r}.")
    common = dict(in_channels=in_channels, num_classes=num_classes, image_size=image_size, norm=norm)
    if key in _FIXED_DEPTH:
        fixed = _FIXED_DEPTH[key]
        if depth is not None and depth != fixed:
            raise ValueError(
                f"{key} has depth {fixed}, got depth={depth}; use liao-resnet for other depths."
            )
        return CifarResNet(fixed, width=width or 16, **common)
    depth = 110 if depth is None else depth
    if key == "liao-resnet":
        return LiaoResNet(depth, width=width or 16, **common)
    if width is None or width == 16:
        return LiaoDenseNet(depth, **common)
    scale = width / 16
    growth = tuple(max(1, round(g * scale)) for g in (8, 10, 14))
    return LiaoDenseNet(depth, growth_rates=growth, stem_channels=width, **common)
