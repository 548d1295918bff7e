"""Reference architectures for the architecture tests and benchmarks, written from torch.nn in
the layout of torchvision's model code (torchvision is not available here): module names,
block structure and the published configurations, with a width option to shrink them.

    resnet18(num_classes=10, in_channels=3, width=64)      # He et al. 2016, ImageNet layout
    mobilenet_v3_small(num_classes=10, in_channels=3, width_mult=1.0)   # Howard et al. 2019

Both follow torchvision's initialization: Kaiming-normal (fan-out) convs, BatchNorm 1 / 0;
ResNet's fc keeps nn.Linear's default init, MobileNetV3's Linears are N(0, 0.01^2).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["resnet18", "mobilenet_v3_small", "ResNet18", "MobileNetV3Small", "MOBILENET_V3_SMALL"]


# --------------------------------------------------------------------------- ResNet-18
class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus the identity or the `downsample` (1x1 conv + BN), relu."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """7x7 stride-2 stem conv + BN + ReLU + 3x3 stride-2 max-pool, layer1..layer4 of two basic
    blocks (widths w, 2w, 4w, 8w; stride 2 from layer2 on, with 1x1 conv + BN downsample),
    adaptive average pool, fc."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(width, 1)
        self.layer2 = self._layer(2 * width, 2)
        self.layer3 = self._layer(4 * width, 2)
        self.layer4 = self._layer(8 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        blocks = [BasicBlock(self.inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, in_channels: int = 3, width: int = 64) -> ResNet18:
    return ResNet18(num_classes, in_channels, width)


# --------------------------------------------------------------------------- MobileNetV3-small
def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round a channel count to a multiple of `divisor`, never below 90 % of `value`."""
    min_value = divisor if min_value is None else min_value
    out = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if out < 0.9 * value:
        out += divisor
    return out


#: MobileNetV3-small (Howard et al. 2019, Table 2): input channels, kernel, expanded channels,
#: output channels, squeeze-excitation, activation ("RE" ReLU, "HS" Hardswish), stride.
MOBILENET_V3_SMALL: List[Tuple[int, int, int, int, bool, str, int]] = [
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
]


def conv_bn_act(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
                act: Optional[type] = nn.Hardswish) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out, eps=0.001, momentum=0.01)]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.Hardswish) else act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """x * hardsigmoid(fc2(relu(fc1(avgpool(x))))) with 1x1 convs as fc layers."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """[1x1 expand conv-BN-act] - kxk depthwise conv-BN-act (groups = channels) - [SE] -
    1x1 project conv-BN; + x when stride 1 and the channel count is unchanged."""

    def __init__(self, c_in: int, kernel: int, expanded: int, c_out: int, use_se: bool, act: str, stride: int):
        super().__init__()
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: List[nn.Module] = []
        if expanded != c_in:
            layers.append(conv_bn_act(c_in, expanded, 1, act=activation))
        layers.append(conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=activation))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8)))
        layers.append(conv_bn_act(expanded, c_out, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3Small(nn.Module):
    """3x3 stride-2 stem (16 channels, Hardswish), the 11 inverted residual blocks of
    MOBILENET_V3_SMALL, 1x1 conv to 6 * 96 channels, average pool, Linear(576, 1024) -
    Hardswish - Dropout - Linear(1024, classes). width_mult scales every channel count
    (rounded to multiples of 8) but the 1024-unit classifier layer."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2, config: Sequence[Tuple[int, int, int, int, bool, str, int]] = MOBILENET_V3_SMALL,
                 last_channel: int = 1024):
        super().__init__()

        def ch(c):
            return make_divisible(c * width_mult, 8)

        first = ch(config[0][0])
        layers: List[nn.Module] = [conv_bn_act(in_channels, first, 3, stride=2, act=nn.Hardswish)]
        for c_in, k, exp, c_out, se, act, s in config:
            layers.append(InvertedResidual(ch(c_in), k, ch(exp), ch(c_out), se, act, s))
        last_in = ch(config[-1][3])
        last_conv = 6 * last_in
        layers.append(conv_bn_act(last_in, last_conv, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel), nn.Hardswish(inplace=True), nn.Dropout(p=dropout, inplace=True),
            nn.Linear(last_channel, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3_small(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                       last_channel: int = 1024, dropout: float = 0.2) -> MobileNetV3Small:
    return MobileNetV3Small(num_classes, in_channels, width_mult, dropout, last_channel=last_channel)


# --------------------------------------------------------------------------- tiny cases
def _classification_batches(in_channels: int, size: int, classes: int, n_batches: int = 2, batch_size: int = 4,
                            seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, in_channels, size, size, generator=g),
             torch.randint(0, classes, (batch_size,), generator=g)) for _ in range(n_batches)]


def _segmentation_batches(size: int, n_batches: int = 2, batch_size: int = 4):
    from widetopo.data import data_loader, load_dataset

    ds = load_dataset("shapes", "train", image_size=size, max_samples=n_batches * batch_size)
    return list(data_loader(ds, batch_size=batch_size))


def tiny_case(name: str, seed: int = 0):
    """(model, batches) of architecture `name` at a size that prunes in a fraction of a second:
    4-class problems, 2 batches of 4 samples, inputs of 8-16 px (segmentation: the synthesised
    shapes dataset)."""
    from widetopo.models import build_model

    torch.manual_seed(seed)
    if name == "vit":
        return build_model("vit", 3, 4, 8, dim=16, depth=1, heads=2, patch_size=2), _classification_batches(3, 8, 4)
    if name == "resnet18":
        return resnet18(4, 3, width=4), _classification_batches(3, 16, 4)
    if name == "mobilenet_v3_small":
        return mobilenet_v3_small(4, 3, width_mult=0.25, last_channel=32), _classification_batches(3, 16, 4)
    if name == "lstm":
        return build_model("lstm", 3, 4, 8, hidden=8), _classification_batches(3, 8, 4)
    if name == "unet":
        return build_model("unet", 3, 4, 8, base=4, levels=1), _segmentation_batches(8)
    raise ValueError(f"unknown architecture {name!r}; valid: {', '.join(ARCHITECTURES)}")


#: the architectures of the "every method on every architecture" check, with what they stand for
ARCHITECTURES = {
    "vit": "widetopo.models ViT (patch embedding, class token, position embedding, qkv + SDPA)",
    "resnet18": "torchvision-style ResNet-18 (7x7 stem + max-pool, 1x1 downsample shortcuts)",
    "mobilenet_v3_small": "torchvision-style MobileNetV3-small (depthwise convs, SE with Hardsigmoid, Hardswish)",
    "lstm": "widetopo.models LSTM classifier (rows as a sequence)",
    "unet": "widetopo.models U-Net segmentation net (ConvTranspose2d, concatenated skips)",
}


class TiedLM(nn.Module):
    """Embedding first, output head tied to it (a language model's weight tying)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))).mean(1))


# --------------------------------------------------------------------------- the cells' options
# (shared by tests/test_architectures.py and benchmarks/bench_architectures.py)

#: short schedules: two scoring rounds, and for WideTopo one restoration of 2 steps
SHORT = {"rounds": 2, "restorations": 0}
SHORT_WIDETOPO = {"rounds": 2, "restorations": 1, "restore_steps": 2, "restore_rounds": 1}

#: one-shot methods refuse rounds > 1 (their own test files check the refusal)
ONE_SHOT = {"rreg": {"rounds": 1, "restorations": 0}}

#: method options that keep a cell to seconds (PAGS: 4 SNIP masks per round instead of 1000)
SMALL = {"pags": {"population": 4, "min_kept": 10}}


def cell_options(method: str) -> dict:
    """The options of one architecture x method cell: a short schedule, small populations."""
    return {**(ONE_SHOT.get(method) or (SHORT_WIDETOPO if method.startswith("widetopo") else SHORT)),
            **SMALL.get(method, {})}


def kept_range(method: str, shapes, keep: int):
    """Exact K, or [lo, hi] for a method that keeps whole kernels or graphs (its kept_bounds)."""
    from widetopo.methods import get_method

    bounds = getattr(get_method(method).make_scorer(), "kept_bounds", None)
    return (keep, keep) if bounds is None else bounds(shapes, keep)
