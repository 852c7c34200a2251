"""What the driver knows of each trial of a search, keyed by Tune's trial id: its MLflow run, best and last
results, status, learning curves, the (metric, epoch) pairs already logged, PBT's lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from trainables.names import unique_keys

SKIP = {"epoch", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "time_since_restore",
        "iterations_since_restore", "pid", "done", "num_params", "checkpoint_score"}
"""Result keys that are bookkeeping, not metrics."""


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The result's numbers under names MLflow accepts (see trainables/names.py)."""
    return cast("dict[str, float]", unique_keys({k: float(v) for k, v in result.items()  # (keys renamed only)
                                                 if k not in SKIP and isinstance(v, (int, float))
                                                 and not isinstance(v, bool)}))


def checkpoint_of(trial, result: dict[str, Any]) -> str | None:
    """The folder of the checkpoint reported with ``result``: Ray Train's (``checkpoint_path``, added by
    TuneReportCallback) or, for a trial trained in its Tune process, Tune's own (``checkpoint_dir_name`` in
    the trial's folder)."""
    if result.get("checkpoint_path"):
        return str(result["checkpoint_path"])
    name = result.get("checkpoint_dir_name")
    return str(Path(trial.path) / name) if name and getattr(trial, "path", None) else None


class TrialBook:
    """Per-trial state of a search's MLflow record (plain dicts keyed by trial id)."""

    def __init__(self, metric: str, mode: str, max_epochs: int):
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.runs: dict[str, str] = {}
        self.best: dict[str, dict[str, Any]] = {}  # trial_id -> {"value", "epoch", "metrics", "checkpoint"}
        self.last: dict[str, dict[str, Any]] = {}
        self.status: dict[str, str] = {}
        self.history: dict[str, dict[str, list[tuple[int, float]]]] = {}  # for the learning curves
        self.logged: dict[str, set[tuple[str, int]]] = {}  # (metric, step) already in each trial's run
        self.sources: dict[str, list[str]] = {}  # PBT: "<source trial>@<epoch>><first epoch after>" per exploit
        self.current: dict[str, dict[str, Any]] = {}  # PBT: each trial's params as last logged or tagged
        self.broken: dict[str, str] = {}  # trial_id -> why its MLflow record failed
        self.errors: dict[str, str] = {}  # trial_id -> why it failed (its error, or why its record failed)

    def curves(self) -> tuple[str, ...]:
        """The metrics kept per epoch for the learning curves."""
        return ("train_loss", "val_loss", "pretrain_loss", "val_pretrain_loss", self.metric)
