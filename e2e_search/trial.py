"""Layer 2 of three: the Tune trial, a function that builds and fits a ``TorchTrainer``.

The Train run is named after the Tune trial id, so a restarted trial (retry or
``Tuner.restore``) finds its own run in storage and resumes from the latest
checkpoint. Metrics reach Tune through ``TuneReportCallback`` (rank 0's), with
``checkpoint_path`` added when a checkpoint was saved.
"""

from __future__ import annotations

import time
from typing import Any

from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from trainables.loop import worker_loop


def run_trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """``params``: this trial's sampled values; ``setup``: what every trial shares (see search.py)."""
    trial_id = tune.get_context().get_trial_id()
    res = setup["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = res["gpus_per_worker"]
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "family": setup["family"],
            "params": params,
            "data": setup["data"],
            "max_epochs": setup["max_epochs"],
            "metric": setup["metric"],
            "metrics": setup["metrics"],
            "mode": setup["mode"],
            "cpus_per_worker": res["cpus_per_worker"],
            "loader_workers": setup["loader_workers"],
            "nonfinite_flag": f"{setup['train_storage']}/trial_{trial_id}/nonfinite.txt",
            "launched_at": time.time(),  # the worker's startup_s counts from here
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res["workers"], use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=f"trial_{trial_id}",
            storage_path=setup["train_storage"],
            callbacks=[TuneReportCallback()],
            # Keeps the best checkpoint by the search metric (and always the latest, for resuming);
            # ``checkpoint_score`` is the metric signed so higher is better, lowest while pretraining.
            checkpoint_config=CheckpointConfig(
                num_to_keep=1,
                checkpoint_score_attribute="checkpoint_score",
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=res["worker_failures"]),
        ),
    )
    trainer.fit()
