"""Family ``hit_transformer``: a transformer whose tokens are the detector hits of a jet image, with ParT's
physics pair features as attention bias and CaiT/ParT class-attention pooling.

A 125x125x3 E2E jet holds a median of 134 non-zero pixels of 46,875 (0.29%). This family never looks at the
empty ones: each non-zero pixel (``merge: 1``), or each non-empty ``merge`` x ``merge`` cell of one channel
(a calorimeter tower, ``merge: 5``: the HCAL granularity), is one token, and only the ``max_hits`` most
energetic ones are kept. Per token: its (Δη, Δφ) from the image centre (``pixel_size`` rad per pixel; the
energy-weighted centroid for merged cells), its channel (one-hot, any count), ln E and ln(E / E_jet) with E_jet
the summed energy of all hits of the jet. Energies are the pixel values after the per-pixel transforms of the
data (zero_suppress, clip, log1p) minus the empty-cell value, not normalized (GeV for generated data).

Sources: ParT (Qu, Li, Qian 2022, arXiv 2202.03772): particle-attention blocks whose logits get a per-head bias
embedded from ln ΔR, ln kT, ln z, ln m² of every pair (trainables/layers/pair_bias.py), then class-attention
blocks (Touvron et al. 2021, CaiT) in which a class token reads the hit tokens::

    image (B, C, H, W) or hit list [hits (B, K0, 4), mask (B, K0)]
      -> HitTokens: channel, η, φ, E, valid (B, K)        K = min(max_hits, cells): the most energetic hits
      -> embed (B, K, D); pair bias (B, heads, K, K) once, shared by every block
      -> particle attention x depth (B, K, D)
      -> class attention x class_attn_layers: class token (B, 1, D) over [class, hits]  (or masked mean: pool mean)
      -> LayerNorm -> Linear -> (B, outputs)

Two inputs give the same tokens (up to the order of hits of equal energy at the cap):

* a preprocessed image (B, C, H, W), as every image family takes it (normalized or not): the dense path used by
  export parity, attention maps and the dense caches;
* a hit list from the sparse cache (``data.cache: sparse``; trainables/core/batches.py): ``hits`` float32
  (B, K0, 4) = (channel, row, column, energy above the empty value, not normalized), ``mask`` bool (B, K0). No
  dense image is built. This is also the ONNX input (a fixed maximum number of hits and a mask).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from timm.layers import DropPath, Mlp
from torch import nn

from trainables.layers.pair_bias import PairBias, masked_bias
from trainables.layers.vit_model import EMPTY_TOL  # the same test of an empty pixel as vit's token_keep
from trainables.registry import Capabilities, register_family

POS_SCALE = 0.4
"""Δη, Δφ (rad) are divided by this in the token features (a jet of R = 0.8 spans about ±1)."""


class HitTransformerParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    depth: int = Field(default=3, ge=1)
    """Particle-attention blocks over the hit tokens (each with the pair bias)."""
    embed_dim: int = Field(default=64, ge=8)
    """Token width; rounded up to a multiple of num_heads."""
    num_heads: int = Field(default=4, ge=1)
    mlp_ratio: float = Field(default=2.0, gt=0)
    class_attn_layers: int = Field(default=2, ge=1)
    """Class-attention blocks at the end (pool: class_attention)."""
    pool: Literal["class_attention", "mean"] = "class_attention"
    """How the jet is read out: a class token attending over the hits (CaiT/ParT), or the mean of the hit tokens."""
    pair_features: bool = True
    """Add ParT's embedded pair features (ln ΔR, ln kT, ln z, ln m²) to the attention logits."""
    pair_width: int = Field(default=8, ge=1)
    """Hidden width of the pair-feature MLP (it runs on max_hits² pairs per jet: the dominant cost on a CPU)."""
    max_hits: int = Field(default=128, ge=1)
    """The hit cap: keep the max_hits most energetic hits (or merged cells) of each jet."""
    merge: int = Field(default=1, ge=1)
    """Side in pixels of the cells merged into one token, per channel: 1 = every pixel, 5 = 5x5 towers."""
    jet_features: bool = False
    """Start the class token (or shift the mean of the hits) from the jet's own summed 4-vector: ln E_jet and ln
    m_jet of all kept hits and of each channel's, the hits taken as massless (m² = (ΣE)² − |Σp|²). Off by default:
    on 8,000 top/QCD jets it did not help (BENCHMARKS.md, section 10)."""
    pixel_size: float = Field(default=0.0174, gt=0)
    """Pixel pitch in η and φ (rad); 0.0174 is the ECAL crystal of the E2E images."""
    drop_path: float = Field(default=0.0, ge=0, lt=1)


# --------------------------------------------------------------------------- hits -> tokens
class HitTokens(nn.Module):
    """Either input -> the kept hits: channel (B, K) long, row and column (B, K) in pixels, energy (B, K), valid
    (B, K) bool, and each jet's summed hit energy (B,).

    ``empty``: per channel, the value of an empty cell in the images the model gets; ``std``: the per-channel
    normalization std of those images (energy = (x - empty) * std); both None for raw images.
    """

    empty: torch.Tensor
    tol: torch.Tensor
    std: torch.Tensor
    cell_ch: torch.Tensor
    cell_r: torch.Tensor
    cell_c: torch.Tensor

    def __init__(self, in_chans: int, img_size: tuple[int, int], merge: int, max_hits: int,
                 empty: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        H, W = (int(v) for v in img_size)
        if merge > min(H, W):
            raise ValueError(f"merge {merge} is larger than the image ({H}x{W} pixels); choose a merge of at most "
                             f"{min(H, W)}")
        self.C, self.H, self.W, self.m = in_chans, H, W, merge
        self.Hm, self.Wm = math.ceil(H / merge), math.ceil(W / merge)
        self.cells = in_chans * self.Hm * self.Wm
        self.k = min(max_hits, self.cells)
        e = torch.zeros(in_chans) if empty is None else torch.as_tensor(list(empty), dtype=torch.float32)
        s = torch.ones(in_chans) if std is None else torch.as_tensor(list(std), dtype=torch.float32)
        if e.numel() != in_chans or s.numel() != in_chans:
            raise ValueError(f"empty_pixel and pixel_std need {in_chans} values (one per channel)")
        self.register_buffer("empty", e.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("tol", EMPTY_TOL * e.abs().clamp_min(1.0).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", s.view(1, -1, 1, 1), persistent=False)
        ch, r, c = torch.meshgrid(torch.arange(in_chans), torch.arange(self.Hm), torch.arange(self.Wm), indexing="ij")
        self.register_buffer("cell_ch", ch.reshape(-1), persistent=False)                 # (cells,)
        # centre of each cell in pixels, for cells without energy (never valid; kept finite)
        self.register_buffer("cell_r", (r.reshape(-1) * merge + (merge - 1) / 2).float(), persistent=False)
        self.register_buffer("cell_c", (c.reshape(-1) * merge + (merge - 1) / 2).float(), persistent=False)

    def _select(self, e: torch.Tensor, valid: torch.Tensor, r: torch.Tensor, c: torch.Tensor, ch: torch.Tensor):
        """Cells (B, M) -> the k most energetic valid ones (fixed k = min(max_hits, M))."""
        k = min(self.k, e.shape[1])
        score = torch.where(valid, e, torch.full_like(e, float("-inf")))
        idx = torch.topk(score, k, dim=1).indices                                          # (B, k)
        take = lambda t: torch.gather(t, 1, idx)  # noqa: E731
        return take(ch), take(r), take(c), take(e), take(valid)

    def _cells(self, e: torch.Tensor, er: torch.Tensor, ec: torch.Tensor, n: torch.Tensor):
        """Summed energy, energy-weighted row and column and hit count per cell (B, cells) -> cell tensors."""
        valid = n > 0
        safe = torch.where(valid, e, torch.ones_like(e))
        r = torch.where(valid, er / safe, self.cell_r.expand_as(e))
        c = torch.where(valid, ec / safe, self.cell_c.expand_as(e))
        return e, valid, r, c, self.cell_ch.expand(e.shape[0], -1)

    def from_image(self, x: torch.Tensor):
        B, C, H, W = x.shape
        d = x - self.empty
        hit = d.abs() > self.tol                                                              # (B, C, H, W)
        e = torch.where(hit, d * self.std, torch.zeros_like(d))
        total = e.flatten(1).sum(1)                                                           # (B,)
        if self.m == 1:  # every pixel is a cell: its channel, row and column follow from its flat index
            score = torch.where(hit, e, torch.full_like(e, float("-inf"))).flatten(1)        # (B, C*H*W)
            idx = torch.topk(score, min(self.k, score.shape[1]), dim=1).indices              # (B, k)
            r, c = torch.div(idx % (H * W), W, rounding_mode="floor"), idx % W
            take = lambda t: torch.gather(t.flatten(1), 1, idx)  # noqa: E731
            return torch.div(idx, H * W, rounding_mode="floor"), r.to(x.dtype), c.to(x.dtype), take(e), take(hit), total
        m, Hm, Wm = self.m, self.Hm, self.Wm
        pad = (0, Wm * m - W, 0, Hm * m - H)
        e, hitf = F.pad(e, pad), F.pad(hit.to(x.dtype), pad)
        rows = torch.arange(Hm * m, device=x.device, dtype=x.dtype).view(1, 1, -1, 1)
        cols = torch.arange(Wm * m, device=x.device, dtype=x.dtype).view(1, 1, 1, -1)
        pool = lambda t: t.reshape(B, C, Hm, m, Wm, m).sum((3, 5)).flatten(1)  # noqa: E731  (B, cells)
        cells = self._cells(pool(e), pool(e * rows), pool(e * cols), pool(hitf))
        return (*self._select(*cells[:2], *cells[2:]), total)

    def from_hits(self, hits: torch.Tensor, mask: torch.Tensor):
        ch, r, c, e = hits.unbind(-1)                                                         # (B, K0) each
        valid = mask.bool() & (e != 0)
        e = torch.where(valid, e, torch.zeros_like(e))
        total = e.sum(1)
        if self.m == 1:
            return (*self._select(e, valid, r, c, ch.long()), total)
        B, m = hits.shape[0], self.m
        cell = ch.long() * (self.Hm * self.Wm) + torch.div(r.long(), m, rounding_mode="floor") * self.Wm \
            + torch.div(c.long(), m, rounding_mode="floor")
        cell = torch.where(valid, cell, torch.full_like(cell, self.cells))                   # padding: a spare cell
        acc = lambda v: hits.new_zeros(B, self.cells + 1).scatter_add(1, cell, v)[:, :-1]  # noqa: E731
        cells = self._cells(acc(e), acc(e * r), acc(e * c), acc(valid.to(hits.dtype)))
        return (*self._select(*cells[:2], *cells[2:]), total)


def jet_features(eta: torch.Tensor, phi: torch.Tensor, e: torch.Tensor, ch: torch.Tensor, n_chans: int) -> torch.Tensor:
    """Kept hits (B, K) as massless deposits (E taken as pT at Δη, Δφ from the centre; 0 for padding) -> (B,
    2 * (n_chans + 1)): ln E (Σ E cosh Δη) and ln m of the sum of all hits, then of each channel's hits, scaled
    by 1/4. The invariant mass m² = (Σ E cosh Δη)² − (Σ E sinh Δη)² − (Σ E cos Δφ)² − (Σ E sin Δφ)² does not
    depend on the jet's own η and φ."""
    up, down = torch.exp(eta), torch.exp(-eta)  # cosh and sinh (ONNX opset 17 exports no Cosh/Sinh from PyTorch)
    comps = torch.stack([e * (up + down) / 2, e * (up - down) / 2, e * torch.cos(phi), e * torch.sin(phi)], -1)
    onehot = F.one_hot(ch.long().clamp(0, n_chans - 1), n_chans).to(e.dtype)                # (B, K, C)
    per = torch.cat([comps.sum(1, keepdim=True), torch.einsum("bkc,bkv->bcv", onehot, comps)], 1)  # (B, 1+C, 4)
    m2 = per[..., 0] ** 2 - (per[..., 1:] ** 2).sum(-1)
    return torch.cat([per[..., 0].clamp_min(1e-6).log(), 0.5 * m2.clamp_min(1e-6).log()], -1) * 0.25


# --------------------------------------------------------------------------- blocks
class PairAttentionBlock(nn.Module):
    """ParT's particle-attention block: pre-LN multi-head self-attention whose logits get an additive bias
    (B, heads or 1, K, K) (pair features and the key mask), then a pre-LN MLP; both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, K, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, K, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)                       # (B, h, K, d)
        x = x + self.drop_path(self.proj(o.transpose(1, 2).contiguous().reshape(B, K, D)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ClassAttentionBlock(nn.Module):
    """CaiT's class-attention block: the class token (B, 1, D) attends over [class, hits] (hits masked) and is
    updated; the hit tokens are not. ``attn`` holds the last head-averaged weights over the hits (B, K)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn: torch.Tensor | None = None

    def forward(self, cls: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, K, D = x.shape
        h, d = self.heads, D // self.heads
        u = self.norm1(torch.cat([cls, x], dim=1))                                           # (B, 1 + K, D)
        q = self.q(u[:, :1]).reshape(B, 1, h, d).transpose(1, 2)                              # (B, h, 1, d)
        k, v = self.kv(u).reshape(B, 1 + K, 2, h, d).permute(2, 0, 3, 1, 4)                   # (B, h, 1 + K, d)
        keys = F.pad(valid, (1, 0), value=True)[:, None, None, :]                             # (B, 1, 1, 1 + K)
        logits = (q @ k.transpose(-2, -1)) * d ** -0.5
        a = logits.masked_fill(~keys, float("-inf")).softmax(-1)                              # (B, h, 1, 1 + K)
        self.attn = a[:, :, 0, 1:].mean(1).detach()                                           # (B, K)
        o = (a @ v).transpose(1, 2).contiguous().reshape(B, 1, D)
        cls = cls + self.proj(o)
        return cls + self.mlp(self.norm2(cls))


# --------------------------------------------------------------------------- model
class HitTransformer(nn.Module):
    """Hit tokens -> particle attention with pair bias -> class attention -> head (module docstring).

    ``forward(x)`` with x (B, C, H, W) preprocessed images, or ``forward(hits, mask)`` with a hit list; returns
    (B, num_outputs). ``hit_attention_map(x)`` gives, per image, the class token's attention over its hits
    placed on the pixel grid (B, H, W), each map scaled to max 1.
    """

    centre: torch.Tensor
    cls_token: nn.Parameter | None

    def __init__(self, p: HitTransformerParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
                 empty_pixel: Sequence[float] | None = None, pixel_std: Sequence[float] | None = None):
        super().__init__()
        dim = math.ceil(p.embed_dim / p.num_heads) * p.num_heads
        self.p, self.heads, self.in_chans, self.img_size = p, p.num_heads, in_chans, tuple(img_size)
        self.tokens = HitTokens(in_chans, img_size, p.merge, p.max_hits, empty_pixel, pixel_std)
        H, W = self.img_size
        self.register_buffer("centre", torch.tensor([(H - 1) / 2, (W - 1) / 2]), persistent=False)
        n_feat = 4 + in_chans
        self.embed = nn.Sequential(nn.Linear(n_feat, dim), nn.GELU(), nn.Linear(dim, dim))
        self.pair = PairBias(p.num_heads, p.pair_width) if p.pair_features else None
        self.jet = nn.Sequential(nn.Linear(2 * (in_chans + 1), dim), nn.GELU(), nn.Linear(dim, dim)) \
            if p.jet_features else None
        dpr = [p.drop_path * i / max(1, p.depth - 1) for i in range(p.depth)]
        self.blocks = nn.ModuleList(PairAttentionBlock(dim, p.num_heads, p.mlp_ratio, r) for r in dpr)
        if p.pool == "class_attention":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            self.class_blocks = nn.ModuleList(ClassAttentionBlock(dim, p.num_heads, p.mlp_ratio)
                                              for _ in range(p.class_attn_layers))
        else:
            self.cls_token, self.class_blocks = None, nn.ModuleList()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)
        self.last_hits: tuple[torch.Tensor, ...] | None = None

    def hits_of(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """(channel, row, column, energy, valid) of the kept hits, each (B, K), and E_jet (B,)."""
        return self.tokens.from_image(x) if mask is None else self.tokens.from_hits(x, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        ch, r, c, e, valid, total = self.hits_of(x, mask)
        self.last_hits = (r.detach(), c.detach(), valid.detach())
        eta = (r - self.centre[0]) * self.p.pixel_size                                        # (B, K) rad
        phi = (c - self.centre[1]) * self.p.pixel_size
        e_pos = e.clamp_min(1e-6)
        feats = torch.cat([
            torch.stack([eta / POS_SCALE, phi / POS_SCALE, e_pos.log() * 0.25,
                         (e_pos / total.clamp_min(1e-6)[:, None]).log() * 0.25], dim=-1),
            F.one_hot(ch.long().clamp(0, self.in_chans - 1), self.in_chans).to(e.dtype),
        ], dim=-1) * valid[..., None].to(e.dtype)                                               # (B, K, 4 + C)
        t = self.embed(feats)                                                                  # (B, K, D)
        jet = self.jet(jet_features(eta, phi, e * valid.to(e.dtype), ch, self.in_chans)) \
            if self.jet is not None else None                                                  # (B, D)
        bias = masked_bias(self.pair(eta, phi, e) if self.pair is not None else None, valid, self.heads)
        for blk in self.blocks:
            t = blk(t, bias)
        if self.cls_token is not None:
            cls = self.cls_token.expand(t.shape[0], -1, -1)
            if jet is not None:
                cls = cls + jet[:, None]
            for blk in self.class_blocks:
                cls = blk(cls, t, valid)
            z = cls[:, 0]
        else:
            w = valid[..., None].to(t.dtype)
            z = (t * w).sum(1) / w.sum(1).clamp_min(1.0)
            if jet is not None:
                z = z + jet
        return self.head(self.norm(z))

    @torch.no_grad()
    def hit_attention_map(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B, C, H, W) images -> (B, H, W): the class token's attention over each kept hit (mean over heads and
        class-attention layers) at the hit's pixel (channels summed), each map scaled to max 1; None with
        ``pool: mean`` (no class token)."""
        if self.cls_token is None:
            return None
        self.forward(x)
        # (B, K); the forward above set every class block's attn and last_hits
        a = torch.stack([cast(torch.Tensor, blk.attn) for blk in self.class_blocks]).mean(0)
        assert self.last_hits is not None
        r, c, valid = self.last_hits
        H, W = self.img_size
        at = r.round().long().clamp(0, H - 1) * W + c.round().long().clamp(0, W - 1)          # (B, K)
        maps = a.new_zeros(a.shape[0], H * W).scatter_add(1, at, a * valid.to(a.dtype))
        maps = maps / maps.amax(1, keepdim=True).clamp_min(1e-12)
        return maps.view(-1, H, W)


@register_family("hit_transformer", params=HitTransformerParams, shape_params=("merge",),
                 capabilities=Capabilities(empty_pixel=True, pixel_std=True, hits=True, rollout=True))
def build_hit_transformer(p: HitTransformerParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
                          empty_pixel: Sequence[float] | None = None,
                          pixel_std: Sequence[float] | None = None) -> nn.Module:
    """Transformer over the detector hits (non-zero pixels or merged cells) with ParT pair-feature attention bias
    and class-attention pooling; searchable depth, width, heads, pair features, hit cap, merging and pooling."""
    return HitTransformer(p, in_chans=in_chans, img_size=img_size, num_outputs=num_outputs,
                          empty_pixel=empty_pixel, pixel_std=pixel_std)


def input_hits(model: nn.Module) -> int:
    """How many hits the exported hit-list input holds (the ONNX form): max_hits when every pixel is a token, else
    enough pixels to fill max_hits merged cells (max_hits x merge², at most every pixel)."""
    t = next(m for m in model.modules() if isinstance(m, HitTokens))
    return t.k if t.m == 1 else min(t.k * t.m * t.m, t.C * t.H * t.W)


def hit_list(images: np.ndarray, empty: Sequence[float], std: Sequence[float] | None,
             n_hits: int) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images (n, C, H, W) float32 -> the model's hit-list input: ``hits`` float32 (n, n_hits, 4) =
    (channel, row, column, energy) of each image's ``n_hits`` most energetic non-empty pixels, energy =
    (x - empty[c]) * std[c] (the pixel above the empty value, not normalized), zero-padded; ``mask`` bool
    (n, n_hits), True = a real hit. This is how a CMSSW producer builds the ONNX input from an E2E image."""
    n, C, H, W = images.shape
    e_ = np.asarray(empty, np.float32).reshape(1, C, 1, 1)
    s_ = np.ones((1, C, 1, 1), np.float32) if std is None else np.asarray(std, np.float32).reshape(1, C, 1, 1)
    d = images.astype(np.float32) - e_
    hit = np.abs(d) > EMPTY_TOL * np.maximum(1.0, np.abs(e_))
    energy = np.where(hit, d * s_, 0.0).reshape(n, -1)
    hits = np.zeros((n, n_hits, 4), np.float32)
    mask = np.zeros((n, n_hits), bool)
    for i in range(n):
        flat = np.flatnonzero(hit[i].reshape(-1))
        flat = flat[np.argsort(-energy[i, flat], kind="stable")][:n_hits]
        ch, rest = np.divmod(flat, H * W)
        r, c = np.divmod(rest, W)
        k = len(flat)
        hits[i, :k] = np.stack([ch, r, c, energy[i, flat]], axis=1)
        mask[i, :k] = True
    return hits, mask
