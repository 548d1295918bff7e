"""widetopo.models: shapes for varied inputs, hand-counted parameter totals, init, errors."""
import math

import pytest
import torch
from torch import nn

from references import reference_vit
from widetopo.models import MODEL_TASKS, MODELS, build_model

ALL = sorted(MODELS)
CLASSIFIERS = [n for n in ALL if MODEL_TASKS[n] == "classification"]


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _bn(c):  # weight + bias
    return 2 * c


SMALL = ["cnn", "lenet5", "mlp", "resnet20"]
CASES = [(n, 3, 32, 10) for n in SMALL] + [(n, 1, 8, 7) for n in CLASSIFIERS] + [(n, 2, 12, 100) for n in CLASSIFIERS]


@pytest.mark.parametrize("name,in_channels,image_size,num_classes", CASES)
def test_output_shape(name, in_channels, image_size, num_classes):
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size).eval()
    x = torch.randn(2, in_channels, image_size, image_size)  # 2 samples: BN in eval mode anyway
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["cnn", "lenet5", "mlp", "resnet20", "vit", "lstm"])
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


def test_model_tasks():
    assert set(MODEL_TASKS) == set(MODELS)
    assert MODEL_TASKS["unet"] == "segmentation"
    assert all(MODEL_TASKS[n] == "classification" for n in ALL if n != "unet")


def test_options_are_checked_per_model():
    with pytest.raises(ValueError, match=r"unknown option.*'depth'.*'cnn'"):
        build_model("cnn", depth=3)
    with pytest.raises(ValueError, match="allowed: .*patch_size"):
        build_model("vit", patches=3)
    with pytest.raises(ValueError, match="divisible by heads"):
        build_model("vit", dim=30, heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        build_model("vit", image_size=8, patch_size=9)
    with pytest.raises(ValueError, match="depth"):
        build_model("vit", depth=0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        build_model("vit", mlp_ratio=0)
    with pytest.raises(ValueError, match="levels=3 needs images of at least 8 px"):
        build_model("unet", image_size=6, levels=3)
    with pytest.raises(ValueError, match="upsample"):
        build_model("unet", upsample="nearest")
    with pytest.raises(ValueError, match="hidden"):
        build_model("lstm", hidden=0)


# --------------------------------------------------------------------------- vit
def _vit_count(c, k, tokens, p, dim, depth, hidden):
    """ViT parameters by hand: patch conv, class token, position embedding, blocks (two
    LayerNorms, qkv, proj, fc1, fc2, all with biases), final LayerNorm, head."""
    block = 2 * (2 * dim) + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)
    return c * p * p * dim + dim + dim + (tokens + 1) * dim + depth * block + 2 * dim + dim * k + k


@pytest.mark.parametrize("size,patch", [(32, 4), (16, 4), (12, 2), (8, 2), (4, 2), (3, 1)])
def test_vit_default_patch_and_parameter_count(size, patch):
    model = build_model("vit", 3, 10, size)
    assert model.patch_embed.kernel_size == (patch, patch) and model.patch_embed.stride == (patch, patch)
    tokens = (size // patch) ** 2
    assert model.pos_embed.shape == (1, tokens + 1, 64) and model.cls_token.shape == (1, 1, 64)
    assert _params(model) == _vit_count(3, 10, tokens, patch, 64, 4, 128)


def test_vit_options():
    model = build_model("vit", 1, 5, (12, 20), dim=24, depth=2, heads=3, patch_size=4, mlp_ratio=1.5, qkv_bias=False)
    assert len(model.blocks) == 2 and model.blocks[0].attn.heads == 3
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].fc1.out_features == 36
    assert model.pos_embed.shape == (1, 3 * 5 + 1, 24)
    assert model(torch.randn(2, 1, 12, 20)).shape == (2, 5)


def test_vit_forward_matches_explicit_attention_reference():
    torch.manual_seed(0)
    model = build_model("vit", 2, 6, (8, 12), dim=12, depth=2, heads=3, patch_size=2)
    with torch.no_grad():  # break the symmetry of the tiny init so attention is not uniform
        for prm in model.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    x = torch.randn(3, 2, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), reference_vit(model, x), rtol=1e-4, atol=1e-5)


def test_vit_init_statistics():
    torch.manual_seed(0)
    model = build_model("vit", 3, 10, 32, dim=96, depth=2)
    # N(0, 0.02^2) truncated at +-2 std: std = 0.02 * sqrt(1 - 4 phi(2) / (2 Phi(2) - 1)) = 0.01759
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    cdf2 = 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    expected = 0.02 * math.sqrt(1 - 4 * phi2 / (2 * cdf2 - 1))
    for tensor in (model.blocks[0].attn.qkv.weight, model.blocks[1].fc1.weight, model.pos_embed,
                   model.patch_embed.weight):
        assert tensor.abs().max() <= 0.04 + 1e-7
        assert abs(tensor.std().item() / expected - 1) < 0.06
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(3 * 96))
    assert torch.equal(model.patch_embed.bias, torch.zeros(96))
    assert torch.equal(model.blocks[0].norm1.weight, torch.ones(96)) and torch.equal(model.norm.bias, torch.zeros(96))
    assert model.cls_token.abs().max() <= 0.04 and model.cls_token.std() > 0


# --------------------------------------------------------------------------- lstm
def test_lstm_reads_rows_like_an_explicit_cell_loop():
    torch.manual_seed(0)
    model = build_model("lstm", 2, 4, (5, 3), hidden=6)
    assert _params(model) == 4 * 6 * (6 + 6) + 2 * 4 * 6 + 6 * 4 + 4  # W_ih, W_hh, b_ih, b_hh, head
    x = torch.randn(3, 2, 5, 3)
    lstm = model.lstm
    w_ih, w_hh = lstm.weight_ih_l0.double(), lstm.weight_hh_l0.double()
    b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).double()
    h = torch.zeros(3, 6, dtype=torch.float64)
    c = torch.zeros_like(h)
    for t in range(5):
        row = torch.cat([x[:, ch, t, :] for ch in range(2)], 1).double()  # channel-major row vector
        gates = row @ w_ih.T + h @ w_hh.T + b
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    expected = h @ model.head.weight.double().T + model.head.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- unet
def _unet_count(c, k, base, levels, transpose=True):
    def dconv(a, b):
        return a * b * 9 + 2 * b + b * b * 9 + 2 * b

    widths = [base * 2 ** i for i in range(levels + 1)]
    total = dconv(c, widths[0]) + sum(dconv(widths[i - 1], widths[i]) for i in range(1, levels + 1))
    for i in range(levels):
        up = widths[i + 1] * widths[i] * (4 if transpose else 1) + widths[i]
        total += up + dconv(2 * widths[i], widths[i])  # skip (widths[i]) + upsampled (widths[i])
    return total + widths[0] * k + k


@pytest.mark.parametrize("size,upsample", [(8, "transpose"), ((12, 20), "transpose"), (7, "transpose"),
                                           (9, "bilinear"), (16, "bilinear")])
def test_unet_per_pixel_logits_any_size(size, upsample):
    model = build_model("unet", 3, 5, size, base=4, levels=2, upsample=upsample).eval()
    h, w = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    assert out.shape == (2, 5, h, w) and torch.isfinite(out).all()
    assert _params(model) == _unet_count(3, 5, 4, 2, transpose=upsample == "transpose")


def test_unet_default_count_and_skips():
    model = build_model("unet", 1, 4, 32)
    assert _params(model) == _unet_count(1, 4, 16, 2)
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in model.modules()) == 2
    # the decoder reads the encoder: a change of the first stage's output changes the logits
    # through the skip even when the bottleneck path is cut (its upsampling weights zeroed)
    model.eval()
    with torch.no_grad():
        for block in model.up:
            block.up.weight.zero_()
            block.up.bias.zero_()
        x = torch.randn(1, 1, 32, 32)
        a = model(x)
        x2 = x.clone()
        x2[..., :4, :4] += 1.0
        assert not torch.allclose(a, model(x2))
