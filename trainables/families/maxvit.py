"""Family ``maxvit``: MaxViT (Tu et al. 2022) from timm's ``maxxvit`` blocks, for any channel count and size.

A convolutional stem, then ``len(depths)`` stages of MaxViT blocks, each stage halving the feature map
and doubling the width. A block is an MBConv, then *block* attention (inside non-overlapping
``window`` x ``window`` windows: local) and *grid* attention (over a ``window`` x ``window`` grid spread
across the whole map: global, dilated), each with a relative position bias and an MLP. The image is
zero-padded so that every stage's map is a multiple of its window (trainables/layers/maxxvit.py);
``window_size`` is the largest window side, a stage may use a smaller one.

    x (B, C, H, W) -> pad -> stem -> [MBConv, block attn, grid attn] x depths -> norm, pool -> (B, outputs)
"""

from __future__ import annotations

from typing import cast

from pydantic import Field
from torch import nn

from trainables.layers.maxxvit import MaxxNet, MaxxParams
from trainables.registry import Capabilities, register_family


class MaxvitParams(MaxxParams):
    window_size: int = Field(default=4, ge=1)
    """Largest window (block attention) and grid (grid attention) side, in tokens of each stage's map."""


@register_family("maxvit", params=MaxvitParams, shape_params=("depths", "stem_stride", "window_size"),
                 capabilities=Capabilities(task_heads=True))
def build_maxvit(p: MaxvitParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
                 tasks: dict[str, int] | None = None) -> nn.Module:
    """MaxViT (timm maxxvit): MBConv + window and grid attention in every block."""
    return MaxxNet(p, ["M"] * len(p.depths), in_chans, cast("tuple[int, int]", tuple(img_size)), num_outputs,
                   window=p.window_size)
