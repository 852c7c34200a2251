"""Family ``vit``: timm's VisionTransformer on detector images of any size and channel count.

Image sizes that are not a multiple of the patch size are handled explicitly by
``patch_fit``:

* ``pad`` (default): zero-pad symmetrically up to the next multiple (zeros are
  what an empty detector cell holds, so no information is lost or invented);
* ``crop``: centre-crop down to the previous multiple (drops the outer ring).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from e2e_search.registry import register_family


class VitParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    patch_size: int = Field(default=5, ge=1)
    depth: int = Field(default=4, ge=1)
    embed_dim: int = Field(default=64, ge=8)
    """Rounded up to a multiple of num_heads (attention splits it evenly across heads)."""
    num_heads: int = Field(default=4, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    pool: Literal["token", "avg", "map"] = "token"
    """Output head: class token, mean over patches, or attention pooling."""
    patch_fit: Literal["pad", "crop"] = "pad"


def fitted_size(size: int, patch: int, how: str) -> int:
    if how == "pad":
        return math.ceil(size / patch) * patch
    if size < patch:
        raise ValueError(f"patch_size {patch} is larger than the image ({size} pixels): use patch_fit: pad")
    return (size // patch) * patch


class FitToPatches(nn.Module):
    """(B, C, H, W) -> (B, C, H', W') with H', W' multiples of the patch size."""

    def __init__(self, img_size: tuple[int, int], patch: int, how: str):
        super().__init__()
        self.how = how
        self.out_size = tuple(fitted_size(s, patch, how) for s in img_size)
        h, w = img_size
        dh, dw = self.out_size[0] - h, self.out_size[1] - w
        if how == "pad":  # F.pad order: (left, right, top, bottom)
            self.pad = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)
        else:
            self.crop = (-dh // 2, -dw // 2)  # offsets of the kept window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "pad":
            return F.pad(x, self.pad) if any(self.pad) else x
        top, left = self.crop
        return x[..., top : top + self.out_size[0], left : left + self.out_size[1]]


@register_family("vit", params=VitParams)
def build_vit(p: VitParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int) -> nn.Module:
    """Vision transformer (timm) with searchable patch size, depth, width, heads and pooling."""
    fit = FitToPatches(img_size, p.patch_size, p.patch_fit)
    embed_dim = math.ceil(p.embed_dim / p.num_heads) * p.num_heads
    vit = VisionTransformer(
        img_size=fit.out_size,
        patch_size=p.patch_size,
        in_chans=in_chans,
        num_classes=num_outputs,
        global_pool=p.pool,
        class_token=p.pool == "token",
        embed_dim=embed_dim,
        depth=p.depth,
        num_heads=p.num_heads,
        mlp_ratio=p.mlp_ratio,
        drop_path_rate=p.drop_path,
    )
    return nn.Sequential(fit, vit)
