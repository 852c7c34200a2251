"""One epoch's state of a trial: saved by training, read by resume, export and report.

A checkpoint folder (trainables/core/layout.py) holds ``checkpoint.pt``, a plain dict of tensors and plain
values (read with ``torch.load(weights_only=True)``)::

    model      state dict of the (unwrapped) model
    optimizer  AdamW state, scheduler  LambdaLR state     (absent in exported or stripped checkpoints)
    epoch      the epoch it was written after (epochs count across pretraining and the task)
    family     the family name; params  the trial's sampled values; data  DataSetup fields without the splits
    metrics    the epoch's reported metrics
    trial_id   the Tune trial that wrote it (absent outside a search): PBT restores it into other trials

and ``metrics.json`` (the same metrics, readable without torch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.core.layout import CHECKPOINT_FILE, METRICS_FILE
from trainables.data.setup import DataSetup

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointError(ValueError):
    """A file that is not a readable e2e-search trial checkpoint; the message says why and what to give."""


@dataclass
class TrialCheckpoint:
    model: dict[str, Any]
    epoch: int
    family: str
    params: dict[str, Any]
    data: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    trial_id: str | None = None

    @property
    def source(self) -> str | None:
        """``<trial id>@<epoch>``: where these weights came from (None when no trial id was recorded)."""
        return f"{self.trial_id}@{self.epoch}" if self.trial_id else None

    def save(self, folder: str | Path) -> Path:
        """Write ``checkpoint.pt`` and ``metrics.json`` into ``folder`` (created); returns the .pt path."""
        import torch

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {
            "model": self.model, "epoch": int(self.epoch), "family": self.family, "params": self.params,
            "data": self.data, "metrics": self.metrics}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        if self.trial_id is not None:
            state["trial_id"] = self.trial_id
        path = folder / CHECKPOINT_FILE
        torch.save(state, path)
        (folder / METRICS_FILE).write_text(json.dumps(self.metrics))
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> TrialCheckpoint:
        """Read ``checkpoint.pt`` (a file, or a folder holding one) with ``torch.load(weights_only=True)``.
        Raises CheckpointError when it is not a PyTorch file or not written by a trial of this version."""
        import torch

        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT_FILE
        try:
            raw = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - garbage, truncated or non-torch files
            raise CheckpointError(f"is not a PyTorch checkpoint ({load_error(e)})") from None
        kinds = {"model": dict, "family": str, "params": dict, "data": dict}
        missing = [k for k, kind in kinds.items() if not (isinstance(raw, dict) and isinstance(raw.get(k), kind))]
        if missing:
            raise CheckpointError(f"is not an e2e-search trial checkpoint (no {', '.join(missing)})")
        required = {f.name for f in dataclasses.fields(DataSetup)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        lacking = sorted(required - set(raw["data"]) - {"train", "val", "test"})
        if lacking:
            raise CheckpointError(f"the checkpoint's data settings lack {', '.join(lacking)}; it was not written by "
                                  "this version's training core")
        return cls(model=raw["model"], epoch=int(raw.get("epoch") or 0), family=str(raw["family"]),
                   params=dict(raw["params"]), data=dict(raw["data"]), metrics=dict(raw.get("metrics") or {}),
                   optimizer=raw.get("optimizer"), scheduler=raw.get("scheduler"),
                   trial_id=str(raw["trial_id"]) if raw.get("trial_id") else None)

    def setup(self) -> DataSetup:
        """The data settings the model was trained for (no split lists)."""
        fields = {f.name for f in dataclasses.fields(DataSetup)}
        return DataSetup(**{k: v for k, v in self.data.items() if k in fields and k not in ("train", "val", "test")},
                         train=[], val=[], test=[])

    def model_state(self) -> dict[str, Any]:
        """The model's weights, without a DDP ``module.`` prefix."""
        return {k.removeprefix("module."): v for k, v in self.model.items()}


def model_data(data: dict[str, Any]) -> dict[str, Any]:
    """What export and inference need of ``DataSetup.to_dict()`` to rebuild the model: the split lists left out."""
    return {k: v for k, v in data.items() if k not in ("train", "val", "test", "label_order")}


def checkpoint_score(metrics: dict[str, Any], metric: str, mode: str) -> float:
    """Higher is better; pretraining epochs (no task metric yet) and NaN rank below every real epoch.
    Of equal values the earlier epoch scores higher (1e-9 per epoch), as the trial's best epoch in MLflow is
    the first one reaching the best value: Ray then keeps that epoch's checkpoint."""
    v = metrics.get(metric)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return -1e30
    return (float(v) if mode == "max" else -float(v)) - 1e-9 * int(metrics.get("epoch", 0))


def load_error(e: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words (torch's own text is paragraphs)."""
    text = _ANSI.sub("", str(e))
    if isinstance(e, EOFError):
        return "empty or truncated file"
    glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if glob:
        return f"it holds a pickled {glob.group(1)}, not only tensors and plain values; torch.load(weights_only=True) refuses it"
    op = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    detail = op.group(1).strip() if op else (text.strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {detail}"[:200]
