"""Masked-object reconstruction quality on the validation split: the ``val_recon_*`` metrics.

For families declaring ``masked_objects`` (trainables/registry.py), each pretraining epoch hides objects of
every validation event as training does (the trial's ``mask_ratio``), with a fixed random draw (the same
objects every epoch, on every run of the trial), reconstructs them and reports the mean squared error of
the hidden real objects, in standardized feature units squared (each feature was scaled to unit variance
over the training objects: 1.0 is as bad as predicting the feature's mean; MSE = 0 is perfect):

    val_recon_<object>_<feature>   one per object slot and feature, e.g. val_recon_jet1_pt
    val_recon_<object>             the slot's mean over its features
    val_recon                      over every hidden object and feature
    val_recon_<object>_ratio       the slot's error over that of the slot's own mean predictor (each feature
                                   predicted by its mean over the slot's hidden objects, i.e. its variance
                                   there): < 1 learns something, 0.5 halves the mean predictor's error

Slot and feature names: trainables/data/object_names.py. A slot that was never hidden (e.g. absent in every
event) has no metric. Fine-tuning epochs repeat the last pretraining epoch's figures (the decoder is not
trained any more), so the best epoch of a trial carries them (``best_val_recon_*`` in MLflow).
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
import torch.distributed as dist

from trainables.core.model import unwrap
from trainables.data.object_names import slot_names
from trainables.names import mlflow_key

PREFIX = "val_recon"
SEED = 20260519
"""The validation draw of hidden objects (fixed: epochs and trials see the same draw for the same ratio)."""


class _MaskedObjects(Protocol):
    """What a family declaring ``masked_objects`` provides (e.g. trainables/families/event_transformer.py)."""

    def sample_hidden(self, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def masked_errors(self, x: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor: ...


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def masked_sums(model: torch.nn.Module, loader, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Over ``loader``'s batches (((x (B, N, F), mask (B, N)), y)): summed squared errors of the hidden real
    objects (N, F) float64, how many objects each slot had hidden (N,) float64 and the sums of the hidden
    objects' features and their squares (2, N, F) float64, summed over ranks."""
    m = cast(_MaskedObjects, unwrap(model))
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    sq: torch.Tensor | None = None
    cnt: torch.Tensor | None = None
    mom: torch.Tensor | None = None
    for (x, mask), _ in loader:
        x, mask = x.to(device), mask.to(device).bool()
        hidden = m.sample_hidden(mask, gen)                                    # (B, N)
        err = m.masked_errors(x, mask, hidden).double()                       # (B, N, F)
        s, c = err.sum(0), hidden.double().sum(0)                              # (N, F), (N,)
        xh = x.double() * hidden.unsqueeze(-1)                                 # (B, N, F) hidden objects only
        mo = torch.stack([xh.sum(0), (xh * xh).sum(0)])                        # (2, N, F)
        sq, cnt, mom = (s, c, mo) if sq is None or cnt is None or mom is None else (sq + s, cnt + c, mom + mo)
    if sq is None or cnt is None or mom is None:
        raise ValueError("the validation loader gave no batch")
    return _all_reduce(sq), _all_reduce(cnt), _all_reduce(mom)


def recon_metrics(sq: torch.Tensor, cnt: torch.Tensor, mom: torch.Tensor | None = None) -> dict[str, float]:
    """Summed squared errors (N, F), hidden counts (N,) and (with ``mom`` (2, N, F): the hidden features' sums
    and sums of squares) -> the ``val_recon_*`` metrics (see the module)."""
    n_obj, n_feat = sq.shape
    objects, features = slot_names(n_obj, n_feat)
    out: dict[str, Any] = {}
    for i, obj in enumerate(objects):
        if float(cnt[i]) <= 0:
            continue
        for j, feat in enumerate(features):
            out[mlflow_key(f"{PREFIX}_{obj}_{feat}")] = float(sq[i, j] / cnt[i])
        out[mlflow_key(f"{PREFIX}_{obj}")] = float(sq[i].sum() / (cnt[i] * n_feat))
        if mom is not None:
            var = (mom[1, i] - mom[0, i] ** 2 / cnt[i]).clamp_min(0).sum()  # the slot's mean predictor's error
            if float(var) > 0:
                out[mlflow_key(f"{PREFIX}_{obj}_ratio")] = float(sq[i].sum() / var)
    total = float(cnt.sum())
    if total > 0:
        out[PREFIX] = float(sq.sum() / (total * n_feat))
    return out


def validation_recon(model: torch.nn.Module, loader, device) -> dict[str, float]:
    """The ``val_recon_*`` metrics of ``model`` on ``loader`` (this rank's share; summed over ranks)."""
    return recon_metrics(*masked_sums(model, loader, device))
