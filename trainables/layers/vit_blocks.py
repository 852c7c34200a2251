"""The pieces of the ViT families' transformer blocks: token mixers, MLPs, and position tables.

Every piece keeps timm's parameter names (``qkv``, ``proj``, ``q_norm``, ``ls1``, ``mlp.fc1`` ...), so a
model built with its defaults has exactly the state dict of timm's ``VisionTransformer``.

Token mixers (``attention`` of ``vit``), each with an optional 2-D rotary embedding and key mask:

* :class:`SoftmaxAttention`: timm's ``Attention`` (fused ``F.scaled_dot_product_attention``);
* :class:`LinearAttention`: kernelized linear attention (Katharopoulos et al. 2020, elu(x) + 1), O(N);
* :class:`WindowAttention`: softmax attention inside ``window`` x ``window`` windows of the patch grid.

Position tables (``pos_embed``): :func:`sincos_2d` (fixed, MAE's layout) and :func:`rope_2d` (axial 2-D
rotary embedding of RoPE-ViT, Heo et al. 2024, built by timm's ``build_rotary_pos_embed``; applied to
queries and keys by timm's ``apply_rot_embed_cat``). MLPs (``mlp``): timm's ``Mlp`` (GELU) or
:class:`SwiGLUMlp` (Shazeer 2020).

A rotary table ``rope`` has shape (B or 1, 1, M, 2 * head_dim): [sin | cos] for the last M tokens of the
sequence (the patches); the N - M tokens before them (class and register tokens) are not rotated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp, SwiGLU
from timm.layers.pos_embed_sincos import apply_rot_embed_cat, build_rotary_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

ROPE_THETA = 100.0
"""Base of the rotary frequencies; RoPE-ViT's axial value (grids of detector patches are short: 5..125)."""


# --------------------------------------------------------------------------- position tables
def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (MAE): (gh*gw, dim), patches in row-major order.

    A quarter of the dims each: sin(row), cos(row), sin(col), cos(col); the last dim % 4 dims are zero.
    """
    d = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(d, dtype=torch.float64) / max(d, 1))  # (d,)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    r = rows.reshape(-1, 1) * omega                                # (L, d)
    c = cols.reshape(-1, 1) * omega                                # (L, d)
    emb = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)   # (L, 4d)
    return F.pad(emb, (0, dim - 4 * d)).float()                    # (L, dim)


def rope_2d(head_dim: int, grid: tuple[int, int], theta: float = ROPE_THETA) -> torch.Tensor:
    """Axial 2-D rotary table of the patch grid: (gh*gw, 2 * head_dim) = [sin | cos], row-major patches.

    Half of the rotated dims turn with the patch row, half with its column (frequencies theta^(-k/n)).
    The first 4 * (head_dim // 4) dims of each head are rotated; the rest (head_dim % 4) are left as
    they are (sin 0, cos 1), so any head width works (a head narrower than 4 gets no rotation).
    """
    rot = 4 * (head_dim // 4)
    L = grid[0] * grid[1]
    sin = torch.zeros(L, head_dim)
    cos = torch.ones(L, head_dim)
    if rot:
        s, c = build_rotary_pos_embed(list(grid), dim=rot, in_pixels=False, temperature=theta)  # (L, rot) each
        sin[:, :rot], cos[:, :rot] = s, c
    return torch.cat([sin, cos], dim=-1)


def apply_rope(t: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """t (B, h, N, d) -> t with its last M tokens rotated by ``rope`` (B|1, 1, M, 2d); None: t."""
    if rope is None:
        return t
    m = rope.shape[-2]
    n = t.shape[-2]
    if m == n:
        return apply_rot_embed_cat(t, rope)
    return torch.cat([t[:, :, : n - m], apply_rot_embed_cat(t[:, :, n - m :], rope)], dim=2)


# --------------------------------------------------------------------------- token mixers
class SoftmaxAttention(Attention):
    """timm's Attention; with ``rope``, queries and keys are rotated first (fused attention throughout)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        if rope is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                              # (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope).type_as(v), apply_rope(k, rope).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))                                  # (B, N, D)


def key_padding(attn_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A bool key mask (B|1, 1, 1, N) -> (B|1, 1, N, 1) float weights of the keys; None -> None.
    ValueError for any other mask (linear attention cannot apply a per-query mask)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[-2] != 1 or attn_mask.shape[-1] != n:
        raise ValueError("linear attention takes only a key padding mask (bool, (B, 1, 1, N))")
    return attn_mask.transpose(-2, -1).float()


class LinearAttention(Attention):
    """Kernelized linear attention, phi(x) = elu(x) + 1 (Katharopoulos et al. 2020).

        out_i = phi(q_i) . sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps)

    costs O(N d^2) instead of O(N^2 d); computed in float32 (autocast off) for stability. A key padding
    mask drops the masked keys from both sums; ``rope`` rotates q and k before the feature map (positions
    enter, though the score is not a function of the offset alone as it is for softmax attention).
    """

    eps: float = 1e-6

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        if is_causal:
            raise NotImplementedError("linear attention is not causal")
        B, N, _ = x.shape
        keep = key_padding(attn_mask, N)                                     # (B, 1, N, 1) or None
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                              # (B, h, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        # (the meta device, on which e2e_search/spec/shapes.py builds models, has no autocast: use the CPU's there)
        with torch.autocast(device_type="cpu" if x.device.type == "meta" else x.device.type, enabled=False):
            q, k = apply_rope(q.float(), rope), apply_rope(k.float(), rope)
            q, k, v = F.elu(q) + 1, F.elu(k) + 1, v.float()
            if keep is not None:
                k = k * keep
            kv = torch.einsum("bhnd,bhne->bhde", k, v)                       # (B, h, d, d)
            den = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)) + self.eps  # (B, h, N)
            out = torch.einsum("bhnd,bhde->bhne", q, kv) / den.unsqueeze(-1)  # (B, h, N, d)
        out = out.to(x.dtype).transpose(1, 2).reshape(B, N, self.attn_dim)   # (B, N, h*d)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(self.norm(out)))                     # (B, N, D)


def window_ids(rows: torch.Tensor, cols: torch.Tensor, grid_w: int, window: int) -> torch.Tensor:
    """Patch rows and columns (any shape, int) -> the id of their ``window`` x ``window`` window."""
    return (rows // window) * math.ceil(grid_w / window) + cols // window


def window_mask(grid: tuple[int, int], window: int, num_prefix_tokens: int) -> torch.Tensor:
    """(P + gh*gw, P + gh*gw) bool, True = may attend: patches (row-major after the P prefix
    tokens) see their own non-overlapping ``window`` x ``window`` block; prefix tokens see and are seen by all."""
    gh, gw = grid
    win = window_ids(torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh), gw, window)  # (N,)
    n = num_prefix_tokens + gh * gw
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[num_prefix_tokens:, num_prefix_tokens:] = win[:, None] == win[None, :]
    return mask


class WindowAttention(SoftmaxAttention):
    """Local attention on the patch grid: fused softmax attention with a window mask.

    The mask of a full patch grid is set by :meth:`set_window` once the grid is known (the block builder
    does not know it). A model that keeps only some patches (``token_keep: nonempty``) passes the window
    mask of its tokens as ``attn_mask`` instead, and does not call :meth:`set_window`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_attn = True
        self.register_buffer("window_mask", None, persistent=False)  # (N, N) bool, not in the state dict

    def set_window(self, grid: tuple[int, int], window: int, num_prefix_tokens: int) -> None:
        self.window_mask = window_mask(grid, window, num_prefix_tokens).to(self.qkv.weight.device)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.window_mask                                              # (N, N) bool
        if mask is None and attn_mask is None:
            raise RuntimeError("WindowAttention.set_window() was not called and no window mask was given")
        if mask is None:
            mask = attn_mask
        elif attn_mask is not None:
            mask = mask & attn_mask if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~mask, float("-inf"))
        return super().forward(x, attn_mask=mask, is_causal=is_causal, rope=rope)


ATTENTION: dict[str, type[Attention]] = {"softmax": SoftmaxAttention, "linear": LinearAttention,
                                         "window": WindowAttention}


# --------------------------------------------------------------------------- MLP and block
class SwiGLUMlp(SwiGLU):
    """timm's SwiGLU (SiLU-gated linear unit, Shazeer 2020) with 2/3 of the hidden width asked for, so a
    block has the parameter count of a GELU MLP with the same ``mlp_ratio``; the activation asked for
    by the block is ignored (the gate is SiLU)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=None, norm_layer=None, bias: bool = True, drop: float = 0.0, **kw):
        hidden = max(1, round(2 * (hidden_features or in_features) / 3))
        super().__init__(in_features, hidden, out_features, act_layer=nn.SiLU, norm_layer=norm_layer, bias=bias,
                         drop=drop, **kw)


MLP: dict[str, type[nn.Module]] = {"gelu": Mlp, "swiglu": SwiGLUMlp}


class RopeBlock(Block):
    """timm's pre-norm Block whose attention also takes a rotary table; without one it is timm's Block."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        if rope is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal,
                                                   rope=rope)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
