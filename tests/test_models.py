"""widetopo.models: shapes for varied inputs, hand-counted parameter totals, init, errors."""
import math

import pytest
import torch
from torch import nn

from widetopo.models import MODELS, build_model

ALL = sorted(MODELS)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _bn(c):  # weight + bias
    return 2 * c


SMALL = ["cnn", "lenet5", "mlp", "resnet20"]
CASES = [(n, 3, 32, 10) for n in SMALL] + [(n, 1, 8, 7) for n in ALL] + [(n, 2, 12, 100) for n in ALL]


@pytest.mark.parametrize("name,in_channels,image_size,num_classes", CASES)
def test_output_shape(name, in_channels, image_size, num_classes):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size).eval()
    x = torch.randn(2, in_channels, image_size, image_size)  # 2 samples: BN in eval mode anyway
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["cnn", "lenet5", "mlp", "resnet20"])
def test_non_square_images(name):
    model = build_model(name, in_channels=2, num_classes=5, image_size=(12, 20)).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 2, 12, 20)).shape == (3, 5)


def test_resnet18_imagenet_stem_for_large_images():
    model = build_model("resnet18", in_channels=3, num_classes=4, image_size=96)
    assert model.stem[0].kernel_size == (7, 7)
    assert build_model("resnet18", image_size=32).stem[0].kernel_size == (3, 3)


def _cifar_resnet_count(n, in_ch=3, classes=10):
    """Parameters of a CIFAR ResNet with 3 stages x n blocks (16/32/64) and 1x1 conv + BN
    projection shortcuts on the two downsampling blocks, counted by hand."""
    total = in_ch * 16 * 9 + _bn(16)  # stem
    prev = 16
    for width in (16, 32, 64):
        for b in range(n):
            c_in = prev if b == 0 else width
            total += c_in * width * 9 + width * width * 9 + 2 * _bn(width)
            if c_in != width:
                total += c_in * width + _bn(width)
        prev = width
    return total + 64 * classes + classes


def test_resnet20_parameter_count_known_value():
    # Known value: ResNet-20 for CIFAR-10 has 0.27M parameters (He et al. 2016, Table 6); with
    # option-A (parameter-free) shortcuts it is 269,722; our projection shortcuts add
    # 16*32 + 2*32 + 32*64 + 2*64 = 2,752 -> 272,474.
    model = build_model("resnet20", 3, 10, 32)
    assert _params(model) == 269_722 + 2_752 == 272_474
    assert _cifar_resnet_count(3) == 272_474


@pytest.mark.parametrize("name,n", [("resnet32", 5), ("resnet56", 9)])
def test_deeper_cifar_resnets_parameter_counts(name, n):
    assert _params(build_model(name, 3, 10, 32)) == _cifar_resnet_count(n)
    assert _params(build_model(name, 1, 100, 28)) == _cifar_resnet_count(n, in_ch=1, classes=100)


def test_small_model_parameter_counts_by_hand():
    # LeNet-5 on 28 px MNIST: conv 1->6 (5x5, same) 28->pool 14, conv 6->16 (5x5) 10->pool 5.
    lenet = 6 * 25 + 6 + 16 * 6 * 25 + 16 + 400 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10
    assert _params(build_model("lenet5", 1, 10, 28)) == lenet == 61_706
    # LeNet-300-100 on 28 px: 784*300+300 + 300*100+100 + 100*10+10 = 266,610
    assert _params(build_model("mlp", 1, 10, 28)) == 266_610
    # Small CNN: three bias-free 3x3 convs 3->16->32->64 with BN, linear 64->10.
    cnn = 3 * 16 * 9 + _bn(16) + 16 * 32 * 9 + _bn(32) + 32 * 64 * 9 + _bn(64) + 64 * 10 + 10
    assert _params(build_model("cnn", 3, 10, 32)) == cnn


def test_vgg_classifier_sized_from_image_size():
    # 32 px -> five pools -> 1x1: classifier 512 -> classes; 64 px -> 2x2 -> 2048 inputs.
    # 8 px -> three pools reach 1x1, the other two are skipped: 512 inputs again.
    assert build_model("vgg16", 3, 10, 32).classifier.in_features == 512
    m = build_model("vgg19", 3, 10, 64)
    assert m.classifier.in_features == 2048
    assert build_model("vgg16", 1, 10, 8).classifier.in_features == 512
    # 16 convs for vgg19, each followed by BatchNorm; 13 conv+BN for vgg16 checked by count:
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 16
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 16
    # VGG-16-BN, 32 px, 10 classes, bias-free convs: conv weights + BN + linear by hand.
    cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    count, prev = 0, 3
    for c in cfg:
        count += prev * c * 9 + _bn(c)
        prev = c
    assert _params(build_model("vgg16")) == count + 512 * 10 + 10


def test_kaiming_init_statistics():
    torch.manual_seed(0)
    model = build_model("resnet20")
    conv = model.layers[2][1].conv1  # 64 -> 64, 3x3, fan_in = 576
    expected_std = math.sqrt(2.0 / (64 * 9))
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05
    assert abs(conv.weight.mean().item()) < 0.1 * expected_std
    assert torch.equal(model.fc.bias, torch.zeros(10))
    bn = model.layers[0][0].bn1
    assert torch.equal(bn.weight, torch.ones(16)) and torch.equal(bn.bias, torch.zeros(16))


def test_seeded_builds_are_identical():
    torch.manual_seed(3)
    a = build_model("cnn", 1, 10, 8)
    torch.manual_seed(3)
    b = build_model("cnn", 1, 10, 8)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_names_are_case_and_dash_insensitive():
    assert isinstance(build_model("ResNet-20"), type(build_model("resnet20")))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_model("resnet21")
    message = str(info.value)
    assert "resnet21" in message
    for name in ALL:
        assert name in message


@pytest.mark.parametrize("kwargs,arg", [
    ({"in_channels": 0}, "in_channels"),
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 2.5}, "num_classes"),
    ({"image_size": 0}, "image_size"),
    ({"image_size": (8, 8, 8)}, "image_size"),
])
def test_bad_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        build_model("cnn", **kwargs)


def test_cnn_is_small():
    # The CLI's default run prunes and trains this net in seconds: it must stay tiny.
    assert _params(build_model("cnn", 1, 10, 8)) < 30_000
