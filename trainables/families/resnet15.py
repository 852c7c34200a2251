"""Family ``resnet15``: the E2E CNN baseline (ResNet-15 of the CMS End-to-End studies).

A 7x7 stem convolution and max pooling, then ``blocks`` residual blocks of two
3x3 convolutions (the width doubles, with stride 2, halfway), global pooling
and a linear head: 1 + 2 x 7 = 15 convolutional layers by default.
Works with any channel count and image size (global pooling at the end).

    x (B, C, H, W) -> stem (B, w, H/4, W/4) -> blocks (B, 2w, H/8, W/8) -> pool (B, 2w) -> (B, outputs)
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainables.registry import register_family


class ResNet15Params(BaseModel):
    model_config = ConfigDict(extra="ignore")

    width: int = Field(default=16, ge=4)
    """Channels after the stem; doubled halfway through the blocks."""
    blocks: int = Field(default=7, ge=1)
    head_pool: Literal["avg", "max"] = "avg"
    dropout: float = Field(default=0.0, ge=0, lt=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.skip = (nn.Identity() if stride == 1 and c_in == c_out else
                     nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


@register_family("resnet15", params=ResNet15Params)
def build_resnet15(p: ResNet15Params, *, in_chans: int, img_size: tuple[int, int], num_outputs: int) -> nn.Module:
    """E2E ResNet-15 CNN baseline."""
    w = p.width
    layers: list[nn.Module] = [nn.Conv2d(in_chans, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                               nn.MaxPool2d(2, ceil_mode=True)]
    c = w
    for i in range(p.blocks):
        widen = i == p.blocks // 2 and min(img_size) >= 16
        layers.append(ResBlock(c, 2 * c if widen else c, 2 if widen else 1))
        c = 2 * c if widen else c
    pool = nn.AdaptiveAvgPool2d(1) if p.head_pool == "avg" else nn.AdaptiveMaxPool2d(1)
    layers += [pool, nn.Flatten(), nn.Dropout(p.dropout), nn.Linear(c, num_outputs)]
    return nn.Sequential(*layers)
