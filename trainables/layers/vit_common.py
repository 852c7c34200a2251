"""What the ViT-like families share: timm's VisionTransformer arguments, fitting an image to a patch grid, head
counts, fused attention."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal, TypeVar, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainables.layers.vit_blocks import MLP
from trainables.layers.vit_model import Vit


class TimmVitParams(BaseModel):
    """What timm's VisionTransformer takes from every ViT-like family (see :func:`timm_vit`)."""

    model_config = ConfigDict(extra="ignore")

    depth: int = Field(default=4, ge=1)
    embed_dim: int = Field(default=64, ge=8)
    """Rounded up to a multiple of num_heads (attention splits it evenly across heads)."""
    num_heads: int = Field(default=4, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    pool: Literal["token", "avg", "map"] = "token"
    """Output head: class token, mean over patches, or attention pooling."""
    pos_embed: Literal["learned", "rope", "sincos", "none"] = "learned"
    """Position information: learned table, 2-D rotary (RoPE-ViT), fixed 2-D sin-cos table, or none."""
    reg_tokens: int = Field(default=0, ge=0)
    """Register tokens (Darcet et al. 2024): extra learned tokens next to the class token, never pooled."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """Block MLP: GELU, or SwiGLU (Shazeer 2020) with 2/3 of the hidden width (same parameter count)."""
    qk_norm: bool = False
    """LayerNorm of every head's queries and keys before attention (Dehghani et al. 2023)."""
    layer_scale: float | None = Field(default=None, gt=0)
    """Initial LayerScale of both residual branches of every block (Touvron et al. 2021); None: none."""
    if TYPE_CHECKING:  # declared by each family's subclass, with its own default and bounds (not a field here)
        patch_size: int



def fitted_size(size: int, patch: int, how: str) -> int:
    if how == "pad":
        return math.ceil(size / patch) * patch
    if size < patch:
        raise ValueError(f"patch_size {patch} is larger than the image ({size} pixels) and patch_fit: crop cannot "
                         f"fit it; choose a patch_size of at most {size} or patch_fit: pad")
    return (size // patch) * patch



class FitToPatches(nn.Module):
    """(B, C, H, W) -> (B, C, H', W') with H', W' multiples of the patch size.

    ``out_size`` overrides the target (H', W') for models with stricter size rules (e.g. swin).
    """

    def __init__(self, img_size: tuple[int, int], patch: int, how: str, out_size: tuple[int, int] | None = None):
        super().__init__()
        self.how = how
        self.out_size = cast("tuple[int, int]", tuple(out_size or (fitted_size(s, patch, how) for s in img_size)))
        wrong_way = [o < s if how == "pad" else o > s for o, s in zip(self.out_size, img_size)]
        if any(wrong_way):
            raise ValueError(f"cannot {how} images of {tuple(img_size)} pixels to {self.out_size}; choose a patch "
                             "size that fits the image")
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



def heads_multiple(dim: int, heads: int) -> int:
    """A width rounded up to a multiple of the number of heads (attention splits it evenly)."""
    return math.ceil(dim / heads) * heads



def timm_vit(p: TimmVitParams, *, img_size: tuple[int, int], in_chans: int, num_outputs: int, **extra) -> Vit:
    """timm's VisionTransformer (as :class:`Vit`) from the parameters ViT-like families share (patch_size,
    embed_dim, depth, num_heads, mlp_ratio, drop_path, pool, pos_embed, reg_tokens, mlp, qk_norm, layer_scale),
    with fused attention; ``extra`` goes to :class:`Vit` / timm as is."""
    return use_fused_attention(Vit(
        img_size=img_size,
        patch_size=p.patch_size,
        in_chans=in_chans,
        num_classes=num_outputs,
        global_pool=p.pool,
        class_token=p.pool == "token",
        embed_dim=heads_multiple(p.embed_dim, p.num_heads),
        depth=p.depth,
        num_heads=p.num_heads,
        mlp_ratio=p.mlp_ratio,
        drop_path_rate=p.drop_path,
        pos_embed=p.pos_embed,
        reg_tokens=p.reg_tokens,
        mlp_layer=MLP[p.mlp],
        qk_norm=p.qk_norm,
        init_values=p.layer_scale,
        **extra,
    ))



ModuleT = TypeVar("ModuleT", bound=nn.Module)


def use_fused_attention(model: ModuleT) -> ModuleT:
    """Make every timm attention module of ``model`` call ``F.scaled_dot_product_attention``."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True  # type: ignore[assignment]  # a bool flag; the stubs type attributes Tensor | Module
    return model
