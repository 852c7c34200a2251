"""What families ``coatnet`` and ``maxvit`` share: timm's ``maxxvit`` stem, stages and head, assembled for
any channel count and image size.

Both are a convolutional stem (two 3x3 convolutions, the first with stride ``stem_stride``) and stages
that each halve the feature map (their first block has stride 2) and double the width, then a LayerNorm,
global average pooling and a linear head (timm's ``MaxxVitStage``, ``Stem``, ``ClassifierHead``)::

    x (B, C, H, W) -> pad (B, C, H', W') -> stem (B, S, H'/s, W'/s) -> stage i (B, D*2^i, H'/(s 2^(i+1)), ...)
      -> norm -> avg pool -> (B, outputs)

* ``coatnet`` (Dai et al. 2021): the first ``conv_stages`` stages are MBConv blocks, the others
  transformer blocks (full self-attention over the stage's feature map, relative position bias);
* ``maxvit`` (Tu et al. 2022): every block is an MBConv, then block attention inside ``window`` x ``window``
  windows, then grid attention over a dilated ``window`` x ``window`` grid (relative position bias).

Sizes: every stage's input must be even (timm's stride-2 pooling shortcut would otherwise disagree with
its stride-2 convolution), and for maxvit every stage's feature map must be a multiple of its window.
The image is zero-padded (FitToPatches, symmetric, odd pixel right/bottom) to the smallest size that
fits, per axis: coatnet to a multiple of ``stem_stride * 2^stages``; maxvit to ``2 * stem_stride * g``
for the smallest grid g of the first stage that swin's rule tiles (trainables/families/swin.py,
:func:`swin_grid`: even before every halving, and each stage at most ``window_size`` (one window) or a
multiple of a window side in [ceil(window_size / 2), window_size], the largest such side used). So
``window_size`` is an upper bound; a stage's window may be smaller, and differ between the axes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from timm.layers import ClassifierHead, calculate_drop_path_rates, get_norm_layer
from timm.models._manipulate import named_apply
from timm.models.maxxvit import MaxxVitConvCfg, MaxxVitStage, MaxxVitTransformerCfg, Stem
from torch import nn

from trainables.layers.vit_common import FitToPatches
from trainables.layers.windows import swin_grid

MAX_STAGES = 4


class MaxxParams(BaseModel):
    """Parameters coatnet and maxvit share."""

    model_config = ConfigDict(extra="ignore")

    depths: list[Annotated[int, Field(ge=1)]] = Field(default=[1, 1, 1, 1], min_length=1, max_length=MAX_STAGES)
    """Blocks per stage; the number of stages is its length (each stage halves the feature map)."""
    embed_dim: int = Field(default=32, ge=8)
    """Width of the first stage, doubled at every stage; rounded up to a multiple of dim_head."""
    dim_head: int = Field(default=16, ge=4)
    """Width of an attention head (heads per block = block width / dim_head); at most embed_dim."""
    stem_width: int = Field(default=16, ge=4)
    """Width of both stem convolutions."""
    stem_stride: Literal[1, 2] = 2
    """Stride of the stem's first convolution (1 keeps the image's resolution for small images)."""
    mlp_ratio: float = Field(default=4.0, gt=0)
    """Expansion of the MBConv blocks and of the transformer MLPs."""
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    """Stochastic-depth rate (stage-wise, rising to this value in the last stage)."""


def coatnet_size(size: int, stem_stride: int, stages: int) -> int:
    """Padded side for coatnet: the smallest multiple of stem_stride * 2^stages that is >= size."""
    unit = stem_stride * 2**stages
    return math.ceil(size / unit) * unit


def maxvit_size(size: int, stem_stride: int, stages: int, window: int) -> tuple[int, list[int]]:
    """Padded side for maxvit and the window side of each stage along that axis."""
    g, windows = swin_grid(size, 2 * stem_stride, window, stages)
    return 2 * stem_stride * g, windows


class MaxxNet(nn.Module):
    """Stem + timm MaxxVit stages + norm + head for ``block_types`` ('C' MBConv, 'T' transformer, 'M' MaxViT
    block, one per stage) on images of ``img_size`` (padded as the module docstring says)."""

    def __init__(self, p: MaxxParams, block_types: list[str], in_chans: int, img_size: tuple[int, int],
                 num_outputs: int, window: int | None = None):
        super().__init__()
        stages = len(p.depths)
        windows: list[tuple[int, int] | None]
        if window is None:
            h, w = img_size
            out = (coatnet_size(h, p.stem_stride, stages), coatnet_size(w, p.stem_stride, stages))
            windows = [None] * stages
        else:
            (oh, wh), (ow, ww) = (maxvit_size(s, p.stem_stride, stages, window) for s in img_size)
            out, windows = (oh, ow), list(zip(wh, ww))
        self.fit = FitToPatches(img_size, 1, "pad", out_size=out)
        dh = min(p.dim_head, p.embed_dim)
        width = math.ceil(p.embed_dim / dh) * dh
        widths = [width * 2**i for i in range(stages)]
        self.windows = windows
        conv_cfg = MaxxVitConvCfg(expand_ratio=p.mlp_ratio)
        attn_cfg = MaxxVitTransformerCfg(dim_head=dh, expand_ratio=p.mlp_ratio)
        assert conv_cfg.norm_eps is not None  # MaxxVitConvCfg.__post_init__ sets it
        self.stem = Stem(in_chans, p.stem_width, act_layer=conv_cfg.act_layer,  # int: both convolutions
                         norm_layer=conv_cfg.norm_layer, norm_eps=conv_cfg.norm_eps)
        if p.stem_stride == 1:  # same padding (1) for both strides: the map keeps the image's size
            self.stem.conv1.stride = (1, 1)
        feat = (out[0] // p.stem_stride, out[1] // p.stem_stride)
        dpr = calculate_drop_path_rates(p.drop_path, list(p.depths), stagewise=True)
        blocks, in_chs = [], p.stem_width
        for i in range(stages):
            feat = (feat[0] // 2, feat[1] // 2)
            cfg = attn_cfg if windows[i] is None else replace(attn_cfg, window_size=windows[i], grid_size=windows[i])
            blocks.append(MaxxVitStage(in_chs, widths[i], depth=p.depths[i], feat_size=feat,
                                       block_types=block_types[i], transformer_cfg=cfg, conv_cfg=conv_cfg,
                                       drop_path=dpr[i]))
            in_chs = widths[i]
        self.stages = nn.Sequential(*blocks)
        self.feat_size = feat
        self.norm = partial(get_norm_layer(attn_cfg.norm_layer), eps=attn_cfg.norm_eps)(widths[-1])
        self.head = ClassifierHead(widths[-1], num_outputs, pool_type="avg")
        named_apply(partial(_init, scheme="vit_eff"), self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, outputs)."""
        return self.head(self.norm(self.stages(self.stem(self.fit(x)))))


def _init(module: nn.Module, name: str, scheme: str = "") -> None:
    """timm MaxxVit's weight initialization: each block's own ``init_weights``."""
    init_weights = getattr(module, "init_weights", None)
    if init_weights is not None:
        try:
            init_weights(scheme=scheme)
        except TypeError:
            init_weights()
