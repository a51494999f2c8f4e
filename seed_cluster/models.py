"""Encoders: a backbone (timm, or a small convnet for tiny images) followed by a projection head.

SEED's student head is Linear(d, d) - ReLU - Linear(d, dim) without BN (official
code, `SEED/models`), d being the backbone's feature width; MoCo-v2 uses the same
MLP. Teachers bring their own heads (`build_head` kinds, DESIGN.md §3). The
embedding an `Encoder` returns is L2-normalised. Backbones: timm models, SwAV's
(wide) ResNet-50 (`swav_resnet.py`) and small convnets for tiny images.
"""

from __future__ import annotations

import difflib
import logging

import timm
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .swav_resnet import SWAV_WIDTHS, swav_resnet

logger = logging.getLogger(__name__)

# Small plain convnets (six conv-BN-ReLU blocks, downsampling by 2 at blocks 2, 4 and 6):
# on 28-32 px images they learn in a few hundred steps where ImageNet-stem timm models
# barely move (prototype on digits, DESIGN.md §4). Widths of the three stages.
SMALL_CONVNETS: dict[str, tuple[int, int, int]] = {
    "convnet_s": (32, 64, 128),
    "convnet_m": (64, 128, 256),
    "convnet_l": (96, 192, 384),
}


class SmallConvNet(nn.Module):
    def __init__(self, widths: tuple[int, int, int]):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for width in widths:
            for stride in (1, 2):
                layers += [nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                in_ch = width
        self.features = nn.Sequential(*layers)
        self.num_features = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def feature_width(backbone: nn.Module) -> int:
    """Width of the backbone's output. timm's `num_features` is the width *before* a post-pooling head conv
    (MobileNetV3: 960, while the model outputs 1280); `head_hidden_size` is what it really returns."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def build_backbone(arch: str, key: str = "student.arch") -> nn.Module:
    """A feature extractor mapping images to [N, feature_width(backbone)]."""
    check_arch(arch, key)
    if arch in SMALL_CONVNETS:
        return SmallConvNet(SMALL_CONVNETS[arch])
    if arch in SWAV_WIDTHS:
        return swav_resnet(arch)
    return timm.create_model(arch, pretrained=False, num_classes=0)


def check_arch(arch: str, key: str = "student.arch") -> None:
    """Raise a one-line ConfigError unless `arch` names a backbone `build_backbone` can build (builds nothing)."""
    if arch in SMALL_CONVNETS or arch in SWAV_WIDTHS or timm.is_model(arch):
        return
    ours = list(SMALL_CONVNETS) + list(SWAV_WIDTHS)
    close = difflib.get_close_matches(arch, timm.list_models() + ours, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models('<pattern>')"
    raise ConfigError(f"{key}={arch!r} is neither a timm model nor one of {', '.join(ours)}; {hint}")


def build_head(kind: str, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Projection heads, named after the methods whose released weights they hold (indices as saved):
    mlp       Linear-ReLU-Linear                      SEED student, MoCo-v2 (fc.0/fc.2), SwAV w5 (no BN)
    mlp_bn    Linear-BN-ReLU-Linear                   SwAV (projection_head.0/1/3), SimCLR re-impl. (fc.0/1/3)
    linear    Linear                                  MoCo-v1 (fc)
    mocov3    Linear(no bias)-BN-ReLU-Linear(no bias)-BN(affine=False)   MoCo-v3 ResNet projector (fc.0/1/3/4)
    dino      Linear-GELU-Linear-GELU-Linear          DINO head's MLP to its bottleneck (head.mlp.0/2/4; the
                                                     weight-normalised last layer is not part of the embedding)
    none      identity: the embedding is the backbone feature
    """
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
    if kind == "mlp_bn":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                             nn.Linear(hidden_dim, out_dim))
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mocov3":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                             nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=False),
                             nn.BatchNorm1d(out_dim, affine=False))
    if kind == "dino":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                             nn.Linear(hidden_dim, out_dim))
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"head kind {kind!r} is unknown; use mlp, mlp_bn, linear, mocov3, dino or none")


class Encoder(nn.Module):
    """backbone -> head -> L2 normalisation. `features()` gives the backbone output used for evaluation."""

    def __init__(self, arch: str, dim: int, head: str = "mlp", hidden_dim: int = 0, key: str = "student.arch"):
        super().__init__()
        self.arch = arch
        self.backbone = build_backbone(arch, key)
        width = feature_width(self.backbone)
        self.head = build_head(head, width, hidden_dim or width, dim)
        self.dim = width if head == "none" else dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


def build_student(arch: str, dim: int) -> Encoder:
    return Encoder(arch, dim, head="mlp", key="student.arch")


@torch.no_grad()
def fold_batchnorm(network: nn.Module) -> int:
    """Fold every BatchNorm2d that only normalises one Conv2d's output into that convolution; returns how many.

    In eval mode a BatchNorm2d is the per-channel affine map ``y = (x - mean) / sqrt(var + eps) * w + b``, so
    ``bn(conv(x))`` equals one convolution with its weight scaled per output channel and a bias. This is for
    networks that never train again (the frozen teacher): the folded convolution saves one pass over every
    activation, and the BN becomes ``nn.Identity``. Which BN follows which convolution is read from the
    network's traced graph (torch.fx), not from module names, so a pair is folded only when the convolution's
    output goes to the BN and nowhere else. A network that cannot be traced is left unchanged (logged).
    """
    try:
        graph = torch.fx.symbolic_trace(network).graph
    except Exception as error:  # tracing is best effort: any network without a traceable forward keeps its BNs
        logger.info("fold_batchnorm: %s cannot be traced (%s); its BatchNorm layers are kept",
                    type(network).__name__, error)
        return 0
    modules = dict(network.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
            continue
        source = node.args[0]
        conv = modules.get(source.target) if isinstance(source, torch.fx.Node) and source.op == "call_module" else None
        # A module called twice shares its weights between both calls: folding would change the other one.
        if type(conv) is not nn.Conv2d or len(source.users) != 1 or calls[source.target] != 1:
            continue
        _fold_into(conv, bn)
        network.set_submodule(node.target, nn.Identity())
        folded += 1
    return folded


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Scale `conv`'s output channels and add the bias that together equal `bn(conv(x))` in eval mode.
    Computed in float64 so the fold adds no rounding beyond the final cast."""
    dtype = conv.weight.dtype
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(dtype))
    conv.bias = nn.Parameter(bias.to(dtype), requires_grad=conv.weight.requires_grad)
