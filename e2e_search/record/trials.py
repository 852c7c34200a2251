"""The MLflow record of each trial of a running search: a Ray Tune callback in the search driver.

It runs in the search driver (not in the trial processes), so runs of trials that ASHA stops or that fail
are always closed with the right status. Ray's ``MLflowLoggerCallback`` is not used because it logs with
``step=training_iteration`` (which restarts at 1 on resume) instead of the absolute epoch, does not nest
runs and uploads no checkpoints. What a trial's run holds: see e2e_search/record/store.py.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.tune import Callback

from e2e_search.record.live_callbacks import Live
from e2e_search.record.store import is_better
from trainables.core.layout import BEST_ARTIFACT, METRICS_FILE, PLOTS_ARTIFACT, epoch_checkpoints
from trainables.names import mlflow_key, param_value, tag_value, unique_keys
from trainables.params import public_params

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


def _timed(hook):
    """Adds the hook's wall time to ``self.busy_s``: the driver time MLflow logging costs the search."""

    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            with self._busy_lock:
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


class MlflowTrials(Live, Callback):
    """Tune callback: one nested MLflow run per trial, keyed on the trial id (reused on resume)."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str, *, search_name: str,
                 family: str, metric: str, mode: str, max_epochs: int, mutable: tuple[str, ...] = ()):
        self.client = client
        self.experiment_id = experiment_id
        self.parent = parent_run_id
        self.search_name = search_name
        self.family = family
        self.metric = metric
        self.mode = mode
        self.max_epochs = max_epochs
        self.mutable = tuple(mutable)
        """Parameters a scheduler changes mid-trial (PBT): logged each epoch as metrics ``pbt/<name>`` (MLflow
        params cannot change) and as tags ``e2e.pbt.<name>`` (the value in use now)."""
        self.runs: dict[str, str] = {}
        self.best: dict[str, dict[str, Any]] = {}  # trial_id -> {"value", "epoch", "metrics", "checkpoint"}
        self.last: dict[str, dict[str, Any]] = {}
        self.status: dict[str, str] = {}
        self.history: dict[str, dict[str, list[tuple[int, float]]]] = {}  # for the learning curves
        self.logged: dict[str, set[tuple[str, int]]] = {}  # (metric, step) already in each trial's run
        self.sources: dict[str, list[str]] = {}  # PBT: "<source trial>@<epoch>><first epoch after>" per exploit
        self.current: dict[str, dict[str, Any]] = {}  # PBT: each trial's params as last logged or tagged
        self.broken: dict[str, str] = {}  # trial_id -> why its MLflow record failed
        self.busy_s = 0.0  # driver time spent in the hooks below and in closing runs
        # Closing a run (uploading its best checkpoint, drawing and uploading its plots: ~1 s) happens on one
        # background thread, off Tune's event loop: the other trials' results are not held up meanwhile.
        # ``drain()`` waits for it (the end of a search); a run whose closing a killed driver never finished
        # is closed again on resume (tag ``e2e.closing``, see rehydrate).
        self._closer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="e2e-mlflow-close")
        self._pending: list[Future] = []
        self._busy_lock = threading.Lock()

    def __getstate__(self):  # Tune pickles its callbacks with the experiment state: not the closing thread
        state = self.__dict__.copy()
        for k in ("_closer", "_pending", "_busy_lock"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        for name, empty in (("mutable", ()), ("sources", {}), ("current", {})):  # pickled by an older version
            self.__dict__.setdefault(name, empty)
        self._closer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="e2e-mlflow-close")
        self._pending = []
        self._busy_lock = threading.Lock()

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
        self.current[tid] = dict(params)
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
        ckpt = (best or {}).get("checkpoint")
        if ckpt and "://" not in ckpt and not Path(ckpt).is_dir():  # Ray no longer keeps it: the latest one
            tags.append(RunTag("e2e.checkpoint_note", f"best epoch's checkpoint {ckpt} is gone; uploaded the latest"))
            ckpt = None
        ckpt = ckpt or last.get("checkpoint_path")
        tags.append(RunTag("e2e.closing", ckpt or ""))
        self.client.log_batch(rid, metrics=metrics, tags=tags)
        self.status[tid] = status
        self._pending.append(self._closer.submit(self._finish_run, tid, rid, status, ckpt, self.history.get(tid)))

    def _finish_run(self, tid: str, rid: str, status: str, ckpt: str | None, history: dict | None) -> None:
        """(background thread) The run's best checkpoint and plots uploaded, then the run closed."""
        t0 = time.perf_counter()
        try:
            if ckpt:
                self._upload_checkpoint(rid, ckpt, history)
            self.client.set_terminated(rid, status="FINISHED" if status == "FINISHED" else "FAILED")
        except Exception as e:  # noqa: BLE001 - one run's record must not stop the others
            self._tracking_failed(tid, e)
        finally:
            with self._busy_lock:
                self.busy_s += time.perf_counter() - t0

    def drain(self) -> None:
        """Wait until every run handed to the closing thread is closed."""
        while self._pending:
            self._pending.pop(0).result()

    def _upload_checkpoint(self, run_id: str, path: str, history: dict | None = None) -> None:
        import tempfile

        from ray.train import Checkpoint

        from e2e_search.record.figures import attention_plot, learning_curves, prediction_plots, task_attention_plot
        from trainables.attention.tasks import is_task_attention
        from trainables.core.layout import ATTENTION_FILE, PREDICTIONS_FILE, ROLLOUT_PLOT, TASK_ATTENTION_PLOT

        try:
            with Checkpoint(path).as_directory() as d:
                self.client.log_artifacts(run_id, d, artifact_path=BEST_ARTIFACT)
                self.client.set_tag(run_id, "e2e.checkpoint", path)
                with tempfile.TemporaryDirectory() as tmp:
                    if history:
                        learning_curves(history, self.metric, Path(tmp) / "learning_curves.png")
                    if (Path(d) / PREDICTIONS_FILE).is_file():
                        prediction_plots(Path(d) / PREDICTIONS_FILE, Path(tmp))
                    attn = Path(d) / ATTENTION_FILE
                    if attn.is_file() and is_task_attention(attn):
                        task_attention_plot(attn, Path(tmp) / TASK_ATTENTION_PLOT)
                    elif attn.is_file():
                        attention_plot(attn, Path(tmp) / ROLLOUT_PLOT)
                    self.client.log_artifacts(run_id, tmp, artifact_path=PLOTS_ARTIFACT)
        except Exception as e:  # a missing checkpoint or a failed plot must not take the search down
            self.client.set_tag(run_id, "e2e.checkpoint_error", f"{type(e).__name__}: {e}"[:5000])

    @staticmethod
    def _numeric(result: dict[str, Any]) -> dict[str, float]:
        """The result's numbers under names MLflow accepts (see trainables/names.py)."""
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
        hist = self.history.setdefault(tid, {})
        tags = []
        source = result.get("pbt_source")
        if isinstance(source, str) and "@" in source:  # PBT gave it another trial's weights of epoch `src`:
            donor, src = source.rsplit("@", 1)[0], int(source.rsplit("@", 1)[1])
            # it trains epochs after `src` again, with new values
            done -= {(k, e) for k, e in done if e > src}
            for k in hist:
                hist[k] = [(e, v) for e, v in hist[k] if e <= src]
            own = max((e for _, e in done), default=0)
            if own < src:  # the donor was ahead (asynchronous PBT): its epochs own+1..src are these weights' past
                self._copy_epochs(donor, rid, own, src, done, hist)
                tags.append(RunTag("e2e.pbt_copied_epochs", f"{own + 1}-{src} from {donor}"))
            trail = [*self.sources.get(tid, []), f"{source}>{epoch}"]
            self.sources[tid] = trail
            tags += [RunTag("e2e.pbt_source", source), RunTag("e2e.pbt_sources", tag_value(",".join(trail)))]
        # The values this epoch trained with: the config Ray put in the result (the trainable's own). Not
        # trial.config: Tune calls the scheduler before the callbacks, so at the epoch where PBT exploits,
        # trial.config already holds the values the next epochs will use.
        config = result.get("config") if isinstance(result.get("config"), dict) else trial.config
        for name in self.mutable:
            v = config.get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                numeric[mlflow_key(f"pbt/{name}")] = float(v)
        # A value that is no longer the run's param (PBT: a perturbed one, or the donor's architecture after an
        # exploit): tag e2e.pbt.<name> with the value in use.
        current = self.current.setdefault(tid, public_params(config))
        for name, v in public_params(config).items():
            if current.get(name) != v:
                current[name] = v
                tags.append(RunTag(mlflow_key(f"e2e.pbt.{name}"), param_value(v)))
        new = {k: v for k, v in numeric.items() if (k, epoch) not in done}
        if new or tags:
            self.client.log_batch(rid, metrics=[Metric(k, v, now, epoch) for k, v in new.items()], tags=tags)
            done.update((k, epoch) for k in new)
        self.last[tid] = {**result, "checkpoint_path": checkpoint_of(trial, result)}
        for k in self._curves():
            if k in new:
                hist.setdefault(k, []).append((epoch, new[k]))
        value = result.get(self.metric)
        cur = self.best.get(trial.trial_id)
        if isinstance(value, (int, float)) and is_better(float(value), cur and cur["value"], self.mode):
            self.best[trial.trial_id] = {"value": float(value), "epoch": epoch, "metrics": numeric,
                                         "checkpoint": checkpoint_of(trial, result)}

    def _curves(self) -> tuple[str, ...]:
        """The metrics kept per epoch for the learning curves."""
        return ("train_loss", "val_loss", "pretrain_loss", "val_pretrain_loss", self.metric)

    def _copy_epochs(self, donor: str, rid: str, after: int, upto: int, done: set, hist: dict) -> None:
        """Log the donor trial's metrics of epochs ``after``+1..``upto`` into run ``rid``: a trial exploited
        by PBT from a donor ahead of it carries weights trained through those epochs by the donor, and its
        run keeps one value per epoch (its whole history; tag ``e2e.pbt_copied_epochs`` says which)."""
        drid = self.runs.get(donor)
        if drid is None:
            return
        metrics = []
        for key in self.client.get_run(drid).data.metrics:
            for m in self.client.get_metric_history(drid, key):
                if after < m.step <= upto and (key, m.step) not in done:
                    metrics.append(Metric(key, m.value, m.timestamp, m.step))
                    done.add((key, m.step))
                    if key in self._curves():
                        hist.setdefault(key, []).append((m.step, m.value))
        for k in hist:
            hist[k].sort()
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(rid, metrics=metrics[i:i + 1000])

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
                if r.info.status == "RUNNING":  # the killed driver had not finished closing it
                    ckpt = r.data.tags.get("e2e.closing") or None
                    self._pending.append(self._closer.submit(self._finish_run, tid, rid, st, ckpt, None))
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
                                 if k in self._curves()}
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
        self.drain()
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
        self.drain()
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
