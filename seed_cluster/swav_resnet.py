"""SwAV's ResNet-50 and its wide variants (x2, x4, x5), module for module as in SwAV's `src/resnet50.py`.

Two things differ from torchvision's ResNet-50 (facebookresearch/swav, src/resnet50.py):
- the input is padded by `ConstantPad2d(1, 0.0)` (module `padding`) and the stem convolution uses
  padding 2 instead of 3 (together the same zero padding of 3);
- `widen` multiplies every width, the stem included: stage widths 64w/128w/256w/512w, bottleneck
  outputs 4x those, features 2048w (RN50-w2 94M, w4 375M, w5 586M parameters per SwAV's README).

The names (`conv1`, `bn1`, `layerN.B.convK`, `layerN.0.downsample.{0,1}`) are torchvision's, so the
released weights load strictly once `module.` is removed. SwAV's projection head and prototypes are not
part of the backbone: the head is the `Encoder`'s (see `teachers.py` for the key mapping).
"""

from __future__ import annotations

import torch
from torch import nn

SWAV_WIDTHS = {"swav_resnet50": 1, "swav_resnet50w2": 2, "swav_resnet50w4": 4, "swav_resnet50w5": 5}
STAGE_BLOCKS = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SwAVResNet50(nn.Module):
    """Images [N,3,H,W] -> pooled features [N, 2048 x widen]."""

    def __init__(self, widen: int = 1):
        super().__init__()
        stem = 64 * widen
        self.widen = widen
        self.padding = nn.ConstantPad2d(1, 0.0)
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = stem
        for i, blocks in enumerate(STAGE_BLOCKS):
            planes = stem * 2 ** i
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(in_ch, planes, stride=2 if (b == 0 and i > 0) else 1))
                in_ch = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def swav_resnet(arch: str) -> SwAVResNet50:
    return SwAVResNet50(widen=SWAV_WIDTHS[arch])
