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
  vit             a small Vision Transformer (Dosovitskiy et al. 2021; the block layout of the
                  DINO ViT-S the WideTopo paper prunes): patch embedding (Conv2d, stride = patch
                  size), class token and position embedding, `depth` pre-norm blocks
                  x + proj(attn(LN(x))), x + MLP(LN(x)) with one qkv Linear (3 dim outputs) and
                  a GELU MLP, final LayerNorm, linear head on the class token. Options: dim
                  (64), depth (4), heads (4), patch_size (4 for images >= 16 px, 2 down to 4 px,
                  else 1), mlp_ratio (2.0), qkv_bias (True).
  lstm            an LSTM classifier that reads an image row by row (a sequence of H vectors of
                  C * W pixels), nn.LSTM, linear head on the last hidden state. Options: hidden
                  (64), layers (1).
  unet            a small U-Net (Ronneberger et al. 2015) for semantic segmentation: returns
                  per-pixel logits (N, num_classes, H, W). Encoder of `levels` + 1 stages of two
                  conv3x3-BN-ReLU (widths base, 2 base, 4 base, ...; max-pool between stages),
                  decoder that upsamples (ConvTranspose2d 2x2 stride 2, or bilinear
                  interpolation + conv1x1 with upsample="bilinear"), concatenates the encoder's
                  skip of the same scale and applies two conv3x3-BN-ReLU, then a 1x1 conv head.
                  Options: base (16), levels (2), upsample ("transpose").

Every model but `unet` is a classifier; MODEL_TASKS says which task a model solves, and
build_model(name, ..., **options) passes the options above to the model.

Initialization: Kaiming-normal (fan-in, ReLU gain) for every Conv and Linear weight, zero
biases, BatchNorm weight 1 / bias 0 - the usual setting of the pruning-at-init literature,
where the scores are computed on exactly this initialization. The exceptions follow their
architectures' usual code: `vit` draws every Linear weight, the patch embedding (a linear map
of the flattened patch), the class token and the position embedding from a normal
distribution with std 0.02 truncated at +-2 std, with zero biases and LayerNorm 1 / 0
(vit_init_); `lstm` keeps nn.LSTM's own U(-1/sqrt(hidden), 1/sqrt(hidden)) init and gives its
head Kaiming-normal weights.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ImageSize = Union[int, Tuple[int, int]]

__all__ = ["build_model", "MODELS", "MODEL_TASKS", "kaiming_init_", "vit_init_", "ViT", "LSTMClassifier",
           "UNet"]


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


# --------------------------------------------------------------------------- ViT
def vit_init_(model: nn.Module, std: float = 0.02) -> nn.Module:
    """The usual ViT initialization: N(0, std^2) truncated at +-2 std for every Linear weight,
    the patch-embedding conv (a Linear on flattened patches), the class token and the position
    embedding; zero biases; LayerNorm weight 1, bias 0."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for token in ("cls_token", "pos_embed"):
        value = getattr(model, token, None)
        if isinstance(value, nn.Parameter):
            nn.init.trunc_normal_(value, std=std, a=-2 * std, b=2 * std)
    return model


class Attention(nn.Module):
    """Multi-head self-attention softmax(q k^T / sqrt(d_head)) v with one qkv Linear
    (dim -> 3 dim, split into q, k, v and `heads` heads) and an output projection Linear."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, dim = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (n, heads, t, d_head)
        return self.proj(out.transpose(1, 2).reshape(n, t, dim))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + fc2(GELU(fc1(LN(x))))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def _default_patch(hw: Tuple[int, int]) -> int:
    side = min(hw)
    return 4 if side >= 16 else (2 if side >= 4 else 1)


class ViT(nn.Module):
    """Vision Transformer: (h // p) * (w // p) patch tokens plus a class token, learned position
    embedding, `depth` pre-norm blocks, final LayerNorm, linear head on the class token."""

    def __init__(self, in_channels: int, num_classes: int, image_size: Tuple[int, int], dim: int = 64,
                 depth: int = 4, heads: int = 4, patch_size: Optional[int] = None, mlp_ratio: float = 2.0,
                 qkv_bias: bool = True):
        super().__init__()
        dim = _positive_int(dim, "dim")
        depth = _positive_int(depth, "depth")
        heads = _positive_int(heads, "heads")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        patch = _default_patch(image_size) if patch_size is None else _positive_int(patch_size, "patch_size")
        if patch > min(image_size):
            raise ValueError(f"patch_size ({patch}) must not exceed the image size {image_size}")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        self.patch_size = patch
        self.num_patches = (image_size[0] // patch) * (image_size[1] // patch)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, float(mlp_ratio), bool(qkv_bias)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (n, patches, dim)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


# --------------------------------------------------------------------------- LSTM
class LSTMClassifier(nn.Module):
    """Reads an image row by row: the sequence x_1..x_H of row vectors (C * W pixels each)
    goes through an nn.LSTM; a Linear head maps the last hidden state h_H to the logits."""

    def __init__(self, in_channels: int, num_classes: int, image_size: Tuple[int, int], hidden: int = 64,
                 layers: int = 1):
        super().__init__()
        hidden = _positive_int(hidden, "hidden")
        layers = _positive_int(layers, "layers")
        self.lstm = nn.LSTM(in_channels * image_size[1], hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)
        out, _ = self.lstm(rows)
        return self.head(out[:, -1])


# --------------------------------------------------------------------------- U-Net
def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class UpBlock(nn.Module):
    """Upsample x by 2 (ConvTranspose2d 2x2 stride 2, or bilinear + conv1x1), pad it to the
    skip's size (odd sizes), concatenate [skip, x] on channels, then two conv3x3-BN-ReLU."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, upsample: str):
        super().__init__()
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(c_in, c_out, 1))
        self.conv = _double_conv(c_skip + c_out, c_out)

    def forward(self, x, skip):
        x = self.up(x)
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dh or dw:
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Encoder-decoder with concatenated skips; maps (N, C, H, W) to per-pixel logits
    (N, num_classes, H, W). `levels` max-pools (each needs a map of >= 2 px)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: Tuple[int, int], base: int = 16,
                 levels: int = 2, upsample: str = "transpose"):
        super().__init__()
        base = _positive_int(base, "base")
        levels = _positive_int(levels, "levels")
        if upsample not in ("transpose", "bilinear"):
            raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {upsample!r}")
        if min(image_size) < 2 ** levels:
            raise ValueError(f"levels={levels} needs images of at least {2 ** levels} px, got {image_size}")
        widths = [base * 2 ** i for i in range(levels + 1)]
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0])] +
                                  [_double_conv(widths[i - 1], widths[i]) for i in range(1, levels + 1)])
        self.pool = nn.MaxPool2d(2, 2)
        self.up = nn.ModuleList([UpBlock(widths[i + 1], widths[i], widths[i], upsample)
                                 for i in reversed(range(levels))])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for index, stage in enumerate(self.down):
            x = stage(x if index == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)


# --------------------------------------------------------------------------- registry
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": _cifar_resnet(20),
    "resnet32": _cifar_resnet(32),
    "resnet56": _cifar_resnet(56),
    "resnet18": _resnet18,
    "vgg16": _vgg("vgg16"),
    "vgg19": _vgg("vgg19"),
    "lenet5": lambda c, k, s: LeNet5(c, k, s),
    "mlp": lambda c, k, s: MLP(c, k, s),
    "cnn": lambda c, k, s: SmallCNN(c, k, s),
    "vit": ViT,
    "lstm": LSTMClassifier,
    "unet": UNet,
}

#: name -> "classification" ((N, num_classes) logits) or "segmentation" ((N, num_classes, H, W)).
MODEL_TASKS: Dict[str, str] = {name: "classification" for name in MODELS}
MODEL_TASKS["unet"] = "segmentation"

_INIT: Dict[str, Callable[[nn.Module], nn.Module]] = {"vit": vit_init_}


def _model_options(builder) -> Tuple[str, ...]:
    """The keyword options a builder takes beyond (in_channels, num_classes, image_size)."""
    params = list(inspect.signature(builder).parameters)
    return tuple(params[3:])


def build_model(name: str, in_channels: int = 3, num_classes: int = 10,
                image_size: ImageSize = 32, **options) -> nn.Module:
    """A freshly initialized network `name` (see MODELS) for images of shape
    (in_channels, image_size, image_size) - or (in_channels, h, w) for image_size=(h, w) -
    returning (N, num_classes) logits, or (N, num_classes, H, W) for segmentation models
    (MODEL_TASKS). `options` go to the model (vit: dim, depth, heads, patch_size, mlp_ratio,
    qkv_bias; lstm: hidden, layers; unet: base, levels, upsample). Uses the global torch RNG
    for the initialization (call torch.manual_seed first for a reproducible network)."""
    if not isinstance(name, str):
        raise ValueError(f"name must be a model name string, one of {sorted(MODELS)}; got {name!r}")
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    hw = _size2(image_size)
    builder = MODELS[key]
    allowed = _model_options(builder)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {key!r}; allowed: {list(allowed) or 'none'}")
    model = _INIT.get(key, kaiming_init_)(builder(in_channels, num_classes, hw, **options))
    logger.debug("built %s: %d parameters", key, sum(p.numel() for p in model.parameters()))
    return model
