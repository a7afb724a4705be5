"""Model architectures: parameter counts derived from the layer definitions of the authors' code, and shapes."""

import pytest
import torch
from torch import nn

from reference_training.models import MODEL_NAMES, build_model, count_parameters, liao_densenet


@pytest.mark.parametrize(
    ("name", "classes", "expected"),
    [
        ("liao-resnet", 10, 1_728_090),
        ("liao-resnet", 100, 1_733_940),
        ("liao-densenet", 10, 1_724_890),
        ("liao-densenet", 100, 1_778_260),
        ("resnet20", 10, 269_722),
    ],
)
def test_parameter_counts_match_spec(name, classes, expected):
    model = build_model(name, in_channels=3, num_classes=classes, image_size=32)
    assert count_parameters(model) == expected


def test_group_norm_variant_keeps_parameter_count_and_has_no_batchnorm():
    model = build_model("resnet20", in_channels=3, num_classes=10, image_size=32, norm="group")
    assert count_parameters(model) == 269_722
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_densenet_channel_counts_follow_growth_rates():
    # 16 -> 16 + 18*8 = 160 -> 160 + 18*10 = 340 -> 340 + 18*14 = 592 (growth rates 8, 10, 14 of the authors' densenet.lua)
    assert liao_densenet(110).out_channels == 592


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_forward_shapes_on_mnist_and_cifar_inputs(name, channels, size):
    depth = None if name.startswith("resnet") else 8
    model = build_model(name, in_channels=channels, num_classes=7, image_size=size, depth=depth,
                        width=4)
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7)


def test_convolutions_have_no_bias_and_init_follows_released_code():
    torch.manual_seed(0)
    model = build_model("liao-resnet", in_channels=3, num_classes=10, image_size=32, depth=20)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)
    last = convs[-1]
    expected_std = (2.0 / (9 * last.out_channels)) ** 0.5
    assert abs(last.weight.std().item() - expected_std) / expected_std < 0.05
    assert torch.all(model.fc.bias == 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="vgg16"), "model must be one of"),
        (dict(name="liao-resnet", depth=100), "depth must be 6n\\+2"),
        (dict(name="resnet20", depth=32), "resnet20 has depth 20"),
        (dict(name="resnet20", norm="layer"), "norm must be one of"),
        (dict(name="resnet20", width=0), "width must be a positive int"),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs, match):
    args = dict(in_channels=3, num_classes=10, image_size=32) | kwargs
    name = args.pop("name")
    with pytest.raises(ValueError, match=match):
        build_model(name, **args)
