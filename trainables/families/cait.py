"""Family ``cait``: timm's CaiT (Class-Attention in Image Transformers, Touvron et al. 2021).

``depth`` self-attention blocks (talking-heads attention, LayerScale) mix the patch
tokens only; then ``class_attn_layers`` class-attention blocks let a class token
(inserted late) read the frozen patch tokens, and its final state feeds the head.
Image sizes that are not a multiple of the patch size are zero-padded (FitToPatches).

    x (B, C, H, W) -> pad -> patches (B, N, D) -> SA x depth -> CA x class_attn_layers (B, 1, D) -> (B, outputs)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from timm.models.cait import Cait
from torch import nn

from trainables.layers.vit_blocks import MLP
from trainables.layers.vit_common import FitToPatches, heads_multiple, use_fused_attention
from trainables.registry import Capabilities, register_family


class CaitParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    patch_size: int = Field(default=5, ge=1)
    embed_dim: int = Field(default=64, ge=8)
    """Rounded up to a multiple of num_heads."""
    depth: int = Field(default=2, ge=1)
    """Self-attention blocks over the patch tokens (talking-heads attention costs ~3x a ViT block)."""
    class_attn_layers: int = Field(default=2, ge=1)
    """Class-attention blocks at the end (only the class token is updated; it reads the patch tokens)."""
    num_heads: int = Field(default=4, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    layer_scale: float = Field(default=0.1, gt=0, le=1)
    """Initial LayerScale of every residual branch (CaiT uses 0.1 up to depth 18, smaller when deeper)."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """MLP of both kinds of block: GELU, or SwiGLU (Shazeer 2020) with 2/3 of the hidden width."""


@register_family("cait", params=CaitParams, shape_params=("patch_size",),
                 capabilities=Capabilities(task_heads=True, rollout=True))
def build_cait(p: CaitParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
               tasks: dict[str, int] | None = None) -> nn.Module:
    """CaiT (timm): patch self-attention followed by class-attention layers, with LayerScale."""
    fit = FitToPatches(img_size, p.patch_size, "pad")
    embed_dim = heads_multiple(p.embed_dim, p.num_heads)
    cait = Cait(
        img_size=fit.out_size,  # type: ignore[arg-type]  # timm annotates int; (H, W) works (to_2tuple)
        patch_size=p.patch_size,
        in_chans=in_chans,
        num_classes=num_outputs,
        global_pool="token",
        embed_dim=embed_dim,
        depth=p.depth,
        depth_token_only=p.class_attn_layers,
        num_heads=p.num_heads,
        mlp_ratio=p.mlp_ratio,
        mlp_ratio_token_only=p.mlp_ratio,
        drop_path_rate=p.drop_path,
        init_values=p.layer_scale,
        mlp_block=MLP[p.mlp],
        mlp_block_token_only=MLP[p.mlp],
    )
    return nn.Sequential(fit, use_fused_attention(cait))
