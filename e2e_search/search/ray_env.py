"""Ray for a search or a confirm: connecting (or starting a local Ray), checking the cluster has what a trial
needs, and the Tune trainable of a trial with its resources (trainables/trial.py runs it)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e2e_search.spec.schema import ResourcesConfig, SearchSpace
from trainables.data.setup import DataSetup

DRIVER_CPU = 0.01
"""A trial's own process only builds the TorchTrainer and waits: give it a sliver of a CPU."""


def quiet_libraries(verbose: bool) -> None:
    """Keep the terminal to our progress lines: MLflow's DB set-up and Optuna's study notes are noise."""
    import logging

    import optuna

    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def init_ray(address: str | None, verbose: bool, drivers: bool = True) -> None:
    """Connect to ``address`` or start a local Ray on this machine's cores (``drivers``: one logical CPU more,
    for the Tune processes that only drive multi-worker TorchTrainers)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": verbose, "configure_logging": True,
                              "logging_level": "INFO" if verbose else "WARNING"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray Train's controller collects each report (and notices a finished or dead worker) every this many
        # seconds, 2 by default; a worker's next report waits for it. 0.5 s cut a trial's overhead from
        # 31.8 s to 28.1 s (bench/orchestration.py, BENCHMARKS.md section 5). Ray's processes inherit it.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # Multi-worker trials: one logical CPU more than the machine has carries the trial drivers
        # (DRIVER_CPU each, idle while their workers train), so N cores still run N one-CPU workers at once.
        ray.init(num_cpus=(os.cpu_count() or 1) + (1 if drivers else 0), dashboard_host="127.0.0.1",
                 include_dashboard=True, **kwargs)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop), handled as Ctrl-C is: the search stops resumable (exit 143)."""


_TERMINATED: list[bool] = []


def _terminate(signum, frame) -> None:
    _TERMINATED.append(True)
    raise Terminated()


def was_terminated() -> bool:
    """Whether this process got SIGTERM (the exception it raised may reach the caller re-raised as a plain
    KeyboardInterrupt by the libraries it passed through)."""
    return bool(_TERMINATED)


def stop_on_sigterm() -> None:
    """SIGTERM raises :class:`Terminated` in this (main) thread. Called again after ``ray.init``, which installs its
    own SIGTERM handler in a driver (it logs and exits, leaving the search RUNNING)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def start(cfg: SearchSpace, address: str | None, verbose: bool) -> None:
    """Tune's settings for this driver, quiet libraries, Ray connected (or started)."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune snapshots the experiment after each kept checkpoint (consistent resume); on every-epoch checkpoints
    # it warns that this happens often. It is expected here, and cheap on local storage.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ctrl-C reaches the driver as KeyboardInterrupt (exit 130, the search resumable) instead of Tune's handler,
    # whose fit() returns as if the search had ended: champions registered, the rest silently lost (issue 30,
    # kind 6). Tune's experiment state is saved as the trials report, which is what resume restores.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    quiet_libraries(verbose)
    init_ray(address, verbose, drivers=not runs_in_process(cfg.resources))
    stop_on_sigterm()


def runs_in_process(res: ResourcesConfig) -> bool:
    """True when each trial trains in its own Tune process (resources.runner, trainables/trial.py)."""
    return res.workers == 1 and res.runner == "auto"


def trial_cpus(res: ResourcesConfig) -> float:
    """CPUs one trial holds: its workers', plus the Tune process driving a TorchTrainer."""
    return res.workers * res.cpus_per_worker + (0 if runs_in_process(res) else DRIVER_CPU)


def concurrency(cfg: SearchSpace) -> int:
    """``search.max_concurrent``, else as many trials as the cluster's CPUs hold."""
    import ray

    if cfg.search.max_concurrent is not None:
        return cfg.search.max_concurrent
    return max(1, math.floor(ray.cluster_resources().get("CPU", 1) / trial_cpus(cfg.resources)))


def trial_dirname(trial) -> str:
    """Tune's ``trial_dirname_creator``: the folder name of ``trial`` (trainables/core/layout.py)."""
    from trainables.core.layout import trial_dirname as dirname

    return dirname(trial.trial_id)


def trial_setup(cfg: SearchSpace, data: DataSetup, search_dir: Path):
    """What every trial of the search shares (:class:`trainables.trial.TrialSetup`)."""
    from trainables.trial import TrialResources, TrialSetup

    res = cfg.resources
    return TrialSetup(
        family=cfg.family if isinstance(cfg.family, str) else None,  # else each trial's sampled one
        data=data.to_dict(), max_epochs=cfg.scheduler.max_epochs, metric=cfg.metrics[0], mode=cfg.modes[0],
        metrics=list(cfg.metrics), loader_workers=cfg.data.loader_workers, search_dir=str(search_dir),
        resources=TrialResources(workers=res.workers, cpus_per_worker=res.cpus_per_worker,
                                 gpus_per_worker=res.gpus_per_worker, max_failures=res.max_failures,
                                 in_process=runs_in_process(res)))


def trainable(fn: Callable, setup) -> Any:
    """``fn`` (a Tune trainable of trainables/trial.py) with ``setup`` and its resources. One worker: the trial
    trains in its own Tune process, which holds the worker's CPUs and GPU. Several: the Tune process only drives
    a TorchTrainer, whose workers hold them."""
    from ray import tune

    res = setup.resources
    return tune.with_resources(
        tune.with_parameters(fn, setup=setup),
        {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker} if res.in_process else {"cpu": DRIVER_CPU})
