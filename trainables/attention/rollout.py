"""Attention rollout (Abnar & Zuidema 2020): which pixels of a detector image a transformer's output reads.

Per self-attention layer l the head-averaged attention A_l (N x N, rows sum to 1) is mixed
with the residual path, Â_l = (A_l + I) / 2, and the layers are chained:

    R = Â_L ... Â_2 Â_1                                   (N x N)

The map of an image is the class token's row of R over the patch tokens (models pooled
without a class token: the mean row of the patch tokens), one value per patch, spread over
that patch's pixels and cut back to the input image (undoing FitToPatches' pad or crop).

Supported: every timm ``Attention`` (vit with softmax, linear or window attention, any position
encoding (rotary tables are applied to q and k as the layer does), registers, ``token_keep: nonempty``;
hybrid_vit, mae's encoder) and CaiT (talking-heads self-attention over the patches, then
class attention: the class token's attention over the patches, averaged over the
class-attention layers, times the rollout of the self-attention layers). hit_transformer: the class token's
attention over the hits it kept (mean over heads and class-attention layers), at each hit's pixel. swin (shifted
windows, no global token) and the object families have no map: :func:`attention_rollout`
returns None for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.cait import ClassAttn, TalkingHeadAttn
from torch import nn


def _x_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["x"]


def _timm_probs(m: Attention, x: torch.Tensor, attn_mask: torch.Tensor | None,
                rope: torch.Tensor | None = None) -> torch.Tensor:
    """timm Attention (and the vit subclasses) on x (B, N, D) -> (B, N, N) head-averaged attention, with the
    mask (bool: True = may attend; a key padding mask leaves padded keys at zero) and rotary table it got."""
    from trainables.layers.vit_blocks import LinearAttention, apply_rope  # vit imports nothing from here

    B, N, _ = x.shape
    qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)                                                # (B, h, N, d)
    q, k = m.q_norm(q).float(), m.k_norm(k).float()
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    mask = getattr(m, "window_mask", None)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        mask = attn_mask if mask is None else mask & attn_mask
    if isinstance(m, LinearAttention):  # the weights linear attention applies: phi(q) phi(k)^T, row-normalized
        a = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)             # (B, h, N, N)
        if mask is not None:
            a = a * mask
        a = a / a.sum(-1, keepdim=True)
    else:
        logits = (q * m.scale) @ k.transpose(-2, -1)                       # (B, h, N, N)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            logits = logits + attn_mask
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf)
        a = logits.softmax(-1)
    return a.mean(1)                                                       # (B, N, N)


def _talking_probs(m: TalkingHeadAttn, x: torch.Tensor) -> torch.Tensor:
    """CaiT talking-heads attention -> (B, N, N): the softmax distributions (heads mixed by proj_l before
    the softmax), averaged over heads. The post-softmax mix proj_w may carry signed weights, so it is
    left out: what stays is a distribution over tokens per query."""
    B, N, C = x.shape
    qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, C // m.num_heads).permute(2, 0, 3, 1, 4)
    a = (qkv[0] * m.scale) @ qkv[1].transpose(-2, -1)                      # (B, h, N, N)
    return m.proj_l(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1).mean(1)  # (B, N, N)


def _class_probs(m: ClassAttn, x: torch.Tensor) -> torch.Tensor:
    """CaiT class attention: the class token (x[:, 0]) over [class, patches] -> (B, N)."""
    B, N, C = x.shape
    q = m.q(x[:, 0]).reshape(B, 1, m.num_heads, C // m.num_heads).permute(0, 2, 1, 3)  # (B, h, 1, d)
    k = m.k(x).reshape(B, N, m.num_heads, C // m.num_heads).permute(0, 2, 1, 3)        # (B, h, N, d)
    return ((q * m.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0]              # (B, N)


class _Recorder:
    """Forward hooks that record each attention layer's weights, in the order the layers run."""

    def __init__(self, model: nn.Module):
        self.self_attn: list[torch.Tensor] = []   # (B, N, N) per self-attention layer
        self.class_attn: list[torch.Tensor] = []  # (B, N) per CaiT class-attention layer
        self.handles = []
        for m in model.modules():
            if isinstance(m, (Attention, TalkingHeadAttn, ClassAttn)):
                self.handles.append(m.register_forward_hook(self._hook, with_kwargs=True))

    def _hook(self, m: nn.Module, args: tuple, kwargs: dict, _out: Any) -> None:
        x = _x_of(args, kwargs)
        if isinstance(m, ClassAttn):
            self.class_attn.append(_class_probs(m, x))
        elif isinstance(m, TalkingHeadAttn):
            self.self_attn.append(_talking_probs(m, x))
        else:
            # hooked on timm's Attention (its subclasses included) besides the two CaiT kinds above
            self.self_attn.append(_timm_probs(cast(Attention, m), x, kwargs.get("attn_mask"), kwargs.get("rope")))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _token_layout(model: nn.Module) -> tuple[tuple[int, int], int, bool] | None:
    """(patch grid (gh, gw), prefix tokens before the patches, pooled by the class token) or None."""
    m: Any  # recognized by its attributes (hasattr) below
    for m in model.modules():
        if hasattr(m, "encoder") and hasattr(m, "grid") and hasattr(m, "pool"):  # mae
            return tuple(m.grid), 1, m.pool == "token"
        if hasattr(m, "patch_embed") and hasattr(m, "blocks"):  # timm VisionTransformer / Cait
            grid = tuple(m.patch_embed.grid_size)
            if hasattr(m, "blocks_token_only"):  # Cait: self-attention over patches only
                return grid, 0, True
            return grid, int(m.num_prefix_tokens), getattr(m, "global_pool", "token") == "token"
    return None


def _to_pixels(model: nn.Module, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) per-token maps -> (B, H, W) on the input image: undo the FitToPatches pad/crop."""
    from trainables.layers.vit_common import FitToPatches

    fit = next((m for m in model.modules() if isinstance(m, FitToPatches)), None)
    out = tuple(fit.out_size) if fit is not None else size
    px = F.interpolate(maps[:, None], size=out, mode="nearest")[:, 0]     # (B, H', W')
    if fit is None or out == tuple(size):
        return px
    H, W = size
    if fit.how == "pad":
        left, _, top, _ = fit.pad
        return px[:, top:top + H, left:left + W]
    top, left = fit.crop
    full = px.new_zeros(px.shape[0], H, W)
    full[:, top:top + out[0], left:left + out[1]] = px
    return full


@torch.no_grad()
def attention_rollout(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """(B, C, H, W) images -> (B, H, W) rollout maps (each scaled to max 1); None when the model has no
    attention this module can roll out (swin, CNNs, object families).

    A ViT that keeps only its non-empty patches (``token_keep: nonempty``) rolls out over the tokens it
    kept; the map puts each token's value on its grid patch, and the patches it dropped get zero."""
    from trainables.layers.vit_model import grid_tokens, kept_grid

    hit_map = cast("Callable[[torch.Tensor], torch.Tensor | None] | None",
                   next((m.hit_attention_map for m in model.modules() if hasattr(m, "hit_attention_map")), None))
    if hit_map is not None:  # hit_transformer: the class token's attention over the hits, at their pixels
        was_training = model.training
        model.eval()
        try:
            return hit_map(x)
        finally:
            model.train(was_training)
    layout = _token_layout(model)
    if layout is None:
        return None
    (gh, gw), prefix, by_token = layout
    kept = kept_grid(model)
    picked: dict[str, torch.Tensor] = {}
    hook = (kept[0].register_forward_hook(lambda m, a, out: picked.update(index=out[1], valid=out[2]))
            if kept is not None else None)
    was_training = model.training
    model.eval()
    rec = _Recorder(model)
    try:
        model(x)
    finally:
        rec.close()
        if hook is not None:
            hook.remove()
        model.train(was_training)
    if not rec.self_attn:
        return None
    B, N = rec.self_attn[0].shape[:2]
    n_patches = picked["index"].shape[1] if kept is not None else gh * gw
    if any(a.shape[1] != N for a in rec.self_attn) or prefix + n_patches != N:
        return None  # tokens that are not the patch grid (an unexpected layout): no map rather than a wrong one
    valid = picked["valid"].float() if kept is not None else torch.ones(B, n_patches, device=x.device)  # (B, K)
    eye = torch.eye(N, device=x.device)
    R = eye.expand(B, N, N)
    for a in rec.self_attn:
        a = 0.5 * a + 0.5 * eye
        R = (a / a.sum(-1, keepdim=True)) @ R                                  # (B, N, N)
    if rec.class_attn:  # CaiT: class token over [class, patches], averaged over the class-attention layers
        v = torch.stack(rec.class_attn).mean(0)[:, 1:]                          # (B, L)
        tokens = (v[:, None] @ R)[:, 0]                                         # (B, L)
    elif by_token and prefix > 0:
        tokens = R[:, 0, prefix:]                                               # (B, K)
    else:  # the mean row of the (valid) patch tokens
        tokens = (R[:, prefix:, prefix:] * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
    if kept is not None:
        tokens = grid_tokens(picked["index"], picked["valid"], tokens, gh * gw)  # (B, L), dropped patches 0
    maps = tokens.reshape(B, gh, gw).float()
    maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return _to_pixels(model, maps, (x.shape[-2], x.shape[-1]))


def pick_examples(labels: list[int] | None, n_total: int, k: int = 4) -> list[int]:
    """Up to ``k`` indices, taking the classes in turn (the first examples of each); the first k without labels."""
    if labels is None:
        return list(range(min(k, n_total)))
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    out: list[int] = []
    queues = [by_class[c] for c in sorted(by_class)]
    while len(out) < k and any(queues):
        for q in queues:
            if q and len(out) < k:
                out.append(q.pop(0))
    return out


def save_attention(path: str, model: nn.Module, images: torch.Tensor, titles: list[str]) -> bool:
    """Roll out ``model`` on ``images`` (B, C, H, W) and write images, maps and one title per image
    (its truth) to ``path`` (npz). False (nothing written) when the model has no map."""
    maps = attention_rollout(model, images)
    if maps is None:
        return False
    np.savez_compressed(path, images=images.float().cpu().numpy(), maps=maps.cpu().numpy(),
                        titles=np.asarray(titles))
    return True
