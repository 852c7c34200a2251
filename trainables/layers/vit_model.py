"""timm's VisionTransformer with a choice of position encoding, and a token sequence of non-empty patches only.

:class:`Vit` subclasses ``timm.models.vision_transformer.VisionTransformer`` and keeps all its parameter
names; with ``pos_embed="learned"`` and ``token_keep="all"`` its forward *is* timm's.

``pos_embed``:

* ``learned``: timm's learned table (1, P + L, D) added to the tokens (P prefix tokens: class + registers);
* ``sincos``: a fixed 2-D sin-cos table in the same place (not a parameter, not in the state dict);
* ``rope``: no additive table; queries and keys of the patch tokens are rotated in every block (2-D axial
  RoPE, Heo et al. 2024); class and register tokens are not rotated;
* ``none``: no position information.

``token_keep="nonempty"`` (NaViT, Dehghani et al. 2023, as variable-length sequences with a validity mask;
timm's NaFlexViT keeps ``patch_coord`` and ``patch_valid`` the same way): :class:`NonEmptyPatches` finds the
patches that hold a pixel different from the empty-cell value (per channel, see ``empty_pixel``), and
only those become tokens, in grid order, padded per batch to the longest jet::

    x (B, C, H', W') -> patches (B, L, C*p*p) -> kept (B, K, C*p*p), index (B, K), valid (B, K)
      -> tokens (B, P + K, D) = [prefix, linear(kept) + table[index]] -> blocks with a key padding mask
      -> pool over the valid tokens -> head

K is the largest count of non-empty patches in the batch (at least 1: a jet with no hit keeps its first
patch). While tracing or exporting (ONNX, ``torch.export``) and on the meta device, K is L, the whole grid
in grid order, with the same mask: a fixed shape with the same outputs. Positions come from the grid
index of each token (a row of the learned or sin-cos table, or the rotary table). Padded tokens are
never attended to and never pooled, so a jet's output does not depend on the other jets of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from trainables.layers.pair_bias import PairBias, masked_bias
from trainables.layers.vit_blocks import RopeBlock, SoftmaxAttention, rope_2d, sincos_2d, window_ids

EMPTY_TOL = 1e-5
"""A pixel is empty when it is within EMPTY_TOL * max(1, |empty value|) of its channel's empty value."""


def fixed_length(x: torch.Tensor) -> bool:
    """True where the token count must not depend on the data: tracing, exporting, the meta device."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    return (x.device.type == "meta" or torch.jit.is_tracing() or torch.jit.is_scripting() or exporting
            or torch.onnx.is_in_onnx_export())


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W), H and W multiples of p -> (B, L, C*p*p): row-major patches, each flattened as (c, i, j),
    the layout of a stride-p convolution's weight (D, C, p, p)."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


class NonEmptyPatches(nn.Module):
    """(B, C, H', W') fitted images -> (patches (B, K, C*p*p), index (B, K) long, valid (B, K) bool).

    A patch is non-empty when one of its real pixels (not FitToPatches' padding) differs from its channel's
    empty value. ``real``: (H', W') bool of the real pixels; ``empty``: (C,) empty value per channel.
    """

    empty: torch.Tensor
    tol: torch.Tensor
    real: torch.Tensor

    def __init__(self, patch: int, in_chans: int, real: torch.Tensor, empty: Sequence[float] | torch.Tensor | None):
        super().__init__()
        self.patch = patch
        empty_t = torch.zeros(in_chans) if empty is None else torch.as_tensor(empty, dtype=torch.float32).reshape(-1)
        if empty_t.numel() != in_chans:
            raise ValueError(f"empty_pixel has {empty_t.numel()} values for {in_chans} channels")
        vec = empty_t.to(real.device).repeat_interleave(patch * patch)                 # (C*p*p,)
        self.register_buffer("empty", vec, persistent=False)
        self.register_buffer("tol", EMPTY_TOL * vec.abs().clamp_min(1.0), persistent=False)
        real_patches = patchify(real[None, None].float().expand(1, in_chans, -1, -1), patch)  # (1, L, C*p*p)
        self.register_buffer("real", real_patches > 0, persistent=False)

    def nonempty(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, C*p*p) -> (B, L) bool: the patch holds a hit; a jet without any keeps its first patch."""
        hit = (((patches - self.empty).abs() > self.tol) & self.real).any(-1)         # (B, L)
        none = ~hit.any(1, keepdim=True)                                                # (B, 1)
        first = torch.zeros_like(hit)
        first[:, 0] = True
        return hit | (none & first)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        patches = patchify(x, self.patch)                                               # (B, L, C*p*p)
        keep = self.nonempty(patches)                                                   # (B, L)
        B, L = keep.shape
        if fixed_length(x):
            index = torch.arange(L, device=x.device).expand(B, L)
            return patches, index, keep
        k = int(keep.sum(1).max())
        index = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :k]      # non-empty first, grid order
        valid = torch.gather(keep, 1, index)                                            # (B, K)
        kept = torch.gather(patches, 1, index[..., None].expand(-1, -1, patches.shape[-1]))
        return kept, index, valid


class Vit(VisionTransformer):
    """timm VisionTransformer + ``pos_embed`` choice + ``token_keep`` (module docstring).

    ``window``: with ``token_keep="nonempty"`` and window attention, the window side in patches (the model
    builds the window mask of its tokens; with all tokens the attention modules hold it). ``real``: the
    (H', W') bool mask of real pixels of the fitted image (needed for ``nonempty``). ``empty_pixel``: the
    value of an empty cell per channel after preprocessing (None: 0). Other keywords go to timm.
    """

    rope_table: torch.Tensor | None
    pair_std: torch.Tensor

    def __init__(self, *, pos_embed: str = "learned", token_keep: str = "all", window: int | None = None,
                 real: torch.Tensor | None = None, empty_pixel: Sequence[float] | None = None,
                 pair_bias: bool = False, pair_width: int = 8, pixel_std: Sequence[float] | None = None,
                 pixel_size: float = 0.0174, **kw):
        kw.setdefault("block_fn", RopeBlock)
        kw.setdefault("attn_layer", SoftmaxAttention)
        if pos_embed not in ("learned", "sincos", "rope", "none"):
            raise ValueError(f"pos_embed '{pos_embed}' is not one of learned, sincos, rope, none")
        super().__init__(pos_embed="learn" if pos_embed in ("learned", "sincos") else "none", **kw)
        self.pos_kind = pos_embed
        grid = tuple(self.patch_embed.grid_size)
        P, D = self.num_prefix_tokens, self.embed_dim
        device = self.patch_embed.proj.weight.device if hasattr(self.patch_embed, "proj") else None
        if pos_embed == "sincos":
            table = torch.cat([torch.zeros(P, D), sincos_2d(D, grid)])[None].to(device)  # (1, P + L, D)
            del self.pos_embed
            self.register_buffer("pos_embed", table, persistent=False)
        heads = cast(Attention, self.blocks[0].attn).num_heads if len(self.blocks) else 1
        rope = rope_2d(D // heads, grid).to(device) if pos_embed == "rope" else None    # (L, 2 * head_dim)
        self.register_buffer("rope_table", rope, persistent=False)
        self.window = window
        self.keep = None
        if token_keep == "nonempty":
            if real is None:
                raise ValueError("token_keep: nonempty needs the mask of real pixels")
            self.keep = NonEmptyPatches(self.patch_embed.patch_size[0], self.in_chans, real, empty_pixel)
        elif token_keep != "all":
            raise ValueError(f"token_keep '{token_keep}' is not one of all, nonempty")
        self.pair = None
        if pair_bias:
            if self.keep is None or window:
                raise ValueError("pair_bias needs token_keep: nonempty and attention: softmax; set them, or "
                                 "pair_bias: false")
            std = torch.ones(self.in_chans) if pixel_std is None else torch.as_tensor(list(pixel_std), dtype=torch.float32)
            p = self.patch_embed.patch_size[0]
            self.register_buffer("pair_std", std.to(self.keep.empty.device).repeat_interleave(p * p),
                                 persistent=False)                                       # (C*p*p,)
            self.pair = PairBias(heads, pair_width)
            self.pixel_size = pixel_size

    # --- tokens
    def _patch_energy(self, patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, K, C*p*p) kept patches at grid indices (B, K) -> (B, K): summed energy of their hits,
        (x - empty) * std over their real pixels."""
        assert self.keep is not None  # only with token_keep: nonempty (pair_bias)
        d = patches - self.keep.empty
        hit = (d.abs() > self.keep.tol) & self.keep.real[0][index]
        return torch.where(hit, d * self.pair_std, torch.zeros_like(d)).sum(-1)

    def _pair_mask(self, patches: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ParT's pair bias over the kept patches (centres, summed energies) as a float attention mask
        (B, heads, P + K, P + K): the prefix tokens get no bias; padded keys -inf."""
        assert self.pair is not None  # only with pair_bias
        gh, gw = self.patch_embed.grid_size
        p = self.patch_embed.patch_size[0]
        eta = ((index // gw).to(patches.dtype) - (gh - 1) / 2) * p * self.pixel_size          # (B, K) rad
        phi = ((index % gw).to(patches.dtype) - (gw - 1) / 2) * p * self.pixel_size
        bias = self.pair(eta, phi, self._patch_energy(patches, index))                              # (B, h, K, K)
        P = self.num_prefix_tokens
        return masked_bias(F.pad(bias, (P, 0, P, 0)), F.pad(valid, (P, 0), value=True), bias.shape[1])

    def _patch_tokens(self, patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Kept patches (B, K, C*p*p) at grid indices (B, K) -> tokens (B, P + K, D)."""
        self._kept_patches = patches
        proj = self.patch_embed.proj
        t = self.patch_embed.norm(F.linear(patches, proj.weight.flatten(1), proj.bias))  # (B, K, D)
        P = self.num_prefix_tokens
        if self.pos_embed is not None:
            t = t + self.pos_embed[0, P:][index]                                        # (B, K, D)
        B = t.shape[0]
        prefix = [tok.expand(B, -1, -1) for tok in (self.cls_token, self.reg_token) if tok is not None]
        if prefix:
            pre = torch.cat(prefix, dim=1)
            if self.pos_embed is not None:
                pre = pre + self.pos_embed[:, :P]
            t = torch.cat([pre, t], dim=1)                                              # (B, P + K, D)
        return self.norm_pre(self.patch_drop(self.pos_drop(t)))

    def _kept_mask(self, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Key padding mask (B, 1, 1, P + K) bool, or with a window the full mask (B, 1, P + K, P + K)."""
        P = self.num_prefix_tokens
        keys = F.pad(valid, (P, 0), value=True)                                         # (B, P + K)
        if not self.window:
            return keys[:, None, None, :]
        gw = self.patch_embed.grid_size[1]
        win = window_ids(index // gw, index % gw, gw, self.window)                      # (B, K)
        same = F.pad(win[:, :, None] == win[:, None, :], (P, 0, P, 0), value=True)      # (B, P + K, P + K)
        return (same & keys[:, None, :])[:, None]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H', W') -> (tokens after the final norm (B, N, D), valid patch tokens (B, K) or None)."""
        if self.keep is None and self.rope_table is None:
            return super().forward_features(x), None
        rope: torch.Tensor | None
        if self.keep is None:
            x, index, valid, mask = self._pos_embed(self.patch_embed(x)), None, None, None
            x = self.norm_pre(self.patch_drop(x))
            assert self.rope_table is not None  # without keep, features() came here for the rope table
            rope = self.rope_table[None, None]                                          # (1, 1, L, 2d)
        else:
            assert self.keep is not None
            patches, index, valid = self.keep(x)                                        # (B, K, C*p*p), (B, K) x2
            return self.patch_features(patches, index, valid), valid
        for blk in self.blocks:
            x = blk(x, attn_mask=mask, rope=rope)
        return self.norm(x), valid

    def patch_features(self, patches: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``token_keep: nonempty`` from its kept patches: (B, K, C*p*p), grid index (B, K), valid (B, K) ->
        tokens after the final norm (B, P + K, D). What :meth:`features` does after choosing the patches; the
        sparse export feeds it patches chosen outside the graph (trainables/inference.py ``patch_list``)."""
        x = self._patch_tokens(patches, index)
        mask = self._kept_mask(index, valid) if self.pair is None else self._pair_mask(patches, index, valid)
        rope = self.rope_table[index][:, None] if self.rope_table is not None else None  # (B, 1, K, 2d)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask, rope=rope)
        return self.norm(x)

    def forward_patches(self, patches: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The model's output (B, outputs) from its kept patches (see :meth:`patch_features`)."""
        return self.head(self.head_drop(self.fc_norm(self.pooled(self.patch_features(patches, index, valid), valid))))

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.features(x)[0]

    # --- head
    def pooled(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, P + K, D) tokens, valid (B, K) -> (B, D), padding left out."""
        P = self.num_prefix_tokens
        if self.attn_pool is not None:
            return self.attn_pool(x[:, P:], attn_mask=valid[:, None, None, :])
        if self.global_pool == "token":
            return x[:, 0]
        w = valid[..., None].to(x.dtype)                                                # (B, K, 1)
        return (x[:, P:] * w).sum(1) / w.sum(1).clamp_min(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]  # images only: no attn_mask
        if self.keep is None and self.rope_table is None:
            return super().forward(x)  # timm's own forward: today's model
        x, valid = self.features(x)
        if valid is None:
            return self.forward_head(x)
        return self.head(self.head_drop(self.fc_norm(self.pooled(x, valid))))


def kept_grid(model: nn.Module) -> tuple[NonEmptyPatches, tuple[int, int]] | None:
    """The token selector of a ``token_keep: nonempty`` ViT inside ``model`` and its patch grid, else None."""
    for m in model.modules():
        if isinstance(m, Vit) and m.keep is not None:
            return m.keep, tuple(m.patch_embed.grid_size)
    return None


def grid_tokens(index: torch.Tensor, valid: torch.Tensor, values: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Per-token values (B, K) at grid indices (B, K) -> (B, L), zero where no valid token is."""
    out = values.new_zeros(values.shape[0], n_patches)
    return out.scatter(1, index, values * valid.to(values.dtype))
