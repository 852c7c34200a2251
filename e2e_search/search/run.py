"""The search: ``execute()`` runs a checked plan (e2e_search/search/plan.py) as a ``Tuner`` (Ray Tune + Optuna + a
scheduler) recorded in MLflow, or resumes an interrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_search.record import live_callbacks as live
from e2e_search.search import ray_env
from e2e_search.search.plan import Plan, plan
from e2e_search.spec.schema import SearchSpace
from trainables.errors import NothingToResume, UserError


@dataclass
class Resume:
    """An interrupted search to continue: its MLflow parent run and Ray Tune experiment directory."""

    parent_run_id: str
    run_name: str
    tune_path: str
    times: int = 1
    """How many times this search has been resumed, this time included."""


def resumable(uri: str, experiment: str, search_run: str | None = None, *, address: str | None = None,
              generate: bool = True) -> tuple[Plan, Resume]:
    """The plan of an interrupted search, rebuilt from the resolved YAML its MLflow run holds."""
    import tempfile

    import yaml
    from mlflow.tracking import MlflowClient
    from ray.tune import Tuner

    from e2e_search.record.store import find_resumable
    from e2e_search.spec.loader import validate

    client = MlflowClient(tracking_uri=uri)
    run = find_resumable(client, experiment, search_run)
    rid, tags = run.info.run_id, run.data.tags
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(rid, "search_space.yaml", tmp)).read_text()
    cfg = validate(yaml.safe_load(text), source=f"search_space.yaml of search run {rid}")
    cfg.tracking.uri = uri
    tune_path = tags.get("e2e.tune_path", "")
    if not tune_path or not Tuner.can_restore(tune_path):  # killed before Ray saved anything: it never can be
        client.set_terminated(rid, status="KILLED")
        raise NothingToResume(f"search run {rid} stopped before Ray saved its state ({tune_path or 'no path'}); "
                              "marked KILLED: start a new search with e2e-search run", key="EXPERIMENT")
    p = plan(cfg, address=address, generate=generate)
    p.storage = Path(tune_path).parent
    return p, Resume(rid, tags.get("mlflow.runName", Path(tune_path).name), tune_path,
                     int(tags.get("e2e.resumed", "0")) + 1)


@dataclass
class Outcome:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    best_run_id: str | None
    best: dict[str, Any] | None
    trials: dict[str, str]
    stopped_early: int = 0
    error: str | None = None
    """Why recording the end of the search in MLflow failed (the parent run is then closed FAILED)."""






def execute(p: Plan, *, address: str | None = None, verbose: bool = False, resume: Resume | None = None) -> Outcome:
    """Run the search of ``p``, or continue the interrupted one ``resume`` names (``Tuner.restore``: finished
    trials kept, running ones restarted from their latest checkpoint, the searcher's state restored; the
    trials' MLflow runs are taken over, not duplicated)."""
    from mlflow.tracking import MlflowClient

    from e2e_search.record.search_run import finish_search_run
    from e2e_search.record.store import get_experiment_id
    from e2e_search.search.disk import DiskFull, full_disk_line, is_disk_full, quiet_store_full
    from trainables.errors import STORE_FULL

    cfg = p.cfg
    assert cfg.tracking.experiment is not None  # SearchSpace's validator defaults it to the search's name
    _start_ray(p, address, verbose)
    quiet_store_full()
    p.workdir.mkdir(parents=True, exist_ok=True)
    p.storage.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=p.tracking_uri)
    exp_id = get_experiment_id(client, cfg.tracking.experiment, p.artifact_root)
    run_name, parent = _open_search_run(p, client, exp_id, resume)
    print(f"MLflow: experiment '{cfg.tracking.experiment}', search run {parent} ({p.tracking_uri})", flush=True)
    end: dict[str, Any]
    status, end = "FAILED", {}
    trials_cb = _trial_recorder(p, client, exp_id, parent, run_name)
    try:
        tuner = _tuner(p, run_name, trials_cb, resume)
        trials_cb.close_leftovers(tuner.fit())
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        end["interrupted"] = "SIGTERM" if ray_env.was_terminated() else "SIGINT (Ctrl-C)"
        trials_cb.interrupt()
        raise
    except BaseException as e:
        end["error"] = f"{type(e).__name__}: {e}"
        full = [m for m in trials_cb.errors.values() if is_disk_full(m)]
        if is_disk_full(e) or full:  # Ray itself fails reading what the full disk truncated: say the cause
            store = p.tracking_uri if STORE_FULL in end["error"] or any(STORE_FULL in m for m in full) else None
            raise DiskFull(full_disk_line(full or [end["error"]], _places(p), store)) from None
        raise
    finally:
        end.update(finish_search_run(client, parent, trials_cb, cfg, run_name, status, end.get("error"),
                                     end.get("interrupted")))
    winner = end["winner"]
    early = sum(1 for tid, s in trials_cb.status.items()
                if s == "FINISHED" and int(trials_cb.last.get(tid, {}).get("epoch", 0)) < cfg.scheduler.max_epochs)
    full = [e for tid, e in trials_cb.errors.items() if trials_cb.status.get(tid) == "FAILED" and is_disk_full(e)]
    if full:
        raise DiskFull(full_disk_line(full, _places(p), p.tracking_uri if any(STORE_FULL in m for m in full) else None))
    return Outcome(cfg.tracking.experiment, parent, p.tracking_uri, end["best_rid"], winner[1] if winner else None,
                   dict(trials_cb.status), early, error=end.get("end_error"))


def _places(p: Plan) -> dict[str, str]:
    """Where a search writes (for a full disk's message)."""
    return {"tracking.storage": str(p.storage), "tracking.uri": p.tracking_uri}


def _start_ray(p: Plan, address: str | None, verbose: bool) -> None:
    """Ray started or connected and checked to hold a trial; the sparse cache built (once per dataset)."""
    ray_env.start(p.cfg, address, verbose)
    check_cluster(p.cfg, address)
    if p.data is not None and p.data.cache == "sparse":  # once per dataset, before any trial: Ray tasks over blocks
        from e2e_search.data.ingest import ingest_for_search

        ingest_for_search(p.data, use_ray=True)


def check_cluster(cfg: SearchSpace, address: str | None) -> None:
    """Raise a UserError when the Ray cluster has no GPU for a GPU search, or (a local Ray, which never grows)
    fewer CPUs than one trial needs."""
    import ray

    if cfg.resources.gpus_per_worker > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        raise UserError(
            f"asks for GPUs but the Ray cluster at {address or 'local'} has none; set resources.gpus_per_worker: 0",
            key="resources.gpus_per_worker",
        )
    need = ray_env.trial_cpus(cfg.resources)
    have = ray.cluster_resources().get("CPU", 0)
    if address is None and need > have:  # a cluster may autoscale; a local Ray never grows
        raise UserError(
            f"a trial needs {cfg.resources.workers} worker(s) x {cfg.resources.cpus_per_worker:g} CPU but this machine "
            f"gives Ray {have:g}; lower resources.cpus_per_worker or resources.workers "
            f"(--set resources.cpus_per_worker=1)", key="resources.cpus_per_worker")


def _open_search_run(p: Plan, client, exp_id: str, resume: Resume | None) -> tuple[str, str]:
    """(run name, parent run id): a new parent run, or the interrupted search's, re-opened."""
    from e2e_search.record.search_run import reopen_search_run, start_search_run

    if resume is None:
        assert p.data is not None  # None only in a dry run's plan, which runs nothing
        return start_search_run(client, exp_id, p.cfg, p.data, p.storage, p.warm)
    reopen_search_run(client, resume.parent_run_id, resume.times)
    return resume.run_name, resume.parent_run_id


def _trial_recorder(p: Plan, client, exp_id: str, parent: str, run_name: str):
    """The Tune callback that records every trial in MLflow (e2e_search/record/trials.py)."""
    from e2e_search.record.trials import MlflowTrials
    from e2e_search.spec.search_checks import pbt_dims

    cfg = p.cfg
    return MlflowTrials(client, exp_id, parent, search_name=run_name, family=cfg.family_label, metric=cfg.metrics[0],
                        mode=cfg.modes[0], max_epochs=cfg.scheduler.max_epochs,
                        mutable=tuple(pbt_dims(cfg)) if cfg.scheduler.type == "pbt" else ())


def _tuner(p: Plan, run_name: str, trials_cb, resume: Resume | None):
    """The Tuner of a new search, or the interrupted one restored (searcher, scheduler and trials come back from
    its experiment directory; errored trials stay failed; the recorder takes over the trials' MLflow runs)."""
    from ray import tune

    from e2e_search.search.progress import Progress
    from trainables.trial import run_trial

    cfg = p.cfg
    assert p.data is not None  # None only in a dry run's plan, which runs nothing
    setup = ray_env.trial_setup(cfg, p.data, p.storage / run_name)
    trainable = ray_env.trainable(run_trial, setup)
    callbacks = [trials_cb, Progress(metric=cfg.metrics[0], mode=cfg.modes[0], num_samples=cfg.search.num_samples,
                                     max_epochs=cfg.scheduler.max_epochs)]
    if resume is not None:
        seen = trials_cb.rehydrate(str(p.storage / run_name))
        print(f"resuming search {run_name}: {seen['finished']} trials finished, {seen['failed']} failed, "
              f"{seen['interrupted']} interrupted (they continue from their latest checkpoint)", flush=True)
        # The callbacks pickled with the old Tuner stand for this driver's (e2e_search/search/live.py).
        live.register(callbacks)
        return tune.Tuner.restore(resume.tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    live.register(callbacks)
    concurrent = ray_env.concurrency(cfg)
    tuner = tune.Tuner(trainable, param_space=_pbt_population(p),
                       tune_config=_tune_config(p, concurrent, setup.resources.in_process, run_name),
                       run_config=_run_config(p, run_name, callbacks, setup.resources.in_process))
    print(f"search started: {cfg.search.num_samples} trials, up to {concurrent} at a time", flush=True)
    return tuner


def _pbt_population(p: Plan) -> dict[str, Any] | None:
    """PBT: the sampler's initial population, one grid point per member (Ray refuses a searcher with PBT)."""
    from e2e_search.search.algorithms import initial_population, pbt_param_space

    return pbt_param_space(initial_population(p.cfg, p.warm)) if p.cfg.scheduler.type == "pbt" else None


def _tune_config(p: Plan, concurrent: int, in_process: bool, run_name: str):
    from ray import tune

    from e2e_search.search.algorithms import scheduler, searcher

    cfg = p.cfg
    pbt = cfg.scheduler.type == "pbt"
    return tune.TuneConfig(search_alg=None if pbt else searcher(cfg, p.warm, study_name=run_name),
                           scheduler=scheduler(cfg, cfg.metrics[0], cfg.modes[0]),
                           num_samples=1 if pbt else cfg.search.num_samples, max_concurrent_trials=concurrent,
                           reuse_actors=in_process, trial_dirname_creator=ray_env.trial_dirname)


def _run_config(p: Plan, run_name: str, callbacks: list, in_process: bool):
    from ray import tune

    cfg = p.cfg
    pbt = cfg.scheduler.type == "pbt"
    return tune.RunConfig(
        name=run_name, storage_path=str(p.storage), verbose=0, callbacks=callbacks,
        # PBT would exploit a trial on its last report and train that epoch again: stop it there
        stop={"epoch": cfg.scheduler.max_epochs} if pbt else None,
        # One-worker trials: Tune keeps their checkpoints and retries them from the latest; a TorchTrainer
        # retries its own workers (resources.max_failures there). PBT keeps every checkpoint: a donor's latest
        # must outlive its next report until the receiver loaded it.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None if pbt else 1,
                                                checkpoint_score_attribute="checkpoint_score",
                                                checkpoint_score_order="max"),
        failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures if in_process else 0))
