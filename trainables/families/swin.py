"""Family ``swin``: timm's Swin Transformer (shifted-window attention, hierarchical stages).

Stage ``i`` works on a (g / 2^i) grid of tokens (``g`` = patch grid) with width
``embed_dim * 2^i`` and ``num_heads * 2^i`` heads, attending inside windows that
shift by half a window every other block.

timm pads feature maps that are not a multiple of the window internally, without
masking the padded tokens. To keep attention exact, the image is instead zero-padded
(``vit``'s FitToPatches) to the smallest patch grid that every stage tiles exactly
(per axis): the grid is even before every patch merging, and each stage's grid is either
no larger than ``window_size`` (timm then uses one window of the whole grid, unshifted) or
a multiple of a window side in [ceil(window_size / 2), window_size] (the largest such
side is used). Shrinking the window a little avoids padding 125-pixel images to many
times their size when ``window_size * 2^(stages-1)`` does not divide the grid.

    x (B, C, H, W) -> pad (B, C, g*p, g'*p) -> stages (B, g/2^(S-1), g'/2^(S-1), D*2^(S-1)) -> pool -> (B, outputs)
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from trainables.layers.vit_common import FitToPatches, heads_multiple, use_fused_attention
from trainables.layers.windows import swin_grid
from trainables.registry import Capabilities, register_family


class SwinParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    patch_size: int = Field(default=4, ge=1)
    embed_dim: int = Field(default=32, ge=8)
    """Width of the first stage (doubles at every stage); rounded up to a multiple of num_heads."""
    stages: int = Field(default=2, ge=1, le=4)
    """Number of stages; each after the first halves the token grid (patch merging)."""
    depth: int = Field(default=2, ge=1)
    """Swin blocks per stage (regular and shifted windows alternate)."""
    num_heads: int = Field(default=2, ge=1)
    """Heads in the first stage (doubles at every stage, so each head stays embed_dim / num_heads wide)."""
    window_size: int = Field(default=4, ge=1)
    """Largest attention window side, in tokens of each stage's grid (see the module docstring)."""
    mlp_ratio: float = Field(default=4.0, gt=0)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    pool: Literal["avg", "max"] = "avg"






class Swin(nn.Module):
    def __init__(self, p: SwinParams, in_chans: int, img_size: tuple[int, int], num_outputs: int):
        super().__init__()
        (gh, wh), (gw, ww) = (swin_grid(s, p.patch_size, p.window_size, p.stages) for s in img_size)
        self.fit = FitToPatches(img_size, p.patch_size, "pad", out_size=(gh * p.patch_size, gw * p.patch_size))
        embed_dim = heads_multiple(p.embed_dim, p.num_heads)
        self.swin = SwinTransformer(
            img_size=self.fit.out_size,
            patch_size=p.patch_size,
            in_chans=in_chans,
            num_classes=num_outputs,
            global_pool=p.pool,
            embed_dim=embed_dim,
            depths=(p.depth,) * p.stages,
            num_heads=tuple(p.num_heads * 2**i for i in range(p.stages)),
            # one (h, w) window per stage (timm's docstring allows it, its annotation does not)
            window_size=[(h, w) for h, w in zip(wh, ww)],  # type: ignore[arg-type]
            mlp_ratio=p.mlp_ratio,
            drop_path_rate=p.drop_path,
        )
        use_fused_attention(self.swin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swin(self.fit(x))  # (B, C, H, W) -> (B, C, H', W') -> (B, outputs)


@register_family("swin", params=SwinParams, shape_params=("patch_size", "stages", "window_size"),
                 capabilities=Capabilities(task_heads=True))
def build_swin(p: SwinParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
               tasks: dict[str, int] | None = None) -> nn.Module:
    """Swin transformer (timm): hierarchical shifted-window attention with searchable stages and windows."""
    return Swin(p, in_chans, img_size, num_outputs)
