"""``e2e-search confirm EXPERIMENT``: the best trials of a finished search, retrained with several seeds and
scored once on the held-out test split; the champions move to the best test mean.

The validation split chose each trial's epoch and the finalists, so their validation figures are biased
upward. Here:

1. ``prepare`` (e2e_search/confirm/plan.py; no Ray, nothing written; bad input is one ``UserError`` line,
   exit 2): the search run (the latest finished one, or ``--search``), its resolved YAML, its data file
   unchanged since the search (tag ``e2e.data_hash``, e2e_search/data/fileid.py), a test split, and the
   finalists: the ``top`` best finished trials by the search metric (``per_family``: the ``top`` best of each
   family; a joint task adds the ``top`` best by ``val_mae`` for the regressor), each with its parameters and
   the epoch it was best at.
2. :func:`train` (Ray Tune, the search's resources): one trial per finalist and seed (seeds 1..N, the
   training parameter ``seed``: model initialization, data order and augmentation), trained up to that epoch
   on the search's learning-rate schedule, then scored once on the test split (core/scoring.py).
3. e2e_search/confirm/record.py: the bootstrap intervals and pairwise probabilities
   (e2e_search/analysis/bootstrap.py), the MLflow record, the champions (``confirm_plan.choose_champion``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from e2e_search.confirm.plan import ConfirmFailed, ConfirmOutcome, ConfirmPlan, SeedResult, describe, prepare
from e2e_search.search import ray_env
from trainables.errors import UserError

if TYPE_CHECKING:
    from ray.tune import Result

__all__ = ["prepare", "train", "confirm", "run_cli", "ConfirmFailed"]


# --------------------------------------------------------------------------- Ray: the retraining trials
def _check_cluster(cfg, address: str | None) -> None:
    import ray

    res = cfg.resources
    if res.gpus_per_worker > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        raise UserError(f"the search asks for GPUs but the Ray cluster at {address or 'local'} has none; "
                        "run confirm where the search ran (--address)", key="resources.gpus_per_worker")
    need, have = ray_env.trial_cpus(res), ray.cluster_resources().get("CPU", 0)
    if address is None and need > have:
        raise UserError(f"a trial of the search needs {need:g} CPUs but this machine gives Ray {have:g}; run confirm "
                        "where the search ran (--address)", key="resources.cpus_per_worker")


def _error_line(err: BaseException) -> str:
    import re

    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^([A-Za-z_]\w*\.)*[A-Z]\w*: \S", ln)]
    return (named[-1] if named else lines[-1] if lines else type(err).__name__)[:2000]


def train(cp: ConfirmPlan, *, address: str | None = None, verbose: bool = False, name: str) -> list[SeedResult]:
    """One Ray Tune trial per finalist and seed on the search's resources; their last reports and checkpoints."""
    from ray import tune

    from e2e_search.search.progress import ConfirmProgress
    from trainables.trial import run_confirm_trial

    cfg = cp.cfg
    ray_env.start(cfg, address, verbose)
    _check_cluster(cfg, address)
    storage = cp.plan.storage
    storage.mkdir(parents=True, exist_ok=True)
    setup = ray_env.trial_setup(cfg, cp.plan.data, storage / name)
    jobs: list[dict[str, Any]]
    jobs = [{"finalist": i, "seed": s, "epochs": f.epochs, "params": {**f.params, "seed": s}}
            for i, f in enumerate(cp.finalists) for s in cp.seeds]
    concurrent = min(ray_env.concurrency(cfg), len(jobs))
    in_process = setup.resources.in_process
    labels = {(j["finalist"], j["seed"]): f"{cp.finalists[j['finalist']].label} seed {j['seed']}" for j in jobs}
    tuner = tune.Tuner(
        ray_env.trainable(run_confirm_trial, setup), param_space={"job": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrent,
                                    reuse_actors=in_process, trial_dirname_creator=ray_env.trial_dirname),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), verbose=0,
            callbacks=[ConfirmProgress(labels=labels, total=len(jobs), metrics=[r.test_metric for r in cp.rankings])],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the latest: the scored epoch
            failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures if in_process else 0)))
    print(f"confirm started: {len(jobs)} trials, up to {concurrent} at a time", flush=True)
    grid = tuner.fit()
    out = []
    for r in cast("Iterable[Result]", grid):  # a ResultGrid iterates through __getitem__
        assert r.config is not None  # Tune gives every trial's result its config
        job = r.config["job"]
        metrics = dict(r.metrics or {})
        ckpt = metrics.get("checkpoint_path") or (r.checkpoint.path if r.checkpoint is not None else None)
        done = r.error is None and any(k.startswith("test_") for k in metrics)
        error = None if done else (_error_line(r.error) if r.error is not None else "no test score was reported")
        out.append(SeedResult(job["finalist"], int(job["seed"]), "FINISHED" if done else "FAILED", metrics,
                              str(ckpt) if ckpt else None, error))
    out.sort(key=lambda s: (s.finalist, s.seed))
    return out


def confirm(cp: ConfirmPlan, *, address: str | None = None, verbose: bool = False) -> ConfirmOutcome:
    """Train, score and record (see the module's text). Raises ConfirmFailed when no retraining finished."""
    from e2e_search.confirm.record import record

    name = f"{cp.search_name}-confirm-{time.strftime('%Y%m%d-%H%M%S')}"
    results = train(cp, address=address, verbose=verbose, name=name)
    return record(cp, results, confirm_id=name)


def run_cli(uri: str, experiment: str, *, search: str | None = None, top: int | None = None,
            seeds: int | None = None, per_family: bool | None = None, address: str | None = None,
            verbose: bool = False) -> int:
    """``e2e-search confirm`` (and ``run`` with ``search.confirm``): 0 when champions were chosen, 1 when no
    retraining finished. UserError (exit 2) before anything is written."""
    cp = prepare(uri, experiment, search=search, top=top, seeds=seeds, per_family=per_family, address=address)
    for note in cp.notes:
        print(note, file=sys.stderr, flush=True)
    print(describe(cp), flush=True)
    try:
        out = confirm(cp, address=address, verbose=verbose)
    except ConfirmFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out.summary, flush=True)
    return 0
