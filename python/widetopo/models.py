"""Reference networks for pruning-at-initialization experiments.

`build_model(name, in_channels, num_classes, image_size)` returns a freshly initialized
classifier that maps (N, in_channels, H, W) images to (N, num_classes) logits:

  resnet20/32/56  CIFAR ResNets (He et al. 2016): 3x3 stem with 16 channels, 3 stages of
                  (depth - 2) / 6 basic blocks with 16/32/64 channels, global average pool,
                  linear. Downsampling shortcuts are 1x1 conv (stride 2) + BatchNorm
                  projections ("option B" on the two downsampling blocks, identity elsewhere),
                  so every shortcut weight is an ordinary prunable Conv2d.
  resnet18        ResNet-18 (basic blocks 2-2-2-2, 64..512 channels) with the CIFAR stem
                  (3x3 conv, no max-pool) for images up to 64 px and the ImageNet stem
                  (7x7 stride-2 conv + max-pool) above that; same projection shortcuts.
  vgg16/vgg19     VGG with BatchNorm after every conv; the five max-pools are skipped once
                  the feature map is 1 px, and the linear classifier is sized from the
                  resulting feature map (512 * h * w inputs; 512 for 32 px images).
  lenet5          LeNet-5 (conv 6 - pool - conv 16 - pool - fc 120 - fc 84 - fc classes)
                  with ReLU and max-pool; padding adapts so small images still fit.
  mlp             LeNet-300-100: flatten - 300 - 100 - classes, ReLU.
  cnn             a small fast CNN (3 x [conv3x3 + BN + ReLU], max-pool after the first two,
                  global average pool, linear; 16/32/64 channels, ~23k weights) for quick runs.

Initialization: Kaiming-normal (fan-in, ReLU gain) for every Conv and Linear weight, zero
biases, BatchNorm weight 1 / bias 0 - the usual setting of the pruning-at-init literature,
where the scores are computed on exactly this initialization.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Sequence, Tuple, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

ImageSize = Union[int, Tuple[int, int]]

__all__ = ["build_model", "MODELS", "kaiming_init_"]


# --------------------------------------------------------------------------- helpers
def _size2(image_size: ImageSize) -> Tuple[int, int]:
    if isinstance(image_size, bool):
        raise ValueError(f"image_size must be a positive int or an (height, width) pair, got {image_size!r}")
    if isinstance(image_size, int):
        hw = (image_size, image_size)
    elif isinstance(image_size, Sequence) and len(image_size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in image_size
    ):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size must be a positive int or an (height, width) pair, got {image_size!r}")
    if min(hw) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return hw


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def kaiming_init_(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan-in, ReLU) Conv/Linear weights, zero biases, BN = identity affine."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)):
            if getattr(module, "weight", None) is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    return model


# --------------------------------------------------------------------------- ResNets
class BasicBlock(nn.Module):
    """y = relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); the shortcut is the identity, or a
    1x1 conv + BN projection when the stride or channel count changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of basic blocks (first block of every stage but the first has stride 2),
    global average pool, linear classifier."""

    def __init__(self, stage_blocks: Sequence[int], widths: Sequence[int], in_channels: int,
                 num_classes: int, imagenet_stem: bool = False):
        super().__init__()
        first = widths[0]
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, first, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(first), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, first, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(first), nn.ReLU(inplace=True),
            )
        stages = []
        in_planes = first
        for index, (blocks, width) in enumerate(zip(stage_blocks, widths)):
            layers = []
            for b in range(blocks):
                stride = 2 if (index > 0 and b == 0) else 1
                layers.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    n = (depth - 2) // 6

    def build(in_channels: int, num_classes: int, image_size: Tuple[int, int]) -> nn.Module:
        return ResNet([n, n, n], [16, 32, 64], in_channels, num_classes)

    build.__doc__ = f"CIFAR ResNet-{depth}: 3 stages x {n} basic blocks, 16/32/64 channels."
    return build


def _resnet18(in_channels: int, num_classes: int, image_size: Tuple[int, int]) -> nn.Module:
    """ResNet-18; CIFAR stem up to 64 px, ImageNet stem above."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], in_channels, num_classes,
                  imagenet_stem=max(image_size) > 64)


# --------------------------------------------------------------------------- VGG
_VGG_CFG = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with BatchNorm; max-pools that would shrink a 1-px map are left out, and the
    classifier takes the flattened final map (512 * h * w features)."""

    def __init__(self, cfg, in_channels: int, num_classes: int, image_size: Tuple[int, int]):
        super().__init__()
        layers = []
        channels = in_channels
        h, w = image_size
        for item in cfg:
            if item == "M":
                if h >= 2 and w >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    h, w = h // 2, w // 2
                continue
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                       nn.ReLU(inplace=True)]
            channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * h * w, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _vgg(name: str) -> Callable[..., nn.Module]:
    def build(in_channels: int, num_classes: int, image_size: Tuple[int, int]) -> nn.Module:
        return VGG(_VGG_CFG[name], in_channels, num_classes, image_size)

    build.__doc__ = f"{name.upper()} with BatchNorm."
    return build


# --------------------------------------------------------------------------- small nets
class LeNet5(nn.Module):
    """conv5x5(6) - relu - pool - conv5x5(16) - relu - pool - fc120 - fc84 - fc(classes).
    The first conv is 'same'-padded (as for 28 px MNIST); the second conv is padded too
    when the map is smaller than 8 px, and a pool is skipped at 1 px."""

    def __init__(self, in_channels: int, num_classes: int, image_size: Tuple[int, int]):
        super().__init__()
        h, w = image_size
        layers = [nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True)]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2, 2))
            h, w = h // 2, w // 2
        pad = 0 if min(h, w) >= 8 else 2
        layers += [nn.Conv2d(6, 16, 5, padding=pad), nn.ReLU(inplace=True)]
        h, w = _conv_out(h, 5, 1, pad), _conv_out(w, 5, 1, pad)
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2, 2))
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(16 * h * w, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """LeNet-300-100: flatten - linear 300 - relu - linear 100 - relu - linear classes."""

    def __init__(self, in_channels: int, num_classes: int, image_size: Tuple[int, int],
                 hidden: Sequence[int] = (300, 100)):
        super().__init__()
        layers = [nn.Flatten()]
        width = in_channels * image_size[0] * image_size[1]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """3 x (conv3x3 + BN + ReLU) with 16/32/64 channels, 2x2 max-pool after the first two
    (while the map is >= 2 px), global average pool, linear. Prunes and trains in seconds."""

    def __init__(self, in_channels: int, num_classes: int, image_size: Tuple[int, int]):
        super().__init__()
        h, w = image_size
        layers = []
        channels = in_channels
        for index, width in enumerate((16, 32, 64)):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels = width
            if index < 2 and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------- registry
MODELS: Dict[str, Callable[[int, int, Tuple[int, int]], nn.Module]] = {
    "resnet20": _cifar_resnet(20),
    "resnet32": _cifar_resnet(32),
    "resnet56": _cifar_resnet(56),
    "resnet18": _resnet18,
    "vgg16": _vgg("vgg16"),
    "vgg19": _vgg("vgg19"),
    "lenet5": lambda c, k, s: LeNet5(c, k, s),
    "mlp": lambda c, k, s: MLP(c, k, s),
    "cnn": lambda c, k, s: SmallCNN(c, k, s),
}


def build_model(name: str, in_channels: int = 3, num_classes: int = 10,
                image_size: ImageSize = 32) -> nn.Module:
    """A freshly Kaiming-initialized classifier `name` (see MODELS) for images of shape
    (in_channels, image_size, image_size) - or (in_channels, h, w) for image_size=(h, w) -
    returning (N, num_classes) logits. Uses the global torch RNG for the initialization
    (call torch.manual_seed first for a reproducible network)."""
    if not isinstance(name, str):
        raise ValueError(f"name must be a model name string, one of {sorted(MODELS)}; got {name!r}")
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    hw = _size2(image_size)
    model = kaiming_init_(MODELS[key](in_channels, num_classes, hw))
    logger.debug("built %s: %d parameters", key, sum(p.numel() for p in model.parameters()))
    return model
