"""Family ``mae``: masked-autoencoder pretraining on detector images, then fine-tuning.

Follows the reference MAE (He et al. 2021, facebookresearch/mae ``models_mae.py``):
patchify / unpatchify, random_masking, forward_encoder, forward_decoder, forward_loss.
The worker loop first calls ``model(x, pretrain=True)`` (returns the reconstruction
loss) for ``pretrain_epochs`` epochs, then trains ``model(x)`` (returns the outputs).

    x (B, C, H, W) -> fit (B, C, H', W') -> patchify (B, L, p*p*C) -> encoder (B, 1+L, D)
      pretrain: drop K patches -> encoder (B, 1+L-K, D) -> decoder (B, L, p*p*C) -> loss ()
      normal:   pool (B, D) [detached if finetune=linear] -> LayerNorm -> Linear (B, outputs)

Patches and padding: H, W are zero-padded up to multiples of ``patch_size``
(``FitToPatches`` of the vit family). Patchify is channel-agnostic: a patch vector
holds its p*p pixels with the C channel values of a pixel next to each other.

Empty patches: detector images are ~98% empty. A patch is *empty* when every channel
is constant over its real (non-padding) pixels. This survives per-channel
normalization (an affine map per channel keeps a constant constant); padding pixels
are ignored so that a border patch of normalized background plus zero padding is
still empty. With ``patch_size`` 1 every patch is trivially constant, so
``mask_nonempty`` is ignored there (plain MAE masking).

Masking rule with ``mask_nonempty`` (tensors stay rectangular, each image keeps its
own mask ratio):

* image b has n_b non-empty patches; k_b = ceil(mask_ratio * n_b) of them, drawn
  uniformly, are *masked*: hidden from the encoder and the only patches in the loss;
* the encoder of the whole batch sees L - K patches, K = max_b k_b: image b also
  hides K - k_b random *empty* patches (it always has that many, since its visible
  non-empty count n_b - k_b = floor((1 - r) n_b) <= L - K); the decoder predicts them,
  but they are not in the loss;
* every other patch (the remaining empty ones and the unmasked non-empty ones) is
  visible, so a visible non-empty patch is never hidden and an empty patch is never
  a reconstruction target;
* an image without non-empty patches has k_b = 0: it adds nothing to the loss; a
  batch with no masked patch at all gives a loss of exactly 0 that is still connected
  to the graph (no NaN).

Without ``mask_nonempty`` every patch counts as non-empty, which is exactly MAE:
ceil(mask_ratio * L) random patches are masked and all of them are in the loss.
The loss is the mean squared error per patch, averaged over the masked patches of
the batch; ``norm_pix_loss`` normalizes each target patch by its own mean and
variance first (as in MAE).

Encoder weights live under ``self.encoder`` (patch_embed, cls_token, pos_embed,
blocks, norm), so a fine-tune model picks them up from a pretraining checkpoint by key.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from timm.models.vision_transformer import Block
from torch import nn

from trainables.layers.vit_blocks import MLP, sincos_2d
from trainables.layers.vit_common import FitToPatches, heads_multiple
from trainables.registry import Capabilities, register_family

EMPTY_TOL = 1e-6
"""A patch channel is constant when max - min over its real pixels is at most this."""


class MaeParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    patch_size: int = Field(default=5, ge=1)
    embed_dim: int = Field(default=64, ge=8)
    """Encoder width; rounded up to a multiple of num_heads."""
    depth: int = Field(default=4, ge=1)
    num_heads: int = Field(default=4, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    mask_ratio: float = Field(default=0.75, gt=0, lt=1)
    """Fraction of the (non-empty, see mask_nonempty) patches of an image hidden from the encoder."""
    mask_nonempty: bool = True
    """Mask and reconstruct only non-empty patches; empty patches are never loss targets."""
    decoder_depth: int = Field(default=1, ge=1)
    decoder_dim: int = Field(default=32, ge=8)
    """Decoder width; rounded up to a multiple of decoder_heads."""
    decoder_heads: int = Field(default=2, ge=1)
    norm_pix_loss: bool = False
    """Reconstruct each patch normalized by its own mean and variance."""
    pool: Literal["token", "avg"] = "token"
    """Fine-tuning features: the class token, or the mean over patch tokens."""
    finetune: Literal["full", "linear"] = "full"
    """full: train everything after pretraining; linear: linear probe (encoder features detached)."""
    pretrain_epochs: int = Field(default=2, ge=0)
    """Self-supervised epochs run by the worker loop before fine-tuning."""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """Encoder MLP: GELU, or SwiGLU (Shazeer 2020) with 2/3 of the hidden width."""
    qk_norm: bool = False
    """Encoder: LayerNorm of every head's queries and keys (Dehghani et al. 2023)."""
    layer_scale: float | None = Field(default=None, gt=0)
    """Encoder: initial LayerScale of both residual branches of every block (Touvron et al. 2021); None: none."""


def check_visible(p: MaeParams, grid: tuple[int, int]) -> None:
    """Pretraining must leave the encoder at least one visible patch of an image whose patches are all
    non-empty: ceil(mask_ratio * L) < L for the L patches of the grid (ValueError naming the fix otherwise)."""
    n = grid[0] * grid[1]
    hidden = math.ceil(p.mask_ratio * n - 1e-9)
    if p.pretrain_epochs > 0 and hidden >= n:
        fix = (f"lower mask_ratio below {(n - 1) / n:.3g} or choose a smaller patch_size" if n > 1 else
               "choose a patch_size smaller than the image (or pretrain_epochs: 0)")
        what = f"all {n} patches of the {grid[0]}x{grid[1]} patch grid" if n > 1 else "the image's only patch"
        raise ValueError(f"mask_ratio {p.mask_ratio:g} hides {what} (patch_size {p.patch_size}): pretraining needs "
                         f"at least one visible patch; {fix}")


class Masking(NamedTuple):
    ids_keep: torch.Tensor     # (B, L-K) indices of the patches the encoder sees
    ids_restore: torch.Tensor  # (B, L) position of each patch in the shuffled order
    hidden: torch.Tensor       # (B, L) bool, patch not seen by the encoder (K per image)
    target: torch.Tensor       # (B, L) bool, patch in the loss (k_b per image, subset of hidden)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE): (1, [1+] gh*gw, dim), patches in row-major order.

    A quarter of the dims each: sin(row), cos(row), sin(col), cos(col); the last
    dim % 4 dims are zero. A leading zero row is added for the class token.
    """
    emb = sincos_2d(dim, grid)                                     # (L, dim)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb])              # (1+L, dim)
    return emb.unsqueeze(0)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), H and W multiples of p, patches in row-major order."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)                          # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W) with (H, W) = grid * p; inverse of ``patchify``."""
    B, L, P = x.shape
    h, w = grid
    C = P // (p * p)
    x = x.reshape(B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)                          # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


def random_masking(nonempty: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None) -> Masking:
    """Pick the patches to hide (module docstring): k_b = ceil(r * n_b) non-empty ones per image,
    plus K - k_b empty ones so that every image keeps L - K visible patches.

    nonempty: (B, L) bool. noise: (B, L) uniform in [0, 1) (drawn when None).
    """
    B, L = nonempty.shape
    if noise is None:
        noise = torch.rand(B, L, device=nonempty.device)
    n = nonempty.sum(dim=1)                                                     # (B,)
    k = torch.ceil(n.double() * mask_ratio - 1e-9).clamp_min(0).long()         # (B,) masked per image
    K = int(k.max()) if B else 0
    # rank the non-empty patches of each image in random order; the first k_b are masked
    order = torch.argsort(noise + 2.0 * ~nonempty, dim=1)                       # non-empty first
    rank = torch.argsort(order, dim=1)                                          # (B, L)
    target = nonempty & (rank < k[:, None])                                     # (B, L)
    # shuffled order: masked non-empty [0, 1), empty [1, 2), visible non-empty [3, 4)
    score = noise + 1.0 * ~nonempty + 3.0 * (nonempty & ~target)
    ids_shuffle = torch.argsort(score, dim=1)                                   # (B, L)
    ids_restore = torch.argsort(ids_shuffle, dim=1)                             # (B, L)
    ids_keep = ids_shuffle[:, K:]                                               # (B, L-K)
    hidden = ids_restore < K                                                    # (B, L)
    return Masking(ids_keep, ids_restore, hidden, target)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float, mlp: str = "gelu", qk_norm: bool = False,
            layer_scale: float | None = None) -> nn.Sequential:
    return nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm, mlp_layer=MLP[mlp],
                                 qk_norm=qk_norm, init_values=layer_scale) for _ in range(depth)])


class MaeEncoder(nn.Module):
    """ViT encoder over (a subset of) patch tokens plus a class token."""

    pos_embed: torch.Tensor

    def __init__(self, patch_dim: int, grid: tuple[int, int], dim: int, depth: int, heads: int, mlp_ratio: float,
                 mlp: str = "gelu", qk_norm: bool = False, layer_scale: float | None = None):
        super().__init__()
        self.patch_embed = nn.Linear(patch_dim, dim)  # = a stride-p convolution on the image
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid), persistent=False)  # (1, 1+L, D)
        self.blocks = _blocks(dim, depth, heads, mlp_ratio, mlp, qk_norm, layer_scale)
        self.norm = nn.LayerNorm(dim)

    def forward(self, patches: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(patches) + self.pos_embed[:, 1:]            # (B, L, D)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, L-K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)                                   # (B, 1+L', D)
        return self.norm(self.blocks(x))                                 # (B, 1+L', D)


class MaeDecoder(nn.Module):
    """Lightweight transformer: visible tokens + mask tokens -> pixels of every patch."""

    pos_embed: torch.Tensor

    def __init__(self, enc_dim: int, patch_dim: int, grid: tuple[int, int], dim: int, depth: int, heads: int,
                 mlp_ratio: float):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid), persistent=False)  # (1, 1+L, Dd)
        self.blocks = _blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)                                                # (B, 1+L-K, Dd)
        B, L = ids_restore.shape
        masks = self.mask_token.expand(B, L + 1 - x.shape[1], -1)        # (B, K, Dd)
        x_ = torch.cat([x[:, 1:], masks], dim=1)                         # (B, L, Dd) shuffled order
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # (B, L, Dd) unshuffled
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed            # (B, 1+L, Dd)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])                                       # (B, L, p*p*C)


class MaskedAutoencoder(nn.Module):
    def __init__(self, p: MaeParams, in_chans: int, img_size: tuple[int, int], num_outputs: int):
        super().__init__()
        self.p = p.patch_size
        self.fit = FitToPatches(img_size, p.patch_size, "pad")
        self.grid = (self.fit.out_size[0] // p.patch_size, self.fit.out_size[1] // p.patch_size)
        check_visible(p, self.grid)
        patch_dim = p.patch_size ** 2 * in_chans
        dim = heads_multiple(p.embed_dim, p.num_heads)
        dec_dim = heads_multiple(p.decoder_dim, p.decoder_heads)
        self.encoder = MaeEncoder(patch_dim, self.grid, dim, p.depth, p.num_heads, p.mlp_ratio, p.mlp, p.qk_norm,
                                  p.layer_scale)
        self.decoder = MaeDecoder(dim, patch_dim, self.grid, dec_dim, p.decoder_depth, p.decoder_heads, p.mlp_ratio)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)
        self.mask_ratio = p.mask_ratio
        self.mask_nonempty = p.mask_nonempty and p.patch_size > 1
        self.norm_pix_loss = p.norm_pix_loss
        self.pool = p.pool
        self.linear_probe = p.finetune == "linear"
        self.apply(_init_weights)
        for t in (self.encoder.cls_token, self.decoder.mask_token):
            nn.init.normal_(t, std=0.02)

    # --- pieces (MAE naming) ---
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) raw image -> (B, L, p*p*C) patches of the zero-padded image."""
        return patchify(self.fit(x), self.p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H', W') padded image."""
        return unpatchify(x, self.p, self.grid)

    def nonempty_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) raw image -> (B, L) bool: some channel varies over the patch's real pixels."""
        if not self.mask_nonempty:
            return torch.ones(x.shape[0], self.grid[0] * self.grid[1], dtype=torch.bool, device=x.device)
        pad = ~self.fit(torch.ones_like(x[:1, :1])).bool()                     # (1, 1, H', W'), padding True
        x = self.fit(x)                                                        # (B, C, H', W')
        hi = patchify(x.masked_fill(pad, -math.inf), self.p)                   # (B, L, p*p*C)
        lo = patchify(x.masked_fill(pad, math.inf), self.p)
        B, L, _ = hi.shape
        span = hi.view(B, L, self.p * self.p, -1).amax(2) - lo.view(B, L, self.p * self.p, -1).amin(2)  # (B, L, C)
        return (span > EMPTY_TOL).any(dim=-1)

    def random_masking(self, nonempty: torch.Tensor) -> Masking:
        return random_masking(nonempty, self.mask_ratio)

    def forward_encoder(self, patches: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, 1+L', D), L' = len(ids_keep) or L."""
        return self.encoder(patches, ids_keep)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1+L-K, D) -> (B, L, p*p*C) predicted pixels of every patch."""
        return self.decoder(latent, ids_restore)

    def forward_loss(self, patches: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """patches, pred: (B, L, p*p*C); target: (B, L) bool -> () mean per-patch MSE over target patches."""
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True)
            patches = (patches - mean) / (var + 1e-6) ** 0.5
        loss = (pred - patches).pow(2).mean(dim=-1)                            # (B, L)
        w = target.to(loss.dtype)
        return (loss * w).sum() / w.sum().clamp_min(1.0)                       # 0 (with grad) if none masked

    def forward_pretrain(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> () reconstruction loss on the masked patches."""
        patches = self.patchify(x)                                             # (B, L, p*p*C)
        m = self.random_masking(self.nonempty_patches(x))
        latent = self.forward_encoder(patches, m.ids_keep)                     # (B, 1+L-K, D)
        pred = self.forward_decoder(latent, m.ids_restore)                     # (B, L, p*p*C)
        return self.forward_loss(patches, pred, m.target)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) pooled encoder features, all patches visible."""
        tokens = self.forward_encoder(self.patchify(x))                       # (B, 1+L, D)
        return tokens[:, 0] if self.pool == "token" else tokens[:, 1:].mean(dim=1)

    def forward(self, x: torch.Tensor, pretrain: bool = False) -> torch.Tensor:
        if pretrain:
            return self.forward_pretrain(x)                                    # ()
        f = self.forward_features(x)                                           # (B, D)
        if self.linear_probe:
            f = f.detach()
        return self.head(self.head_norm(f))                                    # (B, outputs)


@register_family("mae", params=MaeParams, shape_params=("patch_size", "mask_ratio", "pretrain_epochs"),
                 capabilities=Capabilities(task_heads=True, pretraining=True, rollout=True))
def build_mae(p: MaeParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
              tasks: dict[str, int] | None = None) -> nn.Module:
    """Masked autoencoder (ViT) pretrained on the images, then fine-tuned or linearly probed."""
    return MaskedAutoencoder(p, in_chans, cast("tuple[int, int]", tuple(img_size)), num_outputs)
