"""MLflow records: one experiment per search, a parent run per search, a child run per trial.

Here: the store (URIs, checks before Ray starts), experiments, the parent run, champions and the ranking
of finished trials; none of it imports Ray. The record of each trial while a search runs is the Tune
callback in e2e_search/record/trials.py.

Every trial run carries:
  params        the trial's sampled and fixed parameters
  metrics       per epoch (step = epoch), ``best_<m>`` at the best epoch and ``final_<m>``
  tags          e2e.kind=trial, e2e.trial_id, e2e.family, e2e.status, e2e.error
  artifacts     best_checkpoint/ (checkpoint.pt, predictions.npz, attention.npz), plots/*.png at the best epoch
                (e2e_search/record/figures.py), config.yaml (family and parameters of the trial)

At the end of a search the best finished trial is registered as an MLflow model
(``<experiment>-classifier`` or ``-regressor``; a joint task gets both) with alias
``champion`` (see :func:`register_champions`).
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from trainables.core.layout import BEST_ARTIFACT
from trainables.names import mlflow_key, param_value, tag_value, unique_keys


def tracking_uri(uri: str | None, workdir: Path) -> str:
    """MLflow's convention: ``uri`` (--tracking-uri or the YAML's tracking.uri), else ``MLFLOW_TRACKING_URI``,
    else the work directory's SQLite store."""
    return resolve_uri(uri, workdir)[0]


def resolve_uri(uri: str | None, workdir: Path, flag: str = "--tracking-uri") -> tuple[str, str]:
    """(tracking URI, the flag, key or variable it came from) -- see :func:`tracking_uri`."""
    if uri:
        return uri, flag
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env, "MLFLOW_TRACKING_URI"
    return sqlite_uri(workdir / "mlflow.db"), flag


def sqlite_uri(path: Path) -> str:
    """The ``sqlite:///`` URI of file ``path``, quoted: MLflow (SQLAlchemy) decodes %-escapes in the path, so a folder
    named ``pct%41`` or holding ``#`` or spaces must be written escaped to be read back as itself (issue 30, kind 8)."""
    from urllib.parse import quote

    return "sqlite:///" + quote(str(Path(path).resolve()), safe="/")


def registry_uri(tracking: str) -> str:
    """The model registry: ``MLFLOW_REGISTRY_URI`` if set, else the tracking store (MLflow's own rule)."""
    return os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or tracking


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    from urllib.parse import unquote

    return Path(unquote(uri.removeprefix("sqlite:///").split("?", 1)[0]))


def store_uri(arg: str | None, workdir: Path, *, flag: str = "--tracking-uri") -> str:
    """The tracking URI a reading command uses (``arg`` > ``MLFLOW_TRACKING_URI`` > the work directory's store),
    checked as a search checks its store (:func:`store_states`); a SQLite store (and a SQLite
    ``MLFLOW_REGISTRY_URI``) must exist: reading never creates one."""
    from trainables.errors import UserError

    uri, key = resolve_uri(arg, workdir, flag)
    fix = ("unset MLFLOW_TRACKING_URI or set it to the store of your searches" if key == "MLFLOW_TRACKING_URI"
           else f"run a search first or give {flag} (or set MLFLOW_TRACKING_URI)")
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise UserError(f"no MLflow store at {uri}; {fix}", key=key)
    reg = registry_uri(uri)
    path = sqlite_path(reg)
    if reg != uri and path is not None and not path.is_file():
        raise UserError(f"no MLflow model registry at {reg}; set MLFLOW_REGISTRY_URI to an existing store or unset it",
                        key="MLFLOW_REGISTRY_URI")
    store_states(uri, key)  # reachable, an MLflow store, its current schema: the same lines as `run`'s check
    return uri


# The MLflow 3 UI opens an experiment on its GenAI (traces) view unless told it holds model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def deleted_experiment_message(name: str, exp_id: str, uri: str) -> str:
    return (f"experiment '{name}' was deleted (MLflow UI or `mlflow experiments delete`) and its name is still taken "
            f"in {uri}; restore it with `MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {exp_id}` "
            "or set tracking.experiment to another name")


def get_experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":  # checked in plan(); deleted since then
            from trainables.errors import UserError

            raise UserError(deleted_experiment_message(name, exp.experiment_id, client.tracking_uri),
                            key="tracking.experiment")
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_KIND)


def experiment_of(client: MlflowClient, name: str, *, key: str = "EXPERIMENT"):
    """The active experiment ``name`` for a reading command (best, report, resume): a missing or deleted one is
    a one-line error naming the fix."""
    from trainables.errors import UserError, did_you_mean

    exp = client.get_experiment_by_name(name)
    if exp is None:
        # MLflow's own empty "Default" experiment is not a search to offer
        names = [e.name for e in client.search_experiments()
                 if not (e.experiment_id == "0" and not client.search_runs(["0"], max_results=1))]
        raise UserError(f"no experiment '{name}' in {client.tracking_uri}{did_you_mean(name, names)}; "
                        "give the name of a search (tracking.experiment, default its name)", key=key)
    if exp.lifecycle_stage == "deleted":
        raise UserError(deleted_experiment_message(name, exp.experiment_id, client.tracking_uri)
                        .replace("or set tracking.experiment to another name", "first"), key=key)
    return exp


def search_run_of(client: MlflowClient, exp, run_id: str, *, key: str = "--search"):
    """The e2e-search parent run ``run_id`` of experiment ``exp``; a trial's run, another experiment's run or an
    unknown id is a one-line error (nothing is written)."""
    from mlflow.exceptions import MlflowException

    from trainables.errors import UserError

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run {run_id} in experiment '{exp.name}'; give a search run id "
                        "(e2e-search best EXPERIMENT shows the trials, the MLflow UI the searches) or leave out "
                        f"{key} for the latest search", key=key) from None
    kind = run.data.tags.get("e2e.kind")
    if run.info.experiment_id != exp.experiment_id:
        raise UserError(f"run {run_id} belongs to another experiment (id {run.info.experiment_id}), not '{exp.name}'; "
                        f"give a search run of '{exp.name}' or leave out {key}", key=key)
    if kind != "search":
        what = "a trial's run" if kind == "trial" else "not an e2e-search search run"
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        hint = f" (its search run is {parent})" if kind == "trial" and parent else ""
        raise UserError(f"run {run_id} is {what}{hint}; give the search's parent run id or leave out {key} "
                        "for the latest search", key=key)
    return run


def is_better(value: float, best: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


MODEL_KINDS = {"classification": ["classifier"], "regression": ["regressor"], "joint": ["classifier", "regressor"]}


def champion_names(experiment: str, task: str) -> list[str]:
    """The registered model names a search of ``experiment`` writes its champions to."""
    return [f"{experiment}-{kind}" for kind in MODEL_KINDS[task]]


def register_champions(client: MlflowClient, experiment: str, task: str, candidates: list[tuple[str, dict]],
                       *, search: str, metric: str, mode: str) -> dict[str, str]:
    """Register the best finished trial as ``<experiment>-classifier`` / ``-regressor`` with alias ``champion``.

    ``candidates``: (run id, that run's best metrics) of the finished trials. The classifier is ranked
    by the search metric; a joint task's regressor by ``val_mae``. Returns {model name: run id}.
    """
    kinds = {"classification": [("classifier", metric, mode)], "regression": [("regressor", metric, mode)],
             "joint": [("classifier", metric, mode), ("regressor", "val_mae", "min")]}[task]
    out = {}
    for kind, key, order in kinds:
        scored = [(m[key], rid) for rid, m in candidates if isinstance(m.get(key), float) and math.isfinite(m[key])]
        if not scored:
            continue
        # The first of equal values: the same trial the search names best (MlflowTrials.best_trial).
        value, rid = (max if order == "max" else min)(scored, key=lambda vr: vr[0])
        name = champion_names(experiment, "regression" if kind == "regressor" else "classification")[0]
        run = client.get_run(rid)
        set_champion(client, name, run, {"e2e.search": search, "e2e.family": run.data.tags.get("e2e.family", ""),
                                         "e2e.metric": key, "e2e.value": f"{value:.6g}"},
                     description=f"best {kind} of e2e-search experiment '{experiment}'")
        out[name] = rid
    return out


def set_champion(client: MlflowClient, name: str, run, tags: dict[str, str], *, description: str) -> str:
    """A new version of registered model ``name`` from ``run``: its MLflow Model (e2e_search/record/champion_model.py,
    logged now if the run has none), with ``tags``, and the alias ``champion`` moved to it (the model is created
    first if needed). Returns the version."""
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not registered yet: create it (a store error recurs there)
        client.create_registered_model(name, description=description)
    source, tags = _model_source(client, run, tags)
    version = client.create_model_version(name, source=source, run_id=run.info.run_id,
                                         tags={k: tag_value(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, "champion", version.version)
    return str(version.version)


def _model_source(client: MlflowClient, run, tags: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(source, tags) of a champion version: the run's MLflow Model; its raw ``best_checkpoint/`` folder, tagged
    ``e2e.model_error``, when the model cannot be written (export, report and confirm read either)."""
    from e2e_search.record.champion_model import log_champion_model

    try:
        return log_champion_model(client, run), tags
    except Exception as e:  # noqa: BLE001 - a champion without its MLflow Model is still a champion
        why = " ".join(f"{type(e).__name__}: {e}".split())[:2000]
        return f"{run.info.artifact_uri}/{BEST_ARTIFACT}", {**tags, "e2e.model_error": why}


def find_resumable(client: MlflowClient, experiment: str, search_run: str | None = None):
    """The search run to resume: ``search_run``, or the latest search of ``experiment``; it must not have finished."""
    from trainables.errors import NothingToResume, did_you_mean

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise NothingToResume(f"no experiment '{experiment}'{did_you_mean(experiment, names)}; give the experiment "
                              "of an interrupted search (tracking.experiment, default the search's name)",
                              key="EXPERIMENT")
    exp = experiment_of(client, experiment)  # a deleted one: restore it first
    if search_run:
        run = search_run_of(client, exp, search_run)
    else:
        found = client.search_runs([exp.experiment_id], filter_string="tags.`e2e.kind` = 'search'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            raise NothingToResume(f"experiment '{experiment}' holds no e2e-search run", key="EXPERIMENT")
        run = found[0]
    if run.info.status == "FINISHED" or (run.info.status == "KILLED" and "e2e.interrupted" not in run.data.tags):
        raise NothingToResume(f"search {run.data.tags.get(MLFLOW_RUN_NAME, run.info.run_id)} of '{experiment}' "
                              f"{'finished' if run.info.status == 'FINISHED' else 'was killed before Ray saved it'}; "
                              "nothing to resume (start a new search with e2e-search run)", key="EXPERIMENT")
    return run


def start_parent_run(client: MlflowClient, experiment_id: str, *, name: str, resolved_yaml: str,
                     tags: dict[str, str], params: dict[str, Any]) -> str:
    run = client.create_run(experiment_id, run_name=name,
                            tags={"e2e.kind": "search", MLFLOW_RUN_NAME: name,
                                  **{mlflow_key(k): tag_value(v) for k, v in tags.items()}})
    rid = run.info.run_id
    try:
        client.log_text(rid, resolved_yaml, "search_space.yaml")
        client.log_batch(rid, params=[Param(k, param_value(v)) for k, v in unique_keys(params).items()])
    except Exception as e:  # never leave the search's run RUNNING
        client.log_batch(rid, tags=[RunTag("e2e.error", tag_value(f"{type(e).__name__}: {e}"))])
        client.set_terminated(rid, status="FAILED")
        raise
    return rid


def top_trials(uri: str, experiment: str, *, metric: str | None = None, mode: str | None = None,
               top: int = 5) -> tuple[str, str, list[Any]]:
    """Finished trial runs of ``experiment`` ranked by ``best_<metric>`` -> (metric, mode, runs).

    Reads MLflow only; metric and mode default to those of the latest search.
    """
    from e2e_search.spec.schema import MAXIMIZED
    from trainables.errors import UserError, did_you_mean

    client = MlflowClient(tracking_uri=uri)
    exp = experiment_of(client, experiment)
    searches = client.search_runs([exp.experiment_id], filter_string="tags.`e2e.kind` = 'search'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    if metric is None:
        if not searches:
            raise UserError(f"experiment '{experiment}' holds no e2e-search run; give --metric", key="--metric")
        metric = searches[0].data.tags.get("e2e.metric")
        mode = mode or searches[0].data.tags.get("e2e.mode")
    assert metric is not None  # a search run is tagged with its metric when it opens (record/search_run.py)
    mode = mode or ("max" if metric in MAXIMIZED else "min")
    runs = client.search_runs([exp.experiment_id],
                              filter_string="tags.`e2e.kind` = 'trial' and attributes.status = 'FINISHED'",
                              max_results=5000)
    key = f"best_{metric}"
    scored = [r for r in runs if key in r.data.metrics and math.isfinite(r.data.metrics[key])]
    if runs and not scored:
        known = sorted({k.removeprefix("best_") for r in runs for k in r.data.metrics if k.startswith("best_")})
        raise UserError(f"no trial has metric '{metric}'{did_you_mean(metric, known)}", key="--metric")
    scored.sort(key=lambda r: r.data.metrics[key], reverse=(mode == "max"))
    return metric, mode, scored[:top]


# ---------------------------------------------------------------------- before Ray starts: store and names
TRIAL_ID_MAX = 16  # Tune trial ids: 8 hex digits, or "<8 hex>_<5 digits>"
RUN_STAMP = "-YYYYmmdd-HHMMSS"


def check_names(name: str, experiment: str, task: str) -> None:
    """Every name a search derives from its ``name`` and ``tracking.experiment`` (experiment, registered models,
    parent and trial run names, its Ray results folder) is one MLflow and the file system accept."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    from trainables.errors import UserError
    from trainables.names import EXPERIMENT_NAME_MAX, FILE_NAME_MAX, MODEL_NAME_MAX, RUN_NAME_MAX

    if not experiment.strip():
        raise UserError("is empty; set tracking.experiment to a name (or remove it: the search's name is used)",
                        key="tracking.experiment")
    if len(experiment) > EXPERIMENT_NAME_MAX:
        raise UserError(f"is {len(experiment)} characters long; MLflow keeps {EXPERIMENT_NAME_MAX}: "
                        "set tracking.experiment to a shorter name", key="tracking.experiment")
    for model in champion_names(experiment, task):
        why = None
        try:
            _validate_model_name(model)
        except MlflowException as e:
            why = " ".join(e.message.split())
        if why is None and len(model) > MODEL_NAME_MAX:
            why = f"{len(model)} characters, more than the {MODEL_NAME_MAX} MLflow keeps"
        if why:
            raise UserError(f"'{experiment}' names the registered model '{model}', which MLflow refuses ({why}); "
                            "set tracking.experiment to a name without '/' and ':' (e.g. "
                            f"'{re.sub(r'[/:]+', '_', experiment).strip('.') or 'my-search'}')",
                            key="tracking.experiment")
    longest = len(name) + len(RUN_STAMP) + 1 + TRIAL_ID_MAX  # <name>-<stamp>-<trial id>: a trial's run name
    room = min(RUN_NAME_MAX, FILE_NAME_MAX) - len(RUN_STAMP) - 1 - TRIAL_ID_MAX
    if longest > RUN_NAME_MAX or len((name + RUN_STAMP).encode()) > FILE_NAME_MAX:
        raise UserError(f"is {len(name)} characters long: its run names (<name>{RUN_STAMP}-<trial id>) and Ray "
                        f"results folder would pass the {RUN_NAME_MAX} characters MLflow keeps; set name to at "
                        f"most {room} characters", key="name")


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(e).__name__)


def _sql_state(uri: str, key: str) -> str:
    """'new' (MLflow will create the store's tables) or 'ready' (current schema); anything else is a UserError.
    Reads only: a SQLite file is opened read-only, a missing one is not created."""
    import sqlalchemy
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version

    from trainables.errors import UserError

    fix = f"set {key} to another store" if key != "MLFLOW_REGISTRY_URI" else "set MLFLOW_REGISTRY_URI to another store"
    path = sqlite_path(uri)
    if path is not None:
        if path.is_dir():
            raise UserError(f"MLflow store {uri} is a folder, not a SQLite file; {fix}", key=key)
        if not path.exists():
            ancestor = path.parent
            while not ancestor.exists() and ancestor != ancestor.parent:
                ancestor = ancestor.parent
            if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
                raise UserError(f"cannot create the MLflow store {uri}: {ancestor} is not a writable folder; {fix}",
                                key=key)
            return "new"
    engine = None
    try:
        if path is not None:  # read-only: checking must not create or change the file
            import sqlite3
            from urllib.parse import quote

            ro = f"file:{quote(str(path.resolve()))}?mode=ro"
            engine = sqlalchemy.create_engine("sqlite://", creator=lambda: sqlite3.connect(ro, uri=True))
        else:
            engine = sqlalchemy.create_engine(uri)
        tables = set(sqlalchemy.inspect(engine).get_table_names())
        for _ in range(20):  # another process may be creating the store right now: let it finish its tables
            if not (tables & _MLFLOW_TABLES) or {"experiments", "alembic_version"} <= tables:
                break
            time.sleep(0.25)
            tables = set(sqlalchemy.inspect(engine).get_table_names())
        if not tables:
            return "new"
        if "experiments" not in tables or "alembic_version" not in tables:
            raise UserError(f"{uri} is a database without MLflow's tables (not an MLflow store); {fix}", key=key)
        found, head = _get_schema_version(engine), _get_latest_schema_revision()
        still, waited = 0.0, 0.0
        while found != head and still < 3.0 and waited < 60.0:  # another process may be migrating it right now
            time.sleep(0.25)
            waited += 0.25
            now = _get_schema_version(engine)
            still = 0.0 if now != found else still + 0.25
            found = now
        if found != head:
            raise UserError(f"MLflow store {uri} has an older schema ({found}; this MLflow needs {head}); back it up "
                            f"and run `mlflow db upgrade {uri}`, or {fix}", key=key)
        return "ready"
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - not a database, no driver, server down, no permission
        raise UserError(f"cannot read the MLflow store {uri} ({_first_line(e)}); {fix}", key=key) from None
    finally:
        if engine is not None:
            engine.dispose()


# Tables of MLflow's SQL store: some but not all of them means the store is being created by another process.
_MLFLOW_TABLES = {"experiments", "alembic_version", "runs", "metrics", "latest_metrics", "params", "tags",
                  "experiment_tags", "registered_models", "model_versions"}


def store_states(uri: str, key: str) -> dict[str, str]:
    """The tracking store ``uri`` and its registry (``MLFLOW_REGISTRY_URI``): reachable, with MLflow's current
    schema -> {uri: "new" | "ready"}. Reads only. Raises UserError naming ``key`` (or MLFLOW_REGISTRY_URI)."""
    from trainables.errors import UserError

    reg = registry_uri(uri)
    states = {}
    for u, k in ((uri, key), (reg, "MLFLOW_REGISTRY_URI")):
        if u in states:
            continue
        scheme = u.split(":", 1)[0].split("+", 1)[0].lower() if "://" in u else ""
        if scheme in ("sqlite", "postgresql", "mysql", "mssql"):
            states[u] = _sql_state(u, k)
        elif scheme in ("http", "https"):
            saved = {v: os.environ.get(v) for v in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
            os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
            try:
                MlflowClient(tracking_uri=u).search_experiments(max_results=1)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"cannot reach the MLflow server {u} ({_first_line(e)}); start it "
                                f"(mlflow server ...) or set {k} to another store", key=k) from None
            finally:
                for v, old in saved.items():
                    if old is None:
                        os.environ.pop(v, None)
                    else:
                        os.environ[v] = old
            states[u] = "ready"
        else:  # a file store or another scheme: MLflow itself says whether it takes it
            local = Path(u.removeprefix("file://")) if scheme in ("", "file") else None
            if local is not None and not local.exists():
                states[u] = "new"
                continue
            try:
                MlflowClient(tracking_uri=u).search_experiments(max_results=1)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"cannot use the MLflow store {u} ({_first_line(e)}); set {k} to another store "
                                "(e.g. sqlite:///e2e_runs/mlflow.db)", key=k) from None
            states[u] = "ready"
    return states


def check_store(uri: str, key: str, experiment: str) -> None:
    """Before Ray starts: the tracking store (and ``MLFLOW_REGISTRY_URI``'s) is reachable with a current schema,
    and ``experiment`` is active or can be created. Writes nothing."""
    from trainables.errors import UserError

    states = store_states(uri, key)
    if states[uri] != "ready":
        return  # a new store: every experiment name is free
    try:
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read the MLflow store {uri} ({_first_line(e)}); set {key} to another store",
                        key=key) from None
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise UserError(deleted_experiment_message(experiment, exp.experiment_id, uri), key="tracking.experiment")
