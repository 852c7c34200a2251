"""``predictions.npz``: a split's model outputs and encoded labels, saved beside a checkpoint (read by the MLflow
record's plots and by ``confirm``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_predictions(path: str | Path, out: np.ndarray, y: np.ndarray, *, task: str, num_classes: int,
                     target_mean: float, target_std: float) -> None:
    """Write ``out`` (n, outputs) float32 and encoded labels ``y`` (n,) or (n, 2) to ``path`` with what reading them needs
    (task, class count, the target's standardization in its physical units)."""
    np.savez_compressed(path, out=out.astype(np.float32), y=y, task=task, num_classes=num_classes,
                        target_mean=target_mean, target_std=target_std)
