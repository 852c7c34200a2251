"""The MLflow record of each trial of a running search: a Ray Tune callback in the search driver.

It runs in the search driver (not in the trial processes), so runs of trials that ASHA stops or that fail
are always closed with the right status. Ray's ``MLflowLoggerCallback`` is not used because it logs with
``step=training_iteration`` (which restarts at 1 on resume) instead of the absolute epoch, does not nest
runs and uploads no checkpoints. What a trial's run holds: see e2e_search/record/store.py.

The pieces: trial_book (what is known of each trial), trial_runs (opening a run, what closing it logs),
run_closer (closing off the event loop), pbt_record (PBT's lineage and changed values), trial_resume (taking
over an interrupted search's runs).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from e2e_search.record import pbt_record, trial_resume
from e2e_search.record.live_callbacks import Live
from e2e_search.record.run_closer import RunCloser
from e2e_search.record.store import is_better
from e2e_search.record.trial_book import TrialBook, checkpoint_of, numeric_metrics
from e2e_search.record.trial_runs import closing_record, open_trial_run, result_values, trial_error
from trainables.errors import STORE_FULL, StoreFull


def _timed(hook):
    """Adds the hook's wall time to ``busy_s``: the driver time MLflow logging costs the search."""

    @functools.wraps(hook)
    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            self.closer.add_busy(time.perf_counter() - t0)

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
            if STORE_FULL in str(e):  # nothing more can be recorded: the search stops (e2e_search/search/disk.py)
                raise StoreFull(f"the MLflow store's disk is full: {type(e).__name__}") from None
            return None

    return wrapper


class MlflowTrials(Live, TrialBook, Callback):
    """Tune callback: one nested MLflow run per trial, keyed on the trial id (reused on resume)."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str, *, search_name: str,
                 family: str, metric: str, mode: str, max_epochs: int, mutable: tuple[str, ...] = ()):
        TrialBook.__init__(self, metric, mode, max_epochs)
        self.client = client
        self.experiment_id = experiment_id
        self.parent = parent_run_id
        self.search_name = search_name
        self.family = family
        self.mutable = tuple(mutable)
        """Parameters a scheduler changes mid-trial (PBT): logged each epoch as metrics ``pbt/<name>`` (MLflow
        params cannot change) and as tags ``e2e.pbt.<name>`` (the value in use now)."""
        self.closer = RunCloser(client, metric, self._tracking_failed)

    @property
    def busy_s(self) -> float:
        """Driver time spent in the hooks and in closing runs."""
        return self.closer.busy_s

    def _tracking_failed(self, tid: str, e: Exception) -> None:
        from e2e_search.record.run_closer import CheckpointLost

        text = " ".join(str(e).split())
        reason = (str(e) if isinstance(e, CheckpointLost) else f"MLflow tracking failed: {type(e).__name__}: {text}")[:5000]
        self.broken[tid] = reason
        self.errors[tid] = reason
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
        if STORE_FULL in reason:  # said once, by the search (e2e_search/search/disk.py)
            return
        print(f"trial {tid}: {reason[:300]}; its MLflow run is closed FAILED and the search goes on",
              file=sys.stderr, flush=True)

    def _run_for(self, trial) -> str:
        return open_trial_run(self, self.client, self.experiment_id, self.parent, self.search_name, self.family,
                              trial)

    def _close(self, trial, status: str, error: str | None = None) -> None:
        if trial.trial_id in self.status:  # closed before (a finished trial Tune restarted after a driver kill)
            return
        self._run_for(trial)
        self._close_trial(trial.trial_id, status, error)

    def _close_trial(self, tid: str, status: str, error: str | None = None) -> None:
        if error:
            self.errors[tid] = error
        metrics, tags, ckpt = closing_record(self, tid, status, error)
        rid = self.runs[tid]
        self.client.log_batch(rid, metrics=metrics, tags=tags)
        self.status[tid] = status
        self.closer.submit(tid, rid, status, ckpt, self.history.get(tid))

    def drain(self) -> None:
        """Wait until every run handed to the closing thread is closed."""
        self.closer.drain()

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
        numeric = numeric_metrics(result)
        if "pretrain_loss" in result:  # the search metrics' NaN placeholders of a pretraining epoch
            numeric = {k: v for k, v in numeric.items() if not math.isnan(v)}
        tags = []
        source = result.get("pbt_source")
        if isinstance(source, str) and "@" in source:  # PBT gave it another trial's weights
            tags += pbt_record.exploit(self, self.client, tid, rid, source, epoch)
        tags += pbt_record.changed_values(self, tid, result_values(trial, result), self.mutable, numeric)
        new = self._log_epoch(tid, rid, epoch, numeric, tags)
        self.last[tid] = {**result, "checkpoint_path": checkpoint_of(trial, result)}
        hist = self.history.setdefault(tid, {})
        for k in self.curves():
            if k in new:
                hist.setdefault(k, []).append((epoch, new[k]))
        value = result.get(self.metric)
        cur = self.best.get(tid)
        if isinstance(value, (int, float)) and is_better(float(value), cur and cur["value"], self.mode):
            self.best[tid] = {"value": float(value), "epoch": epoch, "metrics": numeric,
                              "checkpoint": checkpoint_of(trial, result)}

    def _log_epoch(self, tid: str, rid: str, epoch: int, numeric: dict[str, float],
                   tags: list[RunTag]) -> dict[str, float]:
        """Each (metric, epoch) once (a trial resumed after its last epoch reports that epoch again). -> the
        metrics logged now."""
        done = self.logged.setdefault(tid, set())
        new = {k: v for k, v in numeric.items() if (k, epoch) not in done}
        if new or tags:
            now = int(time.time() * 1000)
            self.client.log_batch(rid, metrics=[Metric(k, v, now, epoch) for k, v in new.items()], tags=tags)
            done.update((k, epoch) for k in new)
        return new

    @_timed
    @_guarded
    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "FINISHED")

    @_timed
    @_guarded
    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", error=trial_error(trial))

    # ------------------------------------------------------------------ resume and the end of the search
    def rehydrate(self, search_dir: str) -> dict[str, int]:
        """Take over the child runs of an interrupted search (e2e_search/record/trial_resume.py).
        Returns {"finished": n, "failed": n, "interrupted": n}."""
        return trial_resume.rehydrate(self, self.client, self.experiment_id, self.parent, self.closer, search_dir)

    def close_leftovers(self, results) -> int:
        """After the search: close the runs still open. A trial Tune knows (``results``, a ResultGrid) gets its
        status from there; a run whose trial Tune never recorded (the driver died before its state was saved,
        and the trial ran again under a new id) is deleted, so every trial has exactly one run."""
        self.drain()
        results = list(results)
        n = 0
        for tid, rid in list(self.runs.items()):
            if tid in self.status:
                continue
            res = _result_of(results, tid)
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

    def interrupt(self) -> None:
        """Ctrl-C: the runs of trials still going are closed KILLED in MLflow, their ``e2e.status`` left RUNNING, so
        a resumed search takes them over and continues them (record/trial_resume.py)."""
        self.drain()
        for tid, rid in self.runs.items():
            if tid not in self.status:
                try:
                    self.client.set_terminated(rid, status="KILLED")
                except Exception as e:  # noqa: BLE001 - one run's record must not keep the others open
                    self._tracking_failed(tid, e)

    def best_trial(self) -> tuple[str, dict[str, Any]] | None:
        """(trial_id, best record) of the best finished trial, by the search metric."""
        winner = None
        for tid, rec in self.best.items():
            if self.status.get(tid) != "FINISHED":
                continue
            if winner is None or is_better(rec["value"], winner[1]["value"], self.mode):
                winner = (tid, rec)
        return winner


def _result_of(results: list, tid: str):
    """The Tune result of trial ``tid`` in a ResultGrid's results, or None."""
    for res in results:
        if (res.metrics or {}).get("trial_id") == tid or (not res.metrics and tid in Path(res.path).name):
            return res
    return None
