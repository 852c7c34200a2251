"""Layer 3 of three: the ``Tuner`` (Ray Tune + Optuna + ASHA) and the search's MLflow parent run.

``plan()`` checks everything that can be checked without starting Ray (config,
data file, GPUs) and writes nothing; ``execute()`` starts Ray and runs the search.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables.workdir import DEFAULT_WORKDIR
from e2e_search.spec.schema import SearchSpace
from e2e_search.spec.loader import dump
from trainables.data.setup import DataSetup
from e2e_search.data.inspect import inspect
from trainables.errors import NothingToResume, UserError
from e2e_search.data.formats import materialize
from e2e_search.spec.shapes import check_shapes

# A trial's own process only builds the TorchTrainer and waits: give it a sliver of a CPU.
DRIVER_CPU = 0.01


@dataclass
class Plan:
    cfg: SearchSpace
    data: DataSetup
    workdir: Path
    storage: Path
    tracking_uri: str
    artifact_root: str
    needs_generation: bool = False
    warm: Any = None
    """The earlier trials ``search.warm_start`` queues (e2e_search/search/warm_start.py), read in plan()."""


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(cfg: SearchSpace, *, address: str | None = None, generate: bool = True) -> Plan:
    """Validate data and resources; generate the data first if the YAML names a recipe."""
    from e2e_search.record.store import tracking_uri

    workdir = DEFAULT_WORKDIR
    needs_gen = cfg.data.generate is not None and not Path(cfg.data.path).exists()
    if needs_gen:  # the recipe's values, memory and disk, before anything else reads its shape
        check_generation(cfg.data.path, cfg.data.generate, address=address)
    # A file data.generate will write: the models must fit the shape it will have, before anything is simulated.
    check_shapes(cfg, None)
    if cfg.resources.gpus_per_worker > 0 and address is None and _local_gpus() == 0:
        raise UserError(
            f"asks for {cfg.resources.gpus_per_worker:g} GPU per worker but this machine has no GPU; "
            "set resources.gpus_per_worker: 0 (--set resources.gpus_per_worker=0) or use --address of a GPU cluster",
            key="resources.gpus_per_worker",
        )
    check_tracking(cfg, workdir)
    warm = _warm_start(cfg, workdir)
    if needs_gen and generate:
        generate_data(cfg.data.path, cfg.data.generate, address=address, drivers=not runs_in_process(cfg.resources))
    # Parquet/ROOT: converted once to an HDF5 cache (not in a dry run: then None, and nothing is written).
    source = None if (needs_gen and not generate) else materialize(cfg, generate=generate)
    data = inspect(source) if source is not None else None
    if data is not None:  # every family's model fits the data's shape for every parameter value
        check_shapes(cfg, data)
    storage = Path(cfg.tracking.storage) if cfg.tracking.storage else workdir / "ray_results"
    artifacts = Path(cfg.tracking.artifacts) if cfg.tracking.artifacts else workdir / "mlartifacts"
    return Plan(cfg=cfg, data=data, workdir=workdir, storage=storage.resolve(),
                tracking_uri=tracking_uri(cfg.tracking.uri, workdir), artifact_root=artifacts.resolve().as_uri(),
                needs_generation=needs_gen, warm=warm)


def _warm_start(cfg: SearchSpace, workdir: Path):
    """``search.warm_start``'s earlier trials, read from this search's tracking store (reads only); what the
    mapping onto the new space changed becomes a note, said once."""
    if cfg.search.warm_start is None:
        return None
    from e2e_search.record.store import resolve_uri
    from e2e_search.search.warm_start import load

    warm = load(cfg, resolve_uri(cfg.tracking.uri, workdir, flag="tracking.uri")[0])
    if warm.note:
        cfg.note("search.warm_start", warm.note)
    return warm


def check_tracking(cfg: SearchSpace, workdir: Path) -> None:
    """The MLflow store (``tracking.uri`` > ``MLFLOW_TRACKING_URI`` > the work directory's) is usable and every
    name the search derives is one MLflow and the file system accept; reads only (see tracking.check_store)."""
    from e2e_search.record.store import check_names, check_store, resolve_uri

    check_names(cfg.name, cfg.tracking.experiment, cfg.task.type)
    uri, key = resolve_uri(cfg.tracking.uri, workdir, flag="tracking.uri")
    check_store(uri, key, cfg.tracking.experiment)


def _gen_spec(path: str, g):
    from e2e_search.data.physics.generate import GenSpec

    return GenSpec(process=g.recipe, n=g.n, out=path, seed=g.seed, workers=g.workers, channels=list(g.channels),
                   image_size=g.image_size, mass_range=tuple(g.mass_range), decay=g.decay, per_mass=g.per_mass)


def check_generation(path: str, g, *, address: str | None = None) -> None:
    """The ``data.generate`` recipe's values and the memory and disk its file needs, before anything runs
    (errors name ``data.generate.<key>``)."""
    if g.recipe == "toy_jets":
        from e2e_search.data.toy import check_toy

        check_toy(Path(path), n=g.n, image_size=g.image_size, channels=g.channels, seed=g.seed)
        return
    from e2e_search.data.physics.generate import YAML_KEYS, check_spec

    check_spec(_gen_spec(path, g), keys=YAML_KEYS, local=address is None)


def generate_data(path: str, g, *, address: str | None = None, drivers: bool = True) -> None:
    """Write ``path`` from the YAML's ``data.generate`` recipe (atomically; cached for later runs)."""
    check_generation(path, g, address=address)
    print(f"data file {path} not found: generating it with recipe '{g.recipe}' (cached for later runs)",
          file=sys.stderr)
    if g.recipe == "toy_jets":
        from e2e_search.data.toy import generate_toy_jets

        generate_toy_jets(path, n=g.n, image_size=g.image_size, channels=g.channels, seed=g.seed)
        return
    from e2e_search.data.physics.generate import YAML_KEYS, generate

    _init_ray(address, verbose=False, drivers=drivers)  # the search reuses this Ray
    generate(_gen_spec(path, g), address=address, keys=YAML_KEYS)


def describe(p: Plan) -> str:
    c = p.cfg
    lines = [
        f"search '{c.name}': family {c.family_label}, task {c.task.type}, {c.search.algorithm} x {c.search.num_samples} trials, "
        f"metric {c.search.metric} ({c.search.mode}), scheduler {c.scheduler.type} up to {c.scheduler.max_epochs} epochs",
        f"data: {p.data.summary()}" if p.data else f"data: {c.data.path} will be generated ({c.data.generate.n} samples)"
        if p.needs_generation else f"data: {c.data.path} checked without converting it; run converts it once to an HDF5 cache",
        f"resources: {c.resources.workers} worker(s) x {c.resources.cpus_per_worker:g} CPU"
        + (f" + {c.resources.gpus_per_worker:g} GPU" if c.resources.gpus_per_worker else "") + " per trial",
        f"tracking: {p.tracking_uri} (experiment '{c.tracking.experiment}'), storage {p.storage}",
    ]
    if p.warm is not None:
        lines.append(f"warm start: the {len(p.warm.points)} best trials of experiment '{p.warm.experiment}' first"
                     + (" (and as prior observations)" if c.search.algorithm in ("tpe", "gp") else ""))
    return "\n".join(lines)


def _searcher(cfg: SearchSpace, warm=None):
    """Ray's OptunaSearch for ``cfg`` (e2e_search/search/algorithms.py), with ``warm``'s earlier trials first."""
    from e2e_search.search.algorithms import searcher

    return searcher(cfg, warm)


def _quiet_libraries(verbose: bool) -> None:
    """Keep the terminal to our progress lines: MLflow's DB set-up and Optuna's study notes are noise."""
    import logging

    import optuna

    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _init_ray(address: str | None, verbose: bool, drivers: bool = True) -> None:
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
        ray.init(num_cpus=(os.cpu_count() or 1) + (1 if drivers else 0), dashboard_host="127.0.0.1", include_dashboard=True, **kwargs)


def runs_in_process(res) -> bool:
    """True when each trial trains in its own Tune process (resources.runner, trainables/trial.py)."""
    return res.workers == 1 and res.runner == "auto"


def trial_cpus(res) -> float:
    """CPUs one trial holds: its workers', plus the Tune process driving a TorchTrainer."""
    return res.workers * res.cpus_per_worker + (0 if runs_in_process(res) else DRIVER_CPU)


def _trial_dirname(trial) -> str:
    from trainables.core.layout import trial_dirname

    return trial_dirname(trial.trial_id)


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

    from e2e_search.spec.loader import validate
    from e2e_search.record.store import find_resumable

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
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from e2e_search.search.progress import Progress
    from e2e_search.search.algorithms import initial_population, pbt_param_space
    from e2e_search.spec.search_checks import pbt_dims
    from e2e_search.search.algorithms import scheduler as make_scheduler
    from e2e_search.record.store import get_experiment_id, start_parent_run
    from e2e_search.record.trials import MlflowTrials
    from trainables.trial import TrialResources, TrialSetup, run_trial

    cfg = p.cfg
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune snapshots the experiment after each kept checkpoint (consistent resume); on every-epoch checkpoints
    # it warns that this happens often. It is expected here, and cheap on local storage.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    _quiet_libraries(verbose)
    _init_ray(address, verbose, drivers=not runs_in_process(cfg.resources))
    if cfg.resources.gpus_per_worker > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        raise UserError(
            f"asks for GPUs but the Ray cluster at {address or 'local'} has none; set resources.gpus_per_worker: 0",
            key="resources.gpus_per_worker",
        )
    need = trial_cpus(cfg.resources)
    have = ray.cluster_resources().get("CPU", 0)
    if address is None and need > have:  # a cluster may autoscale; a local Ray never grows
        raise UserError(
            f"a trial needs {cfg.resources.workers} worker(s) x {cfg.resources.cpus_per_worker:g} CPU but this machine "
            f"gives Ray {have:g}; lower resources.cpus_per_worker or resources.workers "
            f"(--set resources.cpus_per_worker=1)", key="resources.cpus_per_worker")
    if p.data is not None and p.data.cache == "sparse":  # once per dataset, before any trial: Ray tasks over blocks
        from e2e_search.data.ingest import ingest_for_search

        ingest_for_search(p.data, use_ray=True)
    p.workdir.mkdir(parents=True, exist_ok=True)
    p.storage.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=p.tracking_uri)
    exp_id = get_experiment_id(client, cfg.tracking.experiment, p.artifact_root)
    metric, mode = cfg.metrics[0], cfg.modes[0]
    if resume is None:
        from e2e_search.data.fileid import TAG, data_hash

        run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # RUN_STAMP in tracking.check_names
        warm_tags = {} if p.warm is None else {  # where the search started from
            "e2e.warm_start": p.warm.experiment, "e2e.warm_start_runs": ",".join(p.warm.run_ids)}
        parent = start_parent_run(
            client, exp_id, name=run_name, resolved_yaml=dump(cfg),
            tags={"e2e.family": cfg.family_label, "e2e.task": cfg.task.type, "e2e.metric": metric, "e2e.mode": mode,
                  "e2e.tune_path": str(p.storage / run_name),
                  TAG: data_hash(cfg.data.path) or "",  # the data file's identity: confirm checks it
                  **warm_tags},
            params={"family": cfg.family_label, "task": cfg.task.type, "algorithm": cfg.search.algorithm,
                    "num_samples": cfg.search.num_samples, "scheduler": cfg.scheduler.type,
                    "max_epochs": cfg.scheduler.max_epochs, "workers": cfg.resources.workers,
                    "data_path": cfg.data.path, "train_size": len(p.data.train), "val_size": len(p.data.val),
                    **({"warm_start": p.warm.experiment} if p.warm is not None else {})},
        )
    else:
        run_name, parent = resume.run_name, resume.parent_run_id
        client.update_run(parent, status="RUNNING")
        client.set_tag(parent, "e2e.resumed", str(resume.times))
    print(f"MLflow: experiment '{cfg.tracking.experiment}', search run {parent} ({p.tracking_uri})", flush=True)

    status = "FAILED"
    trials_cb = MlflowTrials(client, exp_id, parent, search_name=run_name, family=cfg.family_label, metric=metric,
                             mode=mode, max_epochs=cfg.scheduler.max_epochs,
                             mutable=tuple(pbt_dims(cfg)) if cfg.scheduler.type == "pbt" else ())
    end: dict[str, Any] = {}
    try:
        if resume is not None:
            seen = trials_cb.rehydrate(str(p.storage / run_name))
            print(f"resuming search {run_name}: {seen['finished']} trials finished, {seen['failed']} failed, "
                  f"{seen['interrupted']} interrupted (they continue from their latest checkpoint)", flush=True)
        res = cfg.resources
        search_dir = p.storage / run_name
        setup = TrialSetup(
            family=cfg.family if isinstance(cfg.family, str) else None,  # else each trial's sampled one
            data=p.data.to_dict(), max_epochs=cfg.scheduler.max_epochs, metric=metric, mode=mode,
            metrics=list(cfg.metrics), loader_workers=cfg.data.loader_workers, search_dir=str(search_dir),
            resources=TrialResources(workers=res.workers, cpus_per_worker=res.cpus_per_worker,
                                     gpus_per_worker=res.gpus_per_worker, max_failures=res.max_failures,
                                     in_process=runs_in_process(res)))
        in_process = setup.resources.in_process
        concurrent = cfg.search.max_concurrent
        if concurrent is None:
            cpus = ray.cluster_resources().get("CPU", 1)
            concurrent = max(1, math.floor(cpus / trial_cpus(res)))
        scheduler = make_scheduler(cfg, metric, mode)
        # One worker: the trial trains in its own Tune process, which holds the worker's CPUs and GPU.
        # Several: the Tune process only drives a TorchTrainer, whose workers hold them.
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, setup=setup),
            {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker} if in_process else {"cpu": DRIVER_CPU})
        callbacks = [trials_cb, Progress(metric=metric, mode=mode, num_samples=cfg.search.num_samples,
                                         max_epochs=cfg.scheduler.max_epochs)]
        if resume is None:
            pbt = cfg.scheduler.type == "pbt"
            # Ray refuses a searcher with PBT: the sampler's initial population, one grid point per member.
            space = pbt_param_space(initial_population(cfg, p.warm)) if pbt else None
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(search_alg=None if pbt else _searcher(cfg, p.warm), scheduler=scheduler,
                                            num_samples=1 if pbt else cfg.search.num_samples,
                                            max_concurrent_trials=concurrent,
                                            reuse_actors=in_process, trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=run_name, storage_path=str(p.storage), verbose=0, callbacks=callbacks,
                    # PBT would exploit a trial on its last report and train that epoch again: stop it there
                    stop={"epoch": cfg.scheduler.max_epochs} if pbt else None,
                    # One-worker trials: Tune keeps their checkpoints and retries them from the latest;
                    # a TorchTrainer retries its own workers (resources.max_failures there). PBT keeps every
                    # checkpoint: a donor's latest must outlive its next report until the receiver loaded it.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None if pbt else 1,
                                                            checkpoint_score_attribute="checkpoint_score",
                                                            checkpoint_score_order="max"),
                    failure_config=tune.FailureConfig(max_failures=res.max_failures if in_process else 0)),
            )
            print(f"search started: {cfg.search.num_samples} trials, up to {concurrent} at a time", flush=True)
        else:
            # Searcher, scheduler and trials come back from the experiment directory; errored trials stay failed.
            tuner = tune.Tuner.restore(resume.tune_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False)
            # The callbacks pickled with the old Tuner hold the dead driver's state: use this process's.
            tuner._local_tuner.get_run_config().callbacks = callbacks
        grid = tuner.fit()
        trials_cb.close_leftovers(grid)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as e:
        end["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        end.update(_finish(client, parent, trials_cb, cfg, run_name, status, end.get("error")))
    winner = end["winner"]
    early = sum(1 for tid, s in trials_cb.status.items()
                if s == "FINISHED" and int(trials_cb.last.get(tid, {}).get("epoch", 0)) < cfg.scheduler.max_epochs)
    return Outcome(cfg.tracking.experiment, parent, p.tracking_uri, end["best_rid"], winner[1] if winner else None,
                   dict(trials_cb.status), early, error=end.get("end_error"))


def _finish(client, parent: str, trials_cb, cfg: SearchSpace, run_name: str, status: str,
            error: str | None) -> dict[str, Any]:
    """Record the end of a search on its parent run: best trial, champions, counts; the run is always closed
    (FAILED, with tag ``e2e.error``, when any of this fails: it never stays RUNNING).
    Returns {"winner", "best_rid", "end_error"}."""
    from mlflow.entities import RunTag

    from trainables.names import mlflow_key, tag_value
    from e2e_search.record.store import register_champions

    metric, mode = cfg.metrics[0], cfg.modes[0]
    try:
        trials_cb.drain()  # every trial's run closed, its best checkpoint uploaded (champions point at it)
    except Exception:  # noqa: BLE001 - a run that cannot be closed is recorded FAILED by the closing thread
        pass
    winner = trials_cb.best_trial()
    best_rid = trials_cb.runs.get(winner[0]) if winner else None
    end_error = None
    try:
        if winner:
            tid, rec = winner
            for k, v in rec["metrics"].items():
                client.log_metric(parent, mlflow_key(f"best_{k}"), v, step=rec["epoch"])
            client.set_tag(parent, "e2e.best_run_id", best_rid or "")
            client.set_tag(parent, "e2e.best_trial_id", tid)
        if status == "FINISHED":
            finished = [(trials_cb.runs[tid], rec["metrics"]) for tid, rec in trials_cb.best.items()
                        if trials_cb.status.get(tid) == "FINISHED" and tid in trials_cb.runs]
            for name, rid in register_champions(client, cfg.tracking.experiment, cfg.task.type, finished,
                                                search=run_name, metric=metric, mode=mode).items():
                print(f"registered model '{name}' (alias champion) from run {rid}", flush=True)
                client.set_tag(parent, mlflow_key(f"e2e.champion.{name}"), rid)
        client.log_metric(parent, "tracking_s", trials_cb.busy_s)  # driver time in MLflow logging
        n_failed = sum(1 for s in trials_cb.status.values() if s == "FAILED")
        client.set_tag(parent, "e2e.trials_failed", str(n_failed))
    except Exception as e:  # noqa: BLE001 - the trials are recorded; the parent run must still be closed
        end_error = " ".join(f"{type(e).__name__}: {e}".split())[:2000]
        status = "FAILED"
    finally:
        if error or end_error:
            try:
                client.log_batch(parent, tags=[RunTag("e2e.error", tag_value(end_error or error))])
            except Exception:  # noqa: BLE001
                pass
        try:
            client.set_terminated(parent, status=status)
        except Exception as e:  # noqa: BLE001 - the store itself is gone
            end_error = end_error or " ".join(f"{type(e).__name__}: {e}".split())[:2000]
    return {"winner": winner, "best_rid": best_rid, "end_error": end_error}
