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
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from e2e_search.registry import Capabilities, register_family


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


class VitParams(TimmVitParams):
    patch_size: int = Field(default=5, ge=1)
    patch_fit: Literal["pad", "crop"] = "pad"
    attention: Literal["softmax", "linear", "window"] = "softmax"
    """Token mixer: fused softmax attention, kernelized linear attention (O(N)), or local window attention."""
    window_size: int = Field(default=5, ge=1)
    """Window side in patches (attention: window only); the last windows of a row/column may be smaller."""


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


def timm_vit(p: BaseModel, *, img_size: tuple[int, int], in_chans: int, num_outputs: int, **extra) -> VisionTransformer:
    """timm's VisionTransformer from the parameters ViT-like families share (patch_size, embed_dim, depth,
    num_heads, mlp_ratio, drop_path, pool), with fused attention; ``extra`` goes to timm as is."""
    return use_fused_attention(VisionTransformer(
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
        **extra,
    ))


def use_fused_attention(model: nn.Module) -> nn.Module:
    """Make every timm attention module of ``model`` call ``F.scaled_dot_product_attention``."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    return model


class LinearAttention(Attention):
    """Kernelized linear attention, phi(x) = elu(x) + 1 (Katharopoulos et al. 2020).

        out_i = phi(q_i) . sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps)

    costs O(N d^2) instead of O(N^2 d); computed in float32 (autocast off) for stability.
    """

    eps: float = 1e-6

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("linear attention takes no attention mask")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                              # (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        # (the meta device, on which e2e_search/shapes.py builds models, has no autocast: use the CPU's there)
        with torch.autocast(device_type="cpu" if x.device.type == "meta" else x.device.type, enabled=False):
            q, k, v = F.elu(q.float()) + 1, F.elu(k.float()) + 1, v.float()
            kv = torch.einsum("bhnd,bhne->bhde", k, v)                       # (B, h, d, d)
            den = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)) + self.eps  # (B, h, N)
            out = torch.einsum("bhnd,bhde->bhne", q, kv) / den.unsqueeze(-1)  # (B, h, N, d)
        out = out.to(x.dtype).transpose(1, 2).reshape(B, N, self.attn_dim)   # (B, N, h*d)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(self.norm(out)))                     # (B, N, D)


def window_mask(grid: tuple[int, int], window: int, num_prefix_tokens: int) -> torch.Tensor:
    """(P + gh*gw, P + gh*gw) bool, True = may attend: patches (row-major after the P prefix
    tokens) see their own non-overlapping ``window`` x ``window`` block; prefix tokens see and are seen by all."""
    gh, gw = grid
    rows = torch.arange(gh).repeat_interleave(gw) // window             # (N,) window row of each patch
    cols = torch.arange(gw).repeat(gh) // window                        # (N,) window column
    win = rows * math.ceil(gw / window) + cols                          # (N,) window id
    n = num_prefix_tokens + gh * gw
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[num_prefix_tokens:, num_prefix_tokens:] = win[:, None] == win[None, :]
    return mask


class WindowAttention(Attention):
    """Local attention on the patch grid: timm's fused Attention with a window mask.

    The mask is set by :meth:`set_window` once the grid is known (the block builder does not know it).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_attn = True
        self.register_buffer("window_mask", None, persistent=False)  # (N, N) bool, not in the state dict

    def set_window(self, grid: tuple[int, int], window: int, num_prefix_tokens: int) -> None:
        self.window_mask = window_mask(grid, window, num_prefix_tokens).to(self.qkv.weight.device)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.window_mask is None:
            raise RuntimeError("WindowAttention.set_window() was not called")
        mask = self.window_mask                                          # (N, N) bool
        if attn_mask is not None:
            mask = mask & attn_mask if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~mask, float("-inf"))
        return super().forward(x, attn_mask=mask, is_causal=is_causal)


ATTENTION: dict[str, type[Attention]] = {"softmax": Attention, "linear": LinearAttention, "window": WindowAttention}


@register_family("vit", params=VitParams, shape_params=("patch_size", "patch_fit"),
                 capabilities=Capabilities(task_heads=True, rollout=True))
def build_vit(p: VitParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
              tasks: dict[str, int] | None = None) -> nn.Module:
    """Vision transformer (timm) with searchable patch size, depth, width, heads, pooling and attention type."""
    fit = FitToPatches(img_size, p.patch_size, p.patch_fit)
    vit = timm_vit(p, img_size=fit.out_size, in_chans=in_chans, num_outputs=num_outputs,
                   attn_layer=ATTENTION[p.attention])
    if p.attention == "window":
        for blk in vit.blocks:
            blk.attn.set_window(tuple(vit.patch_embed.grid_size), p.window_size, vit.num_prefix_tokens)
    return nn.Sequential(fit, vit)
