"""Tiny networks, contexts and the hand-written BatchNorm calibration shared by the scorer tests
(test_scores_*.py). Plain PyTorch only: nothing here calls widetopo's scoring code."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from widetopo.scores import ScoreContext


class TinyCNN(nn.Module):
    def __init__(self, classes=5, track=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, track_running_stats=track)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6, track_running_stats=track)
        self.fc = nn.Linear(6 * 4 * 4, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """10 -> hidden... -> 3; tanh after the last hidden layer, ReLU after the others."""

    def __init__(self, hidden=(16, 12)):
        super().__init__()
        widths = (10,) + tuple(hidden) + (3,)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x):
        for k, layer in enumerate(self.layers[:-1]):
            x = layer(x)
            x = torch.tanh(x) if k == len(self.layers) - 2 else torch.relu(x)
        return self.layers[-1](x)


class MLP1(MLP):
    """One hidden layer: 10 -> 16 -> 3."""

    def __init__(self):
        super().__init__(hidden=(16,))


def make_model(cls=TinyCNN, dtype=torch.float64, seed=0, **kw):
    """A seeded model with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    model = cls(**kw).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def make_ctx(model, keep=0.7, seed=3, round_index=2, mask_seed=99):
    """ScoreContext over the weights of rank >= 2, with random masks (kept fraction ~keep) and
    the prunable parameters holding theta * m."""
    g = torch.Generator().manual_seed(mask_seed)
    names = [n for n, p in model.named_parameters() if p.dim() > 1]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    masks = [torch.rand(params[n].shape, generator=g) < keep for n in names]
    for n, m in zip(names, masks):
        params[n] = params[n] * m
    return ScoreContext(model=model, names=names, params=params, buffers=buffers, masks=masks,
                        round=round_index, seed=seed)


def masked_copy(model, ctx, buffers=None):
    """A deep copy of model holding ctx's parameters (theta * m for the prunable ones) and
    ctx's buffers (or `buffers`)."""
    net = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(ctx.params[n])
        for n, b in net.named_buffers():
            b.copy_((buffers or ctx.buffers)[n])
    return net


def calibrated_copy(model, ctx, x):
    """BN statistics of batch x by hand: a deep copy with ctx's parameters, its BatchNorm layers
    reset and run in train mode with momentum 1 on x; returned in eval mode."""
    net = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(ctx.params[n])
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = 1.0
            m.train()
    with torch.no_grad():
        net(x)
    return net.eval()


def calibrated_buffers(model, ctx, x):
    """The buffers of calibrated_copy(model, ctx, x)."""
    return {n: b.detach().clone() for n, b in calibrated_copy(model, ctx, x).named_buffers()}
