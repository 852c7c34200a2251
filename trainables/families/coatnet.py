"""Family ``coatnet``: CoAtNet (Dai et al. 2021) from timm's ``maxxvit`` blocks, for any channel count and size.

A convolutional stem, then ``len(depths)`` stages: the first ``conv_stages`` of MBConv blocks (depthwise
convolutions with squeeze-excitation), the rest of transformer blocks (self-attention over the whole
feature map of the stage, with a relative position bias), each stage halving the map and doubling the
width. The image is zero-padded to a multiple of ``stem_stride * 2^stages`` (trainables/layers/maxxvit.py).

    x (B, C, H, W) -> pad -> stem -> C x conv_stages -> T x (stages - conv_stages) -> norm, pool -> (B, outputs)
"""

from __future__ import annotations

from typing import cast

from pydantic import Field
from torch import nn

from trainables.layers.maxxvit import MAX_STAGES, MaxxNet, MaxxParams
from trainables.registry import Capabilities, register_family


class CoatnetParams(MaxxParams):
    conv_stages: int = Field(default=2, ge=0, le=MAX_STAGES - 1)
    """Leading MBConv stages (CoAtNet: 2 of 4); the others are transformer stages. At most len(depths) - 1
    are used: the last stage always attends."""


def coatnet_blocks(p: CoatnetParams) -> list[str]:
    """One block type per stage: 'C' (MBConv) for the first conv_stages (leaving the last stage 'T')."""
    n = len(p.depths)
    conv = min(p.conv_stages, n - 1)
    return ["C"] * conv + ["T"] * (n - conv)


@register_family("coatnet", params=CoatnetParams, shape_params=("depths", "stem_stride", "conv_stages"),
                 capabilities=Capabilities(task_heads=True))
def build_coatnet(p: CoatnetParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
                  tasks: dict[str, int] | None = None) -> nn.Module:
    """CoAtNet (timm maxxvit): MBConv stages, then relative-attention transformer stages."""
    return MaxxNet(p, coatnet_blocks(p), in_chans, cast("tuple[int, int]", tuple(img_size)), num_outputs)
