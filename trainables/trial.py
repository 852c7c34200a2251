"""The Tune trial: runs the training core (trainables/core) one of two ways.

- ``resources.workers: 1``: in the Tune trial's own process (:class:`TuneSession`). Tune reserves its CPUs
  and GPU, keeps its checkpoints (``tune.report(..., checkpoint=...)``; the best by the search metric and
  the latest), restarts a failed trial from the latest one (``FailureConfig``) and reuses the process for
  the next trial (``reuse_actors``): torch, timm and the data are loaded once per process, not per trial.
- ``resources.workers > 1``: a Ray Train ``TorchTrainer`` (DDP, one :class:`TrainSession` per rank), named
  after the Tune trial so a restarted trial finds its own run and resumes from its latest checkpoint.
  Metrics reach Tune through ``TuneReportCallback`` (rank 0's), with ``checkpoint_path`` added.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import tune

from trainables.core import layout
from trainables.core.contract import TrialConfig
from trainables.core.loop import train_trial
from trainables.core.session import OneProcess, as_folder
from trainables.params import trial_family


class TrialResources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(ge=1)
    cpus_per_worker: float = Field(gt=0)
    gpus_per_worker: float = Field(ge=0)
    max_failures: int = Field(ge=0)
    in_process: bool = True
    """Train in the Tune trial's own process (one worker) instead of through a TorchTrainer."""


class TrialSetup(BaseModel):
    """What every trial of a search shares (built by e2e_search/search/run.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str | None
    """None: each trial's sampled ``family`` parameter."""
    data: dict[str, Any]
    max_epochs: int
    metric: str
    mode: str
    metrics: list[str]
    loader_workers: int
    search_dir: str
    """The search's Tune experiment directory (layout: trainables/core/layout.py)."""
    resources: TrialResources

    def trial_config(self, params: dict[str, Any], trial_id: str) -> TrialConfig:
        return TrialConfig(family=trial_family(self.family, params), params=params, data=self.data,
                           max_epochs=self.max_epochs, metric=self.metric,
                           mode=cast(Literal["min", "max"], self.mode),  # TrialConfig validates it
                           metrics=self.metrics,
                           cpus=self.resources.cpus_per_worker, loader_workers=self.loader_workers,
                           nonfinite_flag=str(layout.nonfinite_flag(self.search_dir, trial_id)),
                           launched_at=time.time(), trial_id=trial_id)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: ``params`` are this trial's sampled values."""
    from trainables.params import present

    trial_id = tune.get_context().get_trial_id()
    _run(setup.trial_config(present(params), trial_id), setup, trial_id)


def run_confirm_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable of ``e2e-search confirm`` (e2e_search/confirm/run.py): ``config["job"]`` holds a finalist's
    ``params`` (its seed set) and ``epochs``, the epoch it was best at: trained up to it on the search's schedule,
    then scored once on the test split."""
    trial_id = tune.get_context().get_trial_id()
    job = config["job"]
    cfg = setup.trial_config(job["params"], trial_id).model_copy(
        update={"stop_epoch": int(job["epochs"]), "score_split": "test"})
    _run(cfg, setup, trial_id)


REUSE_TIMEOUT_VAR, REUSE_TIMEOUT_S = "TUNE_FUNCTION_THREAD_TIMEOUT_S", "120"
"""How long a reused Tune process waits for the previous trial's thread to end before it runs the next trial.
Ray's default, 2 s, failed the *next* trial ("Could not re-use actor ...") when a trial's thread took longer
to end after its last report (its model freed, ``gc.collect``): seen on 2 loaded cores. Ray reads it in this
process when it resets it for the next trial, so it is set here, however Ray was started; a value the user
set is kept."""


def wait_for_slow_trial_ends() -> None:
    """In a Tune trial's process: let the next trial reuse this process even when this one's thread takes
    more than Ray's 2 s to end (``REUSE_TIMEOUT_VAR``)."""
    os.environ.setdefault(REUSE_TIMEOUT_VAR, REUSE_TIMEOUT_S)


def _run(cfg: TrialConfig, setup: TrialSetup, trial_id: str) -> None:
    wait_for_slow_trial_ends()
    if setup.resources.in_process:
        _in_this_process(cfg)
    else:
        _torch_trainer(cfg, setup, trial_id)


# --------------------------------------------------------------------------- one worker: this process
class TuneSession(OneProcess):
    """The core inside the Tune trial's process: Tune's GPU (CUDA_VISIBLE_DEVICES set by Ray) or the CPU."""

    def __init__(self, use_gpu: bool):
        self.device = torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")

    def latest_checkpoint(self):
        return as_folder(tune.get_checkpoint())

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None)


def _in_this_process(cfg: TrialConfig) -> None:
    use_gpu = bool(tune.get_context().get_trial_resources().required_resources.get("GPU", 0))
    try:
        train_trial(cfg, TuneSession(use_gpu))
    finally:  # the process runs the next trial: give back what this one held
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- several workers: Ray Train
class TrainSession:
    """One rank of a Ray Train ``TorchTrainer``."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module, *, find_unused: bool) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": True} if find_unused else None)

    def prepare_loader(self, loader):
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader)  # DistributedSampler + device

    def latest_checkpoint(self):
        import ray.train

        return as_folder(ray.train.get_checkpoint())

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        import ray.train

        if checkpoint is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
                             checkpoint_dir_name=layout.epoch_dirname(int(metrics["epoch"])))


def train_worker(config: dict[str, Any]) -> None:
    """The loop function of the TorchTrainer: ``config`` is a TrialConfig's fields."""
    train_trial(TrialConfig(**config), TrainSession())


def _torch_trainer(cfg: TrialConfig, setup: TrialSetup, trial_id: str) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = setup.resources
    use_gpu = res.gpus_per_worker > 0
    per_worker = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    TorchTrainer(
        train_worker,
        train_loop_config=cfg.model_dump(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=layout.trial_dirname(trial_id),
            storage_path=str(layout.train_storage(setup.search_dir)),
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]  # a Train V2 RunConfig at runtime
            # Keeps the best checkpoint by the search metric (and always the latest, for resuming);
            # ``checkpoint_score`` is the metric signed so higher is better, lowest while pretraining.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="checkpoint_score",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=res.max_failures),
        ),
    ).fit()
