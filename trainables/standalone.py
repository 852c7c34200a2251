"""One family trained on one file with one set of parameters, in this process: no Ray, no search, no MLflow.

    from trainables import train_one
    from trainables.data.images import setup_for_file

    data = setup_for_file("jets.h5", image_key="X_jets", label_key="y")           # splits and channel statistics
    result = train_one("vit", {"patch_size": 5, "depth": 2, "lr": 1e-3}, data, epochs=3, out_dir="e2e_runs/one/vit")
    result.best["val_auc"], result.checkpoint                                      # e2e_runs/one/vit/epoch_0003/

The same training core as a search's trials (trainables/core/loop.py), on a :class:`LocalSession`: every epoch's
checkpoint is kept in ``out_dir/epoch_<nnnn>/`` (``checkpoint.pt`` is what ``e2e-search export`` reads).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.core.contract import TrialConfig
from trainables.core.loop import train_trial
from trainables.core.session import LocalSession
from trainables.data.setup import DataSetup


@dataclass
class TrainResult:
    """What :func:`train_one` returns."""

    best: dict[str, Any]
    """The report of the best epoch by ``metric`` (``epoch``, ``val_loss``, ``val_auc`` ...)."""
    last: dict[str, Any]
    """The last epoch's report."""
    checkpoint: Path
    """The best epoch's checkpoint folder (holds ``checkpoint.pt`` and ``metrics.json``)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every epoch's report, in order."""


def train_one(family: str, params: dict[str, Any], data: DataSetup, *, epochs: int, out_dir: str | Path,
              metric: str | None = None, mode: str | None = None, device: str = "cpu",
              loader_workers: int = 0) -> TrainResult:
    """Train ``family`` (a name of trainables.registry) with ``params`` (the family's and the training parameters,
    as in a search space's ``params``, fixed values) on ``data`` for ``epochs`` epochs on ``device``.

    ``metric``/``mode``: the report that picks the best epoch; default ``val_auc``/max for a classification,
    ``val_loss``/min otherwise.

    Raises:
        trainables.errors.UserError: an unknown family or parameter (pydantic's message, one line).
        trainables.core.engine.NonFiniteLoss: the loss went NaN or Inf.
    """
    metric = metric or ("val_auc" if data.task == "classification" else "val_loss")
    mode = mode or ("max" if metric in ("val_auc", "val_acc") or metric.startswith("val_rej") else "min")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
    cfg = TrialConfig(family=family, params=dict(params), data=data.to_dict(), max_epochs=epochs, metric=metric,
                      mode="max" if mode == "max" else "min", metrics=[metric], loader_workers=loader_workers,
                      launched_at=time.time())
    session = LocalSession(Path(out_dir), device=device)
    train_trial(cfg, session)
    reports = [(m, ck) for m, ck in session.reports if ck is not None]
    if not reports:
        raise RuntimeError(f"the training of {family} reported no checkpoint")
    sign = 1.0 if mode == "max" else -1.0

    def score(m: dict[str, Any]) -> float:
        v = m.get(metric)
        return sign * float(v) if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf

    best, ckpt = max(reports, key=lambda r: score(r[0]))
    return TrainResult(best=best, last=session.reports[-1][0], checkpoint=ckpt,
                       history=[m for m, _ in session.reports])
