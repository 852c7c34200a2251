"""Reconstruction losses of hidden objects suited to each feature (masked-object pretraining of
trainables/families/event_transformer.py with ``recon_loss: per_feature``).

The decoder predicts one number per feature of each hidden object; what the number means depends on the
feature (names from trainables/data/object_names.py, statistics from the data's per-feature standardization):

    pt     log(1 + pT / GeV)                  squared error in log space (a relative error: 10% at 20 GeV
                                              weighs what 10% at 200 GeV does)
    phi    phi, standardized like the input   2 (1 - cos(dphi)) on the raw angle: periodic, 0 at dphi = 0,
                                              ~dphi^2 near it, so -pi and pi are the same angle
    btag   a logit                            binary cross-entropy with the 0/1 tag (a class, not a value)
    other  the standardized feature           squared error (eta, any feature of another layout)

Inspired by masked particle modelling (Golling et al. 2024, "Masked particle modeling on sets"), which
predicts features in the form each one calls for rather than one MSE over standardized inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureLosses(nn.Module):
    """Per-feature losses over (B, N, F) tensors: ``names`` (F,) feature names; ``mean``/``std`` (F,) the
    standardization the inputs carry (None: none)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, names: list[str], mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        n = len(names)
        self.names = list(names)
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * n, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * n, dtype=torch.float32))

    def _raw(self, x: torch.Tensor, j: int) -> torch.Tensor:
        return x[..., j].float() * self.std[j] + self.mean[j]                  # (B, N) in the file's units

    def loss(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Decoder outputs and standardized inputs (B, N, F) -> the mean over features of each object's loss (B, N)."""
        terms = []
        for j, name in enumerate(self.names):
            p = pred[..., j].float()
            if name == "pt":
                terms.append((p - torch.log1p(self._raw(x, j).clamp_min(0))).pow(2))
            elif name == "phi":
                terms.append(2 * (1 - torch.cos(p * self.std[j] + self.mean[j] - self._raw(x, j))))
            elif name == "btag":
                terms.append(F.binary_cross_entropy_with_logits(p, self._raw(x, j).clamp(0, 1), reduction="none"))
            else:
                terms.append((p - x[..., j].float()).pow(2))
        return torch.stack(terms, dim=-1).mean(dim=-1)                         # (B, N)

    def as_inputs(self, pred: torch.Tensor) -> torch.Tensor:
        """Decoder outputs (B, N, F) -> the predicted features standardized like the inputs (phi wrapped into
        (-pi, pi]), so that errors compare with the MSE form's (trainables/core/recon.py)."""
        cols = []
        for j, name in enumerate(self.names):
            p = pred[..., j].float()
            if name == "pt":
                raw = torch.expm1(p.clamp(max=30.0))
            elif name == "phi":
                raw = torch.remainder(p * self.std[j] + self.mean[j] + math.pi, 2 * math.pi) - math.pi
            elif name == "btag":
                raw = torch.sigmoid(p)
            else:
                cols.append(p)
                continue
            cols.append((raw - self.mean[j]) / self.std[j])
        return torch.stack(cols, dim=-1)                                       # (B, N, F)

    def errors(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Squared errors (B, N, F) in standardized units; phi's difference taken on the circle."""
        err = self.as_inputs(pred) - x.float()
        for j, name in enumerate(self.names):
            if name == "phi":
                d = (err[..., j] * self.std[j] + math.pi) % (2 * math.pi) - math.pi
                err = err.clone()
                err[..., j] = d / self.std[j]
        return err.pow(2)
