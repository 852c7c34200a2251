"""Family ``vit``: timm's VisionTransformer on detector images of any size and channel count.

Image sizes that are not a multiple of the patch size are handled explicitly by
``patch_fit``:

* ``pad`` (default): zero-pad symmetrically up to the next multiple (zeros are
  what an empty detector cell holds, so no information is lost or invented);
* ``crop``: centre-crop down to the previous multiple (drops the outer ring).

The token mixer of every block is chosen by ``attention``:

* ``softmax``: full softmax attention through PyTorch's fused
  ``F.scaled_dot_product_attention`` (timm's ``Attention`` with ``fused_attn``);
* ``linear``: kernelized linear attention (Katharopoulos et al. 2020, feature map
  elu(x) + 1), O(N) in the number of tokens;
* ``window``: local attention, each patch attends only to the patches of its
  ``window_size`` x ``window_size`` window on the patch grid (a boolean mask for the
  fused kernel); the class token attends to, and is attended by, every token.

All three keep timm's parameter names (``qkv``, ``proj``), so state dicts are interchangeable.

Techniques shared with ``hybrid_vit`` (``TimmVitParams``; each default keeps timm's plain ViT, with the
same state dict): ``pos_embed`` (learned, sincos, rope, none), ``reg_tokens`` (Darcet et al. 2024),
``mlp`` (gelu or swiglu), ``qk_norm`` (Dehghani et al. 2023) and ``layer_scale`` (Touvron et al. 2021).
Only ``vit`` has ``token_keep``: with ``nonempty`` only the patches holding a hit become tokens
(trainables/families/_vit_model.py); with ``pair_bias`` too, ParT's pair features of the kept patches (centres,
summed hit energies) are embedded per head and added to the attention logits of every block, as the
``hit_transformer`` family does for single hits (trainables/families/_pair_bias.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainables.families._vit_blocks import (ATTENTION, MLP, LinearAttention, SoftmaxAttention, WindowAttention,
                                             window_mask)
from trainables.families._vit_model import Vit
from trainables.registry import Capabilities, register_family

__all__ = ["ATTENTION", "FitToPatches", "LinearAttention", "SoftmaxAttention", "TimmVitParams", "VitParams",
           "WindowAttention", "build_vit", "fitted_size", "heads_multiple", "timm_vit", "use_fused_attention",
           "window_mask"]


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


class VitParams(TimmVitParams):
    patch_size: int = Field(default=5, ge=1)
    patch_fit: Literal["pad", "crop"] = "pad"
    attention: Literal["softmax", "linear", "window"] = "softmax"
    """Token mixer: fused softmax attention, kernelized linear attention (O(N)), or local window attention."""
    window_size: int = Field(default=5, ge=1)
    """Window side in patches (attention: window only); the last windows of a row/column may be smaller."""
    token_keep: Literal["all", "nonempty"] = "all"
    """Which patches become tokens: all, or only those holding a hit (variable length, padded and masked)."""
    pair_bias: bool = False
    """ParT's pair features (ln ΔR, ln kT, ln z, ln m²) of the kept patches' centres and summed energies, embedded
    per head and added to every block's attention logits. Only with token_keep: nonempty and attention: softmax;
    ignored otherwise (as window_size is without attention: window)."""
    pair_width: int = Field(default=8, ge=1)
    """Hidden width of the pair-feature MLP (pair_bias)."""


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
        self.out_size = tuple(out_size or (fitted_size(s, patch, how) for s in img_size))
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


def use_fused_attention(model: nn.Module) -> nn.Module:
    """Make every timm attention module of ``model`` call ``F.scaled_dot_product_attention``."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    return model


@register_family("vit", params=VitParams, shape_params=("patch_size", "patch_fit"),
                 capabilities=Capabilities(task_heads=True, rollout=True, empty_pixel=True, pixel_std=True))
def build_vit(p: VitParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
              tasks: dict[str, int] | None = None, empty_pixel: Sequence[float] | None = None,
              pixel_std: Sequence[float] | None = None) -> nn.Module:
    """Vision transformer (timm) with searchable patch size, depth, width, heads, pooling, attention type,
    positions, registers, MLP, QK-norm, LayerScale, and empty-patch dropping."""
    fit = FitToPatches(img_size, p.patch_size, p.patch_fit)
    extra = {}
    if p.token_keep == "nonempty":
        extra = {"token_keep": "nonempty", "real": fit(torch.ones(1, 1, *img_size))[0, 0] > 0,
                 "empty_pixel": empty_pixel, "window": p.window_size if p.attention == "window" else None}
    if p.pair_bias and p.token_keep == "nonempty" and p.attention == "softmax":  # ignored otherwise (window_size's rule)
        extra.update(pair_bias=True, pair_width=p.pair_width, pixel_std=pixel_std)
    vit = timm_vit(p, img_size=fit.out_size, in_chans=in_chans, num_outputs=num_outputs,
                   attn_layer=ATTENTION[p.attention], **extra)
    if p.attention == "window" and p.token_keep == "all":
        for blk in vit.blocks:
            blk.attn.set_window(tuple(vit.patch_embed.grid_size), p.window_size, vit.num_prefix_tokens)
    return nn.Sequential(fit, vit)
