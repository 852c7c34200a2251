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
import re
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback

from .params import public_params

# Result keys that are bookkeeping, not metrics.
_SKIP = {"epoch", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "time_since_restore",
         "iterations_since_restore", "pid", "done", "num_params", "checkpoint_score"}


def tracking_uri(uri: str | None, workdir: Path) -> str:
    if uri:
        return uri
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


# The MLflow 3 UI opens an experiment on its GenAI (traces) view unless told it holds model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def get_experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_KIND)


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
        self.busy_s = 0.0  # driver time spent in the hooks below

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
                  "e2e.family": trial.config.get("family", self.family), "e2e.search": self.search_name, "e2e.status": "RUNNING"},
        )
        rid = run.info.run_id
        params = public_params(trial.config)
        self.client.log_batch(rid, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
        self.client.log_dict(rid, {"family": params.get("family", self.family), "params": params}, "config.yaml")
        self.runs[tid] = rid
        return rid

    def _close(self, trial, status: str, error: str | None = None) -> None:
        self._run_for(trial)
        self._close_trial(trial.trial_id, status, error)

    def _close_trial(self, tid: str, status: str, error: str | None = None) -> None:
        rid = self.runs[tid]
        now = int(time.time() * 1000)
        metrics: list[Metric] = []
        best = self.best.get(tid)
        last = self.last.get(tid, {})
        if best:
            metrics += [Metric(f"best_{k}", float(v), now, int(best["epoch"])) for k, v in best["metrics"].items()]
            metrics.append(Metric("best_epoch", float(best["epoch"]), now, int(best["epoch"])))
        if last:
            epoch = int(last.get("epoch", 0))
            metrics += [Metric(f"final_{k}", float(v), now, epoch) for k, v in self._numeric(last).items()]
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
                self.client.log_artifacts(run_id, d, artifact_path="best_checkpoint")
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
        return {k: float(v) for k, v in result.items()
                if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)}

    # ------------------------------------------------------------------ Tune hooks
    @_timed
    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    @_timed
    def on_trial_result(self, iteration, trials, trial, result, **info):
        rid = self._run_for(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        numeric = self._numeric(result)
        if "pretrain_loss" in result:  # the search metrics' NaN placeholders of a pretraining epoch
            numeric = {k: v for k, v in numeric.items() if not math.isnan(v)}
        self.client.log_batch(rid, metrics=[Metric(k, v, now, epoch) for k, v in numeric.items()])
        self.last[trial.trial_id] = dict(result)
        hist = self.history.setdefault(trial.trial_id, {})
        for k in ("train_loss", "val_loss", "pretrain_loss", "val_pretrain_loss", self.metric):
            if k in numeric:
                hist.setdefault(k, []).append((epoch, numeric[k]))
        value = result.get(self.metric)
        cur = self.best.get(trial.trial_id)
        if isinstance(value, (int, float)) and is_better(float(value), cur and cur["value"], self.mode):
            self.best[trial.trial_id] = {"value": float(value), "epoch": epoch, "metrics": numeric,
                                         "checkpoint": result.get("checkpoint_path")}

    @_timed
    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "FINISHED")

    @_timed
    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", error=trial_error(trial))

    # ------------------------------------------------------------------ resume
    def rehydrate(self, train_storage: str) -> dict[str, int]:
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
            self._backfill(rid, Path(train_storage) / f"trial_{tid}", series)
            self.history[tid] = {k: v for k, v in series.items()
                                 if k in ("train_loss", "val_loss", "pretrain_loss", "val_pretrain_loss", self.metric)}
            scored = [(v, e) for e, v in series.get(self.metric, []) if math.isfinite(v)]
            if scored:
                value, epoch = (max if self.mode == "max" else min)(scored, key=lambda ve: (ve[0], -ve[1]))
                ckpt = Path(train_storage) / f"trial_{tid}" / f"epoch_{epoch:04d}"
                self.best[tid] = {"value": value, "epoch": epoch, "checkpoint": str(ckpt) if ckpt.is_dir() else None,
                                  "metrics": {k: v for k, pts in series.items() for e, v in pts if e == epoch}}
            last_epoch = max((e for pts in series.values() for e, _ in pts), default=0)
            self.last[tid] = {"epoch": last_epoch, **{k: pts[-1][1] for k, pts in series.items() if pts}}
        return counts

    def _backfill(self, rid: str, trial_dir: Path, series: dict[str, list[tuple[int, float]]]) -> None:
        """Log the epochs a killed driver reported to Ray (their checkpoints hold metrics.json) but not to MLflow."""
        logged = {e for pts in series.values() for e, _ in pts}
        now = int(time.time() * 1000)
        for f in sorted(trial_dir.glob("epoch_*/metrics.json")):
            try:
                reported = json.loads(f.read_text())
                epoch = int(reported["epoch"])
            except (OSError, ValueError, KeyError):
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
            if res is None:
                self.client.delete_run(rid)
                del self.runs[tid]
                continue
            if res.metrics:
                self.last.setdefault(tid, {}).update(res.metrics)
            self._close_trial(tid, "FAILED" if res.error else "FINISHED",
                              error=f"{type(res.error).__name__}: {res.error}" if res.error else None)
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
        name = f"{experiment}-{kind}"
        try:
            client.get_registered_model(name)
        except Exception:
            client.create_registered_model(name, description=f"best {kind} of e2e-search experiment '{experiment}'")
        run = client.get_run(rid)
        version = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/best_checkpoint", run_id=rid,
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
    from .errors import NothingToResume, UserError, did_you_mean

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise NothingToResume(f"no experiment '{experiment}'{did_you_mean(experiment, names)}", key="EXPERIMENT")
    if search_run:
        try:
            run = client.get_run(search_run)
        except Exception:
            raise UserError(f"no run {search_run} in experiment '{experiment}'", key="--search") from None
        if run.data.tags.get("e2e.kind") != "search":
            raise UserError(f"run {search_run} is not an e2e-search search run (a trial?)", key="--search")
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
                            tags={"e2e.kind": "search", MLFLOW_RUN_NAME: name, **tags})
    rid = run.info.run_id
    client.log_text(rid, resolved_yaml, "search_space.yaml")
    client.log_batch(rid, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return rid


def top_trials(uri: str, experiment: str, *, metric: str | None = None, mode: str | None = None,
               top: int = 5) -> tuple[str, str, list[Any]]:
    """Finished trial runs of ``experiment`` ranked by ``best_<metric>`` -> (metric, mode, runs).

    Reads MLflow only; metric and mode default to those of the latest search.
    """
    from .config import MAXIMIZED
    from .errors import UserError, did_you_mean

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise UserError(f"no experiment '{experiment}' in {uri}{did_you_mean(experiment, names)}", key="EXPERIMENT")
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
