"""Where a search keeps its files: every directory and file name of a search, in one place.

    <storage>/<search run name>/          Ray Tune's experiment directory (``Tuner.restore`` reads it)
        trial_<trial id>/                  one Tune trial: its results, and when it runs in the Tune trial's
            checkpoint_<n>/                own process (``resources.workers: 1``) its checkpoints
            nonfinite.txt                  why its loss went NaN/Inf: a retry stops at once
        train/trial_<trial id>/            the Ray Train run of a multi-worker trial (DDP)
            epoch_<nnnn>/                  its checkpoints
    every checkpoint folder:
        checkpoint.pt                      TrialCheckpoint (trainables/core/checkpoint.py)
        metrics.json                       the epoch's reported metrics (a resumed search logs from them)
        predictions.npz, attention.npz     validation predictions and attention maps (e2e_search/record/figures.py): an image
                                           rollout (trainables/attention/rollout.py) or, for event_transformer, the task
                                           queries' attention over the objects (trainables/attention/tasks.py)
        test_predictions.npz               ``e2e-search confirm`` only: the test split's predictions (core/scoring.py)

MLflow: a trial's run holds its best epoch's checkpoint folder as the artifact ``best_checkpoint/`` and its
plots under ``plots/`` (learning_curves.png, roc.png, ..., attention_rollout.png or task_attention.png).
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.npz"
ATTENTION_FILE = "attention.npz"
TEST_PREDICTIONS_FILE = "test_predictions.npz"
NONFINITE_FILE = "nonfinite.txt"
TRAIN_DIR = "train"
BEST_ARTIFACT = "best_checkpoint"
BEST_CHECKPOINT_ARTIFACT = f"{BEST_ARTIFACT}/{CHECKPOINT_FILE}"
BEST_ATTENTION_ARTIFACT = f"{BEST_ARTIFACT}/{ATTENTION_FILE}"
PLOTS_ARTIFACT = "plots"
ROLLOUT_PLOT = "attention_rollout.png"
TASK_ATTENTION_PLOT = "task_attention.png"


def trial_dirname(trial_id: str) -> str:
    """The folder of trial ``trial_id`` (Tune's trial folder, and the name of its Ray Train run)."""
    return f"trial_{trial_id}"


def trial_dir(search_dir: str | Path, trial_id: str) -> Path:
    return Path(search_dir) / trial_dirname(trial_id)


def train_storage(search_dir: str | Path) -> Path:
    """Ray Train's ``storage_path`` for the search's multi-worker trials."""
    return Path(search_dir) / TRAIN_DIR


def epoch_dirname(epoch: int) -> str:
    """A Ray Train checkpoint's folder name (``checkpoint_dir_name``)."""
    return f"epoch_{epoch:04d}"


def nonfinite_flag(search_dir: str | Path, trial_id: str) -> Path:
    return trial_dir(search_dir, trial_id) / NONFINITE_FILE


def epoch_checkpoints(search_dir: str | Path, trial_id: str) -> dict[int, Path]:
    """epoch -> checkpoint folder of trial ``trial_id``, whichever way it ran (the epoch read from each
    folder's metrics.json; unreadable folders are left out)."""
    found: dict[int, Path] = {}
    for base, pattern in ((trial_dir(search_dir, trial_id), "checkpoint_*"),
                          (train_storage(search_dir) / trial_dirname(trial_id), "epoch_*")):
        for d in sorted(base.glob(pattern)):
            try:
                found[int(json.loads((d / METRICS_FILE).read_text())["epoch"])] = d
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return found
