"""The search: ``plan()`` then ``execute()``, a ``Tuner`` (Ray Tune + Optuna + a scheduler) recorded in MLflow.

``plan()`` checks everything that can be checked without starting Ray (config,
data file, GPUs) and writes nothing; ``execute()`` starts Ray and runs the search.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_search.data.formats import materialize
from e2e_search.data.inspect import inspect
from e2e_search.record import live_callbacks as live
from e2e_search.search import ray_env
from e2e_search.search.ray_env import init_ray, runs_in_process
from e2e_search.spec.schema import SearchSpace
from e2e_search.spec.shapes import check_shapes
from trainables.data.setup import DataSetup
from trainables.errors import NothingToResume, UserError
from trainables.workdir import DEFAULT_WORKDIR


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

    init_ray(address, verbose=False, drivers=drivers)  # the search reuses this Ray
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

    cfg = p.cfg
    _start_ray(p, address, verbose)
    p.workdir.mkdir(parents=True, exist_ok=True)
    p.storage.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=p.tracking_uri)
    exp_id = get_experiment_id(client, cfg.tracking.experiment, p.artifact_root)
    run_name, parent = _open_search_run(p, client, exp_id, resume)
    print(f"MLflow: experiment '{cfg.tracking.experiment}', search run {parent} ({p.tracking_uri})", flush=True)
    status, end = "FAILED", {}
    trials_cb = _trial_recorder(p, client, exp_id, parent, run_name)
    try:
        tuner = _tuner(p, run_name, trials_cb, resume)
        trials_cb.close_leftovers(tuner.fit())
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as e:
        end["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        end.update(finish_search_run(client, parent, trials_cb, cfg, run_name, status, end.get("error")))
    winner = end["winner"]
    early = sum(1 for tid, s in trials_cb.status.items()
                if s == "FINISHED" and int(trials_cb.last.get(tid, {}).get("epoch", 0)) < cfg.scheduler.max_epochs)
    return Outcome(cfg.tracking.experiment, parent, p.tracking_uri, end["best_rid"], winner[1] if winner else None,
                   dict(trials_cb.status), early, error=end.get("end_error"))


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
                       tune_config=_tune_config(p, concurrent, setup.resources.in_process),
                       run_config=_run_config(p, run_name, callbacks, setup.resources.in_process))
    print(f"search started: {cfg.search.num_samples} trials, up to {concurrent} at a time", flush=True)
    return tuner


def _pbt_population(p: Plan) -> dict[str, Any] | None:
    """PBT: the sampler's initial population, one grid point per member (Ray refuses a searcher with PBT)."""
    from e2e_search.search.algorithms import initial_population, pbt_param_space

    return pbt_param_space(initial_population(p.cfg, p.warm)) if p.cfg.scheduler.type == "pbt" else None


def _tune_config(p: Plan, concurrent: int, in_process: bool):
    from ray import tune

    from e2e_search.search.algorithms import scheduler, searcher

    cfg = p.cfg
    pbt = cfg.scheduler.type == "pbt"
    return tune.TuneConfig(search_alg=None if pbt else searcher(cfg, p.warm),
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
