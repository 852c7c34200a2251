"""Family ``deepsets``: a permutation-invariant baseline on events as padded lists of objects.

Each object (pt, eta, phi, b-tag, ...) goes through the same MLP; a masked
pooling over the real objects (padding ignored) feeds a second MLP:
    x (B, N, F), mask (B, N) -> phi(x) (B, N, H) -> pool -> rho (B, outputs)
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainables.registry import Capabilities, register_family


class DeepSetsParams(BaseModel):
    model_config = ConfigDict(extra="ignore")

    hidden: int = Field(default=64, ge=4)
    depth: int = Field(default=2, ge=1)
    set_pool: Literal["mean", "sum", "max"] = "mean"


def _mlp(n_in: int, hidden: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.GELU()]
    return nn.Sequential(*layers)


class DeepSets(nn.Module):
    def __init__(self, p: DeepSetsParams, n_features: int, num_outputs: int):
        super().__init__()
        self.norm = nn.LayerNorm(n_features)
        self.phi = _mlp(n_features, p.hidden, p.depth)
        self.rho = nn.Sequential(_mlp(p.hidden, p.hidden, p.depth), nn.Linear(p.hidden, num_outputs))
        self.set_pool = p.set_pool

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.dtype).unsqueeze(-1)                      # (B, N, 1)
        h = self.phi(self.norm(x)) * m                          # (B, N, H), padding zeroed
        if self.set_pool == "max":
            h = h.masked_fill(m == 0, float("-inf")).amax(dim=1).nan_to_num(0.0, neginf=0.0)
        else:
            h = h.sum(dim=1)
            if self.set_pool == "mean":
                h = h / m.sum(dim=1).clamp_min(1.0)
        return self.rho(h)                                      # (B, outputs)


@register_family("deepsets", params=DeepSetsParams, capabilities=Capabilities(inputs="objects"))
def build_deepsets(p: DeepSetsParams, *, n_objects: int, n_features: int, num_outputs: int) -> nn.Module:
    """Deep Sets over reconstructed objects (baseline for event-level data)."""
    return DeepSets(p, n_features, num_outputs)
