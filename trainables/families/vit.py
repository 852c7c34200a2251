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
(trainables/layers/vit_model.py); with ``pair_bias`` too, ParT's pair features of the kept patches (centres,
summed hit energies) are embedded per head and added to the attention logits of every block, as the
``hit_transformer`` family does for single hits (trainables/layers/pair_bias.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
from pydantic import Field
from torch import nn

from trainables.layers.vit_blocks import ATTENTION, WindowAttention
from trainables.layers.vit_common import FitToPatches, TimmVitParams, timm_vit
from trainables.registry import Capabilities, register_family


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
            cast(WindowAttention, blk.attn).set_window(tuple(vit.patch_embed.grid_size), p.window_size,
                                                       vit.num_prefix_tokens)
    return nn.Sequential(fit, vit)
