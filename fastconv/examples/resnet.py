"""ResNet-18 (He et al., 2015) in plain ``torch.nn``, torchvision-free, and ``fastconv.convert``
on it: the converted model gives the original's outputs and trains."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fastconv


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection; a strided 1x1
    projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18 for (N, 3, H, W) images, H and W >= 32: stem (7x7/2 conv, 3x3/2 max pool),
    four stages of two BasicBlocks (64, 128, 256, 512 channels), global average pool, fc."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def convert_and_check(batch: int = 2, size: int = 64, num_classes: int = 10, seed: int = 0):
    """Convert a ResNet-18 with ``fastconv.convert`` and check it against the original.

    Returns a dict: ``swapped`` (layers now computed by fastconv), ``max_diff`` (largest
    output difference in eval mode), ``scale`` (largest output magnitude), ``loss_before``
    and ``loss_after`` (one SGD step of the converted model in train mode, on a fixed batch).
    """
    torch.manual_seed(seed)
    original = ResNet18(num_classes).eval()
    model = fastconv.convert(copy.deepcopy(original))
    layers = (fastconv.Conv2D, fastconv.ConvTranspose2D, fastconv.MaxPool2D, fastconv.AvgPool2D)
    swapped = sum(isinstance(m, layers) for m in model.modules())
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        want, got = original(x), model(x)
    labels = torch.arange(batch) % num_classes
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return dict(swapped=swapped, max_diff=(got - want).abs().max().item(),
                scale=want.abs().max().item(), loss_before=losses[0], loss_after=losses[1])
