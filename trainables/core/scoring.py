"""Scoring a trained model once on a held-out split (``TrialConfig.score_split``, used by ``e2e-search confirm``).

The split is read like validation (no augmentation, no shuffling), each DDP rank scoring its stride of it; the
outputs, encoded labels and file indices of every rank are gathered on each rank. The physics metrics are those
of trainables/metrics.py, named for the split: ``test_auc``, ``test_rej30``, ``test_mae``,
``test_bin/<lo>-<hi>/resolution`` ... The predictions are written beside the checkpoint
(``test_predictions.npz``, layout.TEST_PREDICTIONS_FILE) for the bootstrap (e2e_search/analysis/bootstrap.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.core.datasets import open_split
from trainables.core.engine import NonFiniteLoss, autocast, gather
from trainables.core.model import channels_last, forward, to_device
from trainables.metrics import task_metrics


@dataclass
class Scored:
    """One model scored on one split (every rank's share gathered)."""

    part: str
    metrics: dict[str, float]
    """``<part>_loss`` and the physics metrics, ``val_`` renamed ``<part>_``."""
    out: np.ndarray
    """Model outputs (n, outputs) float32."""
    y: np.ndarray
    """Encoded labels (see data.encode_labels): class (n,), standardized target (n,), or both (n, 2)."""
    index: np.ndarray
    """The events' indices in the data file (n,) int64, in the order of ``out``."""
    seconds: float = 0.0


def renamed(metrics: dict[str, float], part: str) -> dict[str, float]:
    """``val_auc`` -> ``test_auc``, ``val_bin/a-b/mae`` -> ``test_bin/a-b/mae``; other names unchanged."""
    return {(f"{part}_{k[4:]}" if k.startswith("val_") else k): v for k, v in metrics.items()}


def _batches(eng, ds, batch_size: int):
    """The split's batches, in order: cut from cached tensors on the device, or a DataLoader (as validation)."""
    data, device = eng.data, eng.device
    if data.cache == "sparse" and data.kind == "images":  # as validation: built on the device from the CSR rows
        from trainables.core.batches import SparseBatches

        return SparseBatches(ds.rows(device), ds.positions, torch.as_tensor(ds.labels), batch_size, shuffle=False,
                             hits=eng.caps.hits)
    on_device = data.cache == "device" or (data.cache == "memory" and device.type == "cpu")
    if on_device and data.kind == "images":
        from trainables.core.batches import DeviceBatches

        images, labels = ds.tensors()
        return DeviceBatches(images, labels, batch_size, device, shuffle=False)
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=eng.cfg.loader_workers,
                      pin_memory=device.type == "cuda")


@torch.no_grad()
def score_split(eng, part: str = "test") -> Scored:
    """Score ``eng``'s model (an trainables.core.engine.Engine, as trained so far) on split ``part`` of its data.

    Raises ValueError when the split is empty (``data.test_fraction: 0``) and NonFiniteLoss on a NaN/Inf loss."""
    t0 = time.time()
    data = eng.data
    rank, world = eng.session.rank, eng.session.world
    indices = list(getattr(data, part))
    if not indices:
        raise ValueError(f"the {part} split is empty (data.{part}_fraction is 0): nothing to score")
    mine = indices[rank::world]
    ds = open_split(data, part, mine)
    eng.model.eval()
    outs, ys = [], []
    total = torch.zeros((), dtype=torch.float64, device=eng.device)
    with autocast(eng.amp_dtype, eng.device):
        for x, y in _batches(eng, ds, max(eng.tp.batch_size, 128)):
            x, y = channels_last(to_device(x, eng.device), eng.nhwc), y.to(eng.device)
            out = forward(eng.step_model, x)
            total += eng.loss_fn(out, y).double() * len(y)
            outs.append(out.float())
            ys.append(y)
    from trainables.core.engine import mean_across_ranks

    loss = mean_across_ranks(float(total), len(mine), eng.device)
    if not np.isfinite(loss):
        raise NonFiniteLoss(f"non-finite {part} loss ({loss})")
    outputs = gather(torch.cat(outs).cpu().numpy() if outs else np.zeros((0, 1), np.float32))
    y = gather(torch.cat(ys).cpu().numpy() if ys else np.zeros((0,), np.float32))
    index = gather(np.asarray(mine, dtype=np.int64))
    metrics = {f"{part}_loss": loss}
    metrics.update(renamed(task_metrics(data.task, data.num_classes, outputs, y, data.target_mean, data.target_std),
                           part))
    return Scored(part, metrics, outputs, y, index, time.time() - t0)


def save_scored(path: str | Path, s: Scored, data) -> None:
    """``test_predictions.npz``: out, y, index, and what reading them needs (task, classes, target scale)."""
    np.savez_compressed(path, out=s.out.astype(np.float32), y=s.y, index=s.index.astype(np.int64), part=s.part,
                        task=data.task, num_classes=int(data.num_classes), target_mean=float(data.target_mean),
                        target_std=float(data.target_std))


def load_scored(path: str | Path) -> dict[str, Any]:
    """A ``test_predictions.npz`` as plain values (arrays; ``task`` str, ``num_classes`` int, target scale floats)."""
    with np.load(path, allow_pickle=False) as z:
        return {"out": z["out"], "y": z["y"], "index": z["index"], "part": str(z["part"]), "task": str(z["task"]),
                "num_classes": int(z["num_classes"]), "target_mean": float(z["target_mean"]),
                "target_std": float(z["target_std"])}
