"""MLflow records: one experiment per search, a parent run per search, a child run per trial.

The Tune callback here runs in the search driver (not in workers), so runs of
trials that ASHA stops or that fail are always closed with the right status.
Ray's ``MLflowLoggerCallback`` is not used because it logs with
``step=training_iteration`` (which restarts at 1 on resume) instead of the
absolute epoch, does not nest runs and uploads no Train checkpoints.

Every trial run carries:
  params        the trial's sampled and fixed parameters
  metrics       per epoch (step = epoch), ``best_<m>`` at the best epoch and ``final_<m>``
  tags          e2e.kind=trial, e2e.trial_id, e2e.family, e2e.status, e2e.error
  artifacts     best_checkpoint/ (checkpoint.pt, predictions.npz, attention.npz), plots/*.png at the best epoch
                (e2e_search/plots.py), config.yaml (family and parameters of the trial)

At the end of a search the best finished trial is registered as an MLflow model
(``<experiment>-classifier`` or ``-regressor``; a joint task gets both) with alias
``champion`` (see :func:`register_champions`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback

from .core.layout import BEST_ARTIFACT, METRICS_FILE, epoch_checkpoints
from .names import mlflow_key, param_value, tag_value, unique_keys
from .params import public_params

# Result keys that are bookkeeping, not metrics.
_SKIP = {"epoch", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "time_since_restore",
         "iterations_since_restore", "pid", "done", "num_params", "checkpoint_score"}


def checkpoint_of(trial, result: dict[str, Any]) -> str | None:
    """The folder of the checkpoint reported with ``result``: Ray Train's (``checkpoint_path``, added by
    TuneReportCallback) or, for a trial trained in its Tune process, Tune's own (``checkpoint_dir_name`` in
    the trial's folder)."""
    if result.get("checkpoint_path"):
        return str(result["checkpoint_path"])
    name = result.get("checkpoint_dir_name")
    return str(Path(trial.path) / name) if name and getattr(trial, "path", None) else None


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
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}", flag


def registry_uri(tracking: str) -> str:
    """The model registry: ``MLFLOW_REGISTRY_URI`` if set, else the tracking store (MLflow's own rule)."""
    return os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or tracking


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])


def store_uri(arg: str | None, workdir: Path, *, flag: str = "--tracking-uri") -> str:
    """The tracking URI a reading command uses (``arg`` > ``MLFLOW_TRACKING_URI`` > the work directory's store);
    a SQLite store (and a SQLite ``MLFLOW_REGISTRY_URI``) must exist: reading never creates one."""
    from .errors import UserError

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
            from .errors import UserError

            raise UserError(deleted_experiment_message(name, exp.experiment_id, client.tracking_uri),
                            key="tracking.experiment")
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_KIND)


def experiment_of(client: MlflowClient, name: str, *, key: str = "EXPERIMENT"):
    """The active experiment ``name`` for a reading command (best, report, resume): a missing or deleted one is
    a one-line error naming the fix."""
    from .errors import UserError, did_you_mean

    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
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

    from .errors import UserError

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


def _timed(hook):
    """Adds the hook's wall time to ``self.busy_s``: the driver time MLflow logging costs the search."""

    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            self.busy_s += time.perf_counter() - t0

    return wrapper


def _guarded(hook):
    """A tracking failure of one trial (MLflow refusing a name, a deleted run, an unwritable artifact store) never
    ends the search: the trial's run is closed FAILED with the reason (tag ``e2e.error``) and its further events
    are ignored. The trial is not stopped through a Tune ``stop`` condition: with Train V2 a trial stopped that
    way can keep its workers' placement group and stall the next trial (ray-project/ray#54305)."""

    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        trial = kwargs["trial"] if "trial" in kwargs else args[2]
        if trial.trial_id in self.broken:
            return None
        try:
            return hook(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever the store raised, the other trials go on
            self._tracking_failed(trial.trial_id, e)
            return None

    return wrapper


class MlflowTrials(Callback):
    """Tune callback: one nested MLflow run per trial, keyed on the trial id (reused on resume)."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str, *, search_name: str,
                 family: str, metric: str, mode: str, max_epochs: int):
        self.client = client
        self.experiment_id = experiment_id
        self.parent = parent_run_id
        self.search_name = search_name
        self.family = family
        self.metric = metric
        self.mode = mode
        self.max_epochs = max_epochs
        self.runs: dict[str, str] = {}
        self.best: dict[str, dict[str, Any]] = {}  # trial_id -> {"value", "epoch", "metrics", "checkpoint"}
        self.last: dict[str, dict[str, Any]] = {}
        self.status: dict[str, str] = {}
        self.history: dict[str, dict[str, list[tuple[int, float]]]] = {}  # for the learning curves
        self.logged: dict[str, set[tuple[str, int]]] = {}  # (metric, step) already in each trial's run
        self.broken: dict[str, str] = {}  # trial_id -> why its MLflow record failed
        self.busy_s = 0.0  # driver time spent in the hooks below

    def _tracking_failed(self, tid: str, e: Exception) -> None:
        text = " ".join(str(e).split())
        reason = f"MLflow tracking failed: {type(e).__name__}: {text}"[:5000]
        self.broken[tid] = reason
        self.status[tid] = "FAILED"
        rid = self.runs.get(tid)
        if rid:
            for close in (lambda: self.client.log_batch(rid, tags=[RunTag("e2e.status", "FAILED"),
                                                                   RunTag("e2e.error", reason)]),
                          lambda: self.client.set_terminated(rid, status="FAILED")):
                try:
                    close()
                except Exception:  # noqa: BLE001 - the store may be what failed: close what can be closed
                    pass
        print(f"trial {tid}: {reason[:300]}; its MLflow run is closed FAILED and the search goes on",
              file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ helpers
    def _run_for(self, trial) -> str:
        tid = trial.trial_id
        if tid in self.runs:
            return self.runs[tid]
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`e2e.trial_id` = '{tid}' and tags.`mlflow.parentRunId` = '{self.parent}'",
            max_results=1,
        )
        if found:
            self.runs[tid] = found[0].info.run_id
            return self.runs[tid]
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.search_name}-{tid}",
            tags={MLFLOW_PARENT_RUN_ID: self.parent, "e2e.kind": "trial", "e2e.trial_id": tid,
                  "e2e.family": tag_value(trial.config.get("family", self.family)), "e2e.search": self.search_name,
                  "e2e.status": "RUNNING"},
        )
        rid = run.info.run_id
        self.runs[tid] = rid  # from here on a failure closes this run
        params = public_params(trial.config)
        logged = unique_keys(dict(sorted(params.items())))
        self.client.log_batch(rid, params=[Param(k, param_value(v)) for k, v in logged.items()])
        self.client.log_dict(rid, {"family": params.get("family", self.family), "params": params}, "config.yaml")
        return rid

    def _close(self, trial, status: str, error: str | None = None) -> None:
        if trial.trial_id in self.status:  # closed before (a finished trial Tune restarted after a driver kill)
            return
        self._run_for(trial)
        self._close_trial(trial.trial_id, status, error)

    def _close_trial(self, tid: str, status: str, error: str | None = None) -> None:
        rid = self.runs[tid]
        now = int(time.time() * 1000)
        metrics: list[Metric] = []
        best = self.best.get(tid)
        last = self.last.get(tid, {})
        if best:
            metrics += [Metric(mlflow_key(f"best_{k}"), float(v), now, int(best["epoch"]))
                        for k, v in best["metrics"].items()]
            metrics.append(Metric("best_epoch", float(best["epoch"]), now, int(best["epoch"])))
        if last:
            epoch = int(last.get("epoch", 0))
            metrics += [Metric(mlflow_key(f"final_{k}"), float(v), now, epoch) for k, v in self._numeric(last).items()]
            metrics.append(Metric("epochs_run", float(epoch), now, epoch))
        tags = [RunTag("e2e.status", status)]
        if status == "FINISHED" and last and int(last.get("epoch", 0)) < self.max_epochs:
            tags.append(RunTag("e2e.stopped_early", "true"))
        if error:
            tags.append(RunTag("e2e.error", error[:5000]))
        if last.get("num_params") is not None:
            metrics.append(Metric("num_params", float(last["num_params"]), now, 0))
        self.client.log_batch(rid, metrics=metrics, tags=tags)
        ckpt = (best or {}).get("checkpoint")
        if ckpt and "://" not in ckpt and not Path(ckpt).is_dir():  # Ray no longer keeps it: the latest one
            self.client.set_tag(rid, "e2e.checkpoint_note", f"best epoch's checkpoint {ckpt} is gone; uploaded the latest")
            ckpt = None
        ckpt = ckpt or last.get("checkpoint_path")
        if ckpt:
            self._upload_checkpoint(rid, ckpt, self.history.get(tid))
        self.client.set_terminated(rid, status="FINISHED" if status == "FINISHED" else "FAILED")
        self.status[tid] = status

    def _upload_checkpoint(self, run_id: str, path: str, history: dict | None = None) -> None:
        import tempfile

        from ray.train import Checkpoint

        from .plots import ATTENTION_FILE, PREDICTIONS_FILE, attention_plot, learning_curves, prediction_plots

        try:
            with Checkpoint(path).as_directory() as d:
                self.client.log_artifacts(run_id, d, artifact_path=BEST_ARTIFACT)
                self.client.set_tag(run_id, "e2e.checkpoint", path)
                with tempfile.TemporaryDirectory() as tmp:
                    if history:
                        learning_curves(history, self.metric, Path(tmp) / "learning_curves.png")
                    if (Path(d) / PREDICTIONS_FILE).is_file():
                        prediction_plots(Path(d) / PREDICTIONS_FILE, Path(tmp))
                    if (Path(d) / ATTENTION_FILE).is_file():
                        attention_plot(Path(d) / ATTENTION_FILE, Path(tmp) / "attention_rollout.png")
                    self.client.log_artifacts(run_id, tmp, artifact_path="plots")
        except Exception as e:  # a missing checkpoint or a failed plot must not take the search down
            self.client.set_tag(run_id, "e2e.checkpoint_error", f"{type(e).__name__}: {e}"[:5000])

    @staticmethod
    def _numeric(result: dict[str, Any]) -> dict[str, float]:
        """The result's numbers under names MLflow accepts (see e2e_search/names.py)."""
        return unique_keys({k: float(v) for k, v in result.items()
                            if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)})

    # ------------------------------------------------------------------ Tune hooks
    @_timed
    @_guarded
    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    @_timed
    @_guarded
    def on_trial_result(self, iteration, trials, trial, result, **info):
        tid = trial.trial_id
        if tid in self.status:  # its run is closed: a finished trial Tune restarted reports its end again
            return
        rid = self._run_for(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        numeric = self._numeric(result)
        if "pretrain_loss" in result:  # the search metrics' NaN placeholders of a pretraining epoch
            numeric = {k: v for k, v in numeric.items() if not math.isnan(v)}
        # Each (metric, epoch) once: a trial resumed after its last epoch reports that epoch again.
        done = self.logged.setdefault(tid, set())
        new = {k: v for k, v in numeric.items() if (k, epoch) not in done}
        if new:
            self.client.log_batch(rid, metrics=[Metric(k, v, now, epoch) for k, v in new.items()])
            done.update((k, epoch) for k in new)
        self.last[tid] = {**result, "checkpoint_path": checkpoint_of(trial, result)}
        hist = self.history.setdefault(tid, {})
        for k in ("train_loss", "val_loss", "pretrain_loss", "val_pretrain_loss", self.metric):
            if k in new:
                hist.setdefault(k, []).append((epoch, new[k]))
        value = result.get(self.metric)
        cur = self.best.get(trial.trial_id)
        if isinstance(value, (int, float)) and is_better(float(value), cur and cur["value"], self.mode):
            self.best[trial.trial_id] = {"value": float(value), "epoch": epoch, "metrics": numeric,
                                         "checkpoint": checkpoint_of(trial, result)}

    @_timed
    @_guarded
    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "FINISHED")

    @_timed
    @_guarded
    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", error=trial_error(trial))

    # ------------------------------------------------------------------ resume
    def rehydrate(self, search_dir: str) -> dict[str, int]:
        """Take over the child runs of an interrupted search: run ids, statuses, and for trials that were
        running their metric history (so the best epoch and learning curves span the interruption).
        Returns {"finished": n, "failed": n, "interrupted": n}."""
        counts = {"finished": 0, "failed": 0, "interrupted": 0}
        runs = self.client.search_runs([self.experiment_id], max_results=5000,
                                       filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent}'")
        for r in runs:
            tid = r.data.tags.get("e2e.trial_id")
            if not tid:
                continue
            rid, m = r.info.run_id, r.data.metrics
            self.runs[tid] = rid
            st = r.data.tags.get("e2e.status")
            if st in ("FINISHED", "FAILED"):
                self.status[tid] = st
                counts["finished" if st == "FINISHED" else "failed"] += 1
                if f"best_{self.metric}" in m:
                    self.best[tid] = {"value": m[f"best_{self.metric}"], "epoch": int(m.get("best_epoch", 0)),
                                      "metrics": {k[5:]: v for k, v in m.items()
                                                  if k.startswith("best_") and k != "best_epoch"}, "checkpoint": None}
                self.last[tid] = {"epoch": int(m.get("epochs_run", 0))}
                continue
            counts["interrupted"] += 1
            series = {k: sorted((x.step, x.value) for x in self.client.get_metric_history(rid, k)) for k in m}
            kept = epoch_checkpoints(search_dir, tid)
            self._backfill(rid, kept, series)
            self.logged[tid] = {(k, e) for k, pts in series.items() for e, _ in pts}
            self.history[tid] = {k: v for k, v in series.items()
                                 if k in ("train_loss", "val_loss", "pretrain_loss", "val_pretrain_loss", self.metric)}
            scored = [(v, e) for e, v in series.get(self.metric, []) if math.isfinite(v)]
            if scored:
                value, epoch = (max if self.mode == "max" else min)(scored, key=lambda ve: (ve[0], -ve[1]))
                ckpt = kept.get(epoch)
                self.best[tid] = {"value": value, "epoch": epoch, "checkpoint": str(ckpt) if ckpt else None,
                                  "metrics": {k: v for k, pts in series.items() for e, v in pts if e == epoch}}
            last_epoch = max((e for pts in series.values() for e, _ in pts), default=0)
            self.last[tid] = {"epoch": last_epoch, **{k: pts[-1][1] for k, pts in series.items() if pts}}
        return counts

    def _backfill(self, rid: str, kept: dict[int, Path], series: dict[str, list[tuple[int, float]]]) -> None:
        """Log the epochs a killed driver reported to Ray (their checkpoints hold metrics.json) but not to MLflow."""
        logged = {e for pts in series.values() for e, _ in pts}
        now = int(time.time() * 1000)
        for epoch, folder in sorted(kept.items()):
            try:
                reported = json.loads((folder / METRICS_FILE).read_text())
            except (OSError, ValueError):
                continue
            if epoch in logged:
                continue
            numeric = {k: v for k, v in self._numeric(reported).items() if math.isfinite(v)}
            self.client.log_batch(rid, metrics=[Metric(k, v, now, epoch) for k, v in numeric.items()])
            for k, v in numeric.items():
                series.setdefault(k, []).append((epoch, v))
                series[k].sort()

    def close_leftovers(self, results) -> int:
        """After the search: close the runs still open. A trial Tune knows (``results``, a ResultGrid) gets its
        status from there; a run whose trial Tune never recorded (the driver died before its state was saved,
        and the trial ran again under a new id) is deleted, so every trial has exactly one run."""
        results = list(results)

        def result_of(tid: str):
            for res in results:
                if (res.metrics or {}).get("trial_id") == tid or (not res.metrics and tid in Path(res.path).name):
                    return res
            return None

        n = 0
        for tid, rid in list(self.runs.items()):
            if tid in self.status:
                continue
            res = result_of(tid)
            try:
                if res is None:
                    self.client.delete_run(rid)
                    del self.runs[tid]
                    continue
                if res.metrics:
                    self.last.setdefault(tid, {}).update(res.metrics)
                self._close_trial(tid, "FAILED" if res.error else "FINISHED",
                                  error=f"{type(res.error).__name__}: {res.error}" if res.error else None)
            except Exception as e:  # noqa: BLE001 - one trial's record must not keep the others open
                self._tracking_failed(tid, e)
            n += 1
        return n

    # ------------------------------------------------------------------ summary
    def best_trial(self) -> tuple[str, dict[str, Any]] | None:
        """(trial_id, best record) of the best finished trial, by the search metric."""
        winner = None
        for tid, rec in self.best.items():
            if self.status.get(tid) != "FINISHED":
                continue
            if winner is None or is_better(rec["value"], winner[1]["value"], self.mode):
                winner = (tid, rec)
        return winner


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
        try:
            client.get_registered_model(name)
        except Exception:
            client.create_registered_model(name, description=f"best {kind} of e2e-search experiment '{experiment}'")
        run = client.get_run(rid)
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/{BEST_ARTIFACT}", run_id=rid,
            tags={"e2e.search": search, "e2e.family": run.data.tags.get("e2e.family", ""), "e2e.metric": key,
                  "e2e.value": f"{value:.6g}"})
        client.set_registered_model_alias(name, "champion", version.version)
        out[name] = rid
    return out


def trial_error(trial) -> str:
    """The line naming the exception of an errored Tune trial (from its error file)."""
    text = ""
    for read in (lambda: Path(trial.error_file).read_text(), lambda: str(trial.get_error() or "")):
        try:
            text = read()
        except Exception:
            text = ""
        if text:
            break
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^([A-Za-z_]\w*\.)*[A-Z]\w*: \S", ln)]  # "pkg.mod.SomeError: why"
    if named:
        return named[-1]
    return lines[-1] if lines else "trial failed (no error recorded)"


def find_resumable(client: MlflowClient, experiment: str, search_run: str | None = None):
    """The search run to resume: ``search_run``, or the latest search of ``experiment``; it must not have finished."""
    from .errors import NothingToResume, did_you_mean

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
    if run.info.status in ("FINISHED", "KILLED"):
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
    from .config import MAXIMIZED
    from .errors import UserError, did_you_mean

    client = MlflowClient(tracking_uri=uri)
    exp = experiment_of(client, experiment)
    searches = client.search_runs([exp.experiment_id], filter_string="tags.`e2e.kind` = 'search'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    if metric is None:
        if not searches:
            raise UserError(f"experiment '{experiment}' holds no e2e-search run; give --metric", key="--metric")
        metric = searches[0].data.tags.get("e2e.metric")
        mode = mode or searches[0].data.tags.get("e2e.mode")
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

    from .errors import UserError
    from .names import EXPERIMENT_NAME_MAX, FILE_NAME_MAX, MODEL_NAME_MAX, RUN_NAME_MAX

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

    from .errors import UserError

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


def check_store(uri: str, key: str, experiment: str) -> None:
    """Before Ray starts: the tracking store (and ``MLFLOW_REGISTRY_URI``'s) is reachable with a current schema,
    and ``experiment`` is active or can be created. Writes nothing."""
    from .errors import UserError

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
    if states[uri] != "ready":
        return  # a new store: every experiment name is free
    try:
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read the MLflow store {uri} ({_first_line(e)}); set {key} to another store",
                        key=key) from None
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise UserError(deleted_experiment_message(experiment, exp.experiment_id, uri), key="tracking.experiment")
