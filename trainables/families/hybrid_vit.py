"""Family ``hybrid_vit``: a small convolutional stem feeding timm's VisionTransformer.

The stem (``stem_layers`` conv3x3-BN-GELU layers, ``stem_channels`` wide, the first
log2(``stem_stride``) of them with stride 2) turns sparse detector hits into dense local
features before tokenization; timm's ``HybridEmbed`` then cuts its feature map into
``patch_size`` x ``patch_size`` patches (a 1x1 patch makes every stem pixel a token).
The image is zero-padded to a multiple of ``stem_stride * patch_size`` (FitToPatches).

    x (B, C, H, W) -> pad -> stem (B, S, H/s, W/s) -> patches (B, N, D) -> ViT blocks -> pool -> (B, outputs)
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

from pydantic import Field
from timm.layers import HybridEmbed
from torch import nn

from trainables.layers.vit_common import FitToPatches, TimmVitParams, timm_vit
from trainables.registry import Capabilities, register_family


class HybridVitParams(TimmVitParams):
    stem_channels: int = Field(default=32, ge=4)
    """Width of every stem convolution."""
    stem_layers: int = Field(default=2, ge=1, le=6)
    """Conv-BN-GELU layers in the stem (raised to log2(stem_stride) if that is larger)."""
    stem_stride: Literal[1, 2, 4, 8] = 4
    """Total downsampling of the stem (its first log2(stem_stride) layers have stride 2)."""
    patch_size: int = Field(default=2, ge=1)
    """Patch side on the stem's feature map (image pixels per token side: stem_stride * patch_size)."""


def conv_stem(in_chans: int, width: int, layers: int, stride: int) -> nn.Sequential:
    """(B, C, H, W) -> (B, width, H / stride, W / stride) for H, W multiples of stride."""
    n_down = int(math.log2(stride))
    mods: list[nn.Module] = []
    for i in range(max(layers, n_down)):
        mods += [nn.Conv2d(in_chans if i == 0 else width, width, 3, 2 if i < n_down else 1, 1, bias=False),
                 nn.BatchNorm2d(width), nn.GELU()]
    return nn.Sequential(*mods)


@register_family("hybrid_vit", params=HybridVitParams, shape_params=("patch_size", "stem_stride"),
                 capabilities=Capabilities(task_heads=True, rollout=True))
def build_hybrid_vit(p: HybridVitParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
                     tasks: dict[str, int] | None = None) -> nn.Module:
    """Hybrid ViT: convolutional stem + timm VisionTransformer on its feature map."""
    fit = FitToPatches(img_size, p.stem_stride * p.patch_size, "pad")
    stem = conv_stem(in_chans, p.stem_channels, p.stem_layers, p.stem_stride)
    vit = timm_vit(p, img_size=fit.out_size, in_chans=in_chans, num_outputs=num_outputs,
                   embed_layer=partial(HybridEmbed, backbone=stem))
    return nn.Sequential(fit, vit)
