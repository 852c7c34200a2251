"""Physics pair features of detector deposits, embedded into a per-head attention bias (ParT).

Source: Qu, Li, Qian, "Particle Transformer for Jet Tagging", ICML 2022 (arXiv 2202.03772), section 3.
For two deposits a, b treated as massless, with energy E (GeV, or whatever unit the pixels hold), pseudorapidity
offset η and azimuth offset φ (radians) from the image centre::

    ΔR   = sqrt(Δη² + Δφ²)
    kT   = min(E_a, E_b) · ΔR
    z    = min(E_a, E_b) / (E_a + E_b)
    m²   = 2 E_a E_b (cosh Δη − cos Δφ)        (the invariant mass of the pair, massless deposits)

Each enters as its logarithm (floored at ``EPS``). :class:`PairBias` embeds the four logarithms of every pair
with a small pointwise MLP into one value per attention head; ParT adds it to the attention logits of every
particle-attention block (the same bias in each). Pairs with a padded token get ``-inf`` (never attended).

Shapes: positions and energies (B, N); features (B, N, N, 4); bias (B, heads, N, N).
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-6
"""Floor of every pair quantity before its logarithm (ΔR of a deposit with itself is 0)."""
FEATURES = ("ln_delta_r", "ln_kt", "ln_z", "ln_m2")


def pair_features(eta: torch.Tensor, phi: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """(B, N) η, φ (rad) and E (> 0 for real tokens) -> (B, N, N, 4): ln ΔR, ln kT, ln z, ln m² of every pair.

    Computed in log space (one log per pair for ΔR, one for E_a + E_b, one for m²; the per-token ln E once);
    2 cosh Δη is written as exp(Δη) + exp(-Δη) (ONNX opset 17 has no Cosh export in PyTorch's TorchScript exporter)."""
    deta = eta[:, :, None] - eta[:, None, :]                                       # (B, N, N)
    dphi = phi[:, :, None] - phi[:, None, :]
    e = energy.clamp_min(EPS)
    ln_e = e.log()                                                                  # (B, N)
    ln_dr = 0.5 * (deta * deta + dphi * dphi).clamp_min(EPS * EPS).log()
    ln_min = torch.minimum(ln_e[:, :, None], ln_e[:, None, :])
    ln_z = ln_min - (e[:, :, None] + e[:, None, :]).log()
    ln_m2 = ln_e[:, :, None] + ln_e[:, None, :] + (torch.exp(deta) + torch.exp(-deta) - 2 * torch.cos(dphi)).clamp_min(EPS).log()
    return torch.stack([ln_dr, ln_min + ln_dr, ln_z, ln_m2], dim=-1)


class PairBias(nn.Module):
    """ParT's interaction embedding: (B, N, N, 4) pair features -> (B, heads, N, N) attention bias.

    ``width``: hidden width of the pointwise MLP (4 -> width -> heads, GELU; ParT uses 4 -> 64 -> 64 -> 64 ->
    heads, whose cost per jet on a CPU is several times the rest of the model at 128 hits: the MLP runs on every
    one of the K² pairs). The logarithms are scaled by 1/4 (they span about -14..+10) so the first layer starts
    in a sane range.
    """

    def __init__(self, heads: int, width: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(len(FEATURES), width), nn.GELU(), nn.Linear(width, heads))

    def forward(self, eta: torch.Tensor, phi: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        f = pair_features(eta, phi, energy) * 0.25                                   # (B, N, N, 4)
        return self.mlp(f).permute(0, 3, 1, 2)                                       # (B, heads, N, N)


def masked_bias(bias: torch.Tensor | None, valid: torch.Tensor, heads: int) -> torch.Tensor:
    """Additive float attention mask (B, heads or 1, N, N): ``bias`` (or 0) where the key is a real token or the
    query itself, ``-inf`` elsewhere (a padded query attends only to itself, so no row is all ``-inf``)."""
    B, N = valid.shape
    ar = torch.arange(N, device=valid.device)
    eye = ar[:, None] == ar[None, :]  # (onnxruntime has no bool EyeLike)
    allowed = valid[:, None, None, :] | eye                                          # (B, 1, N, N)
    base = bias if bias is not None else torch.zeros(B, 1, N, N, device=valid.device)
    return base.masked_fill(~allowed, float("-inf"))
