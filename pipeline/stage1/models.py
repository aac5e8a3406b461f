"""Backbones with ``forward_features(x) -> [B, d]`` and a separate linear classifier ``fc`` (timm style)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import ResNet as TVResNet

MODELS = {}


def register_model(name):
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def create_model(name: str, num_classes: int, fc_init: str | None = None) -> nn.Module:
    """``fc_init``: None keeps the backbone's own init; "default" re-draws the final linear layer with
    PyTorch's nn.Linear default (BALMS's separate DotProduct_Classifier; recipe `balms`)."""
    model = MODELS[name](num_classes)
    if fc_init == "default":
        model.fc.reset_parameters()
    elif fc_init is not None:
        raise ValueError(f"unknown fc_init {fc_init!r}; expected None or 'default'")
    return model


# ----------------------------------------------------------------------------------------------------
# ResNet-32 for CIFAR, exactly as LDAM-DRW's models/resnet_cifar.py (He et al. 2016, option-A shortcuts)

class _BlockA(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # option A: parameter-free shortcut (subsample by 2, zero-pad the new channels)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def shortcut(self, x):
        if not self.pad:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks=(5, 5, 5), num_classes=10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], 1)
        self.layer2 = self._make_layer(32, num_blocks[1], 2)
        self.layer3 = self._make_layer(64, num_blocks[2], 2)
        self.feature_dim = 64
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # LDAM-DRW's _weights_init: kaiming normal on conv and linear weights
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(_BlockA(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x):
        return self.fc(self.forward_features(x))


@register_model("resnet32")
def resnet32(num_classes=10):
    return CifarResNet((5, 5, 5), num_classes)


# ----------------------------------------------------------------------------------------------------
# torchvision ResNets with forward_features:
#   resnet10  ImageNet-LT (Decoupling: BasicBlock, [1, 1, 1, 1], 7x7/2 stem + maxpool, 512-d feature)
#   resnet50  Bottleneck [3, 4, 6, 3], 2048-d feature: the usual iNaturalist 2018 backbone

class TorchvisionResNet(TVResNet):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__(block, layers, num_classes=num_classes)
        self.feature_dim = self.fc.in_features

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.forward_features(x))


@register_model("resnet10")
def resnet10(num_classes=1000):
    return TorchvisionResNet(TVBasicBlock, [1, 1, 1, 1], num_classes)


@register_model("resnet50")
def resnet50(num_classes=1000):
    from torchvision.models.resnet import Bottleneck
    return TorchvisionResNet(Bottleneck, [3, 4, 6, 3], num_classes)
