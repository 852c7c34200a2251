"""Terminal progress of a search: one line per event (trials running / done / best)."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from e2e_search.record.live_callbacks import Live
from e2e_search.record.store import is_better


class Progress(Live, Callback):
    def __init__(self, *, metric: str, mode: str, num_samples: int, max_epochs: int):
        self.metric, self.mode, self.num_samples, self.max_epochs = metric, mode, num_samples, max_epochs
        self.t0 = time.time()
        self.best: tuple[float, str, int] | None = None

    def _line(self, trials, event: str) -> None:
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        done = counts.get("TERMINATED", 0)
        failed = counts.get("ERROR", 0)
        running = counts.get("RUNNING", 0)
        paused = counts.get("PAUSED", 0)  # hyperband and PBT pause trials part-trained: not "to go"
        pending = self.num_samples - done - failed - running - paused
        best = "-"
        if self.best:
            v, tid, ep = self.best
            best = f"{self.metric}={v:.4f} (trial {tid}, epoch {ep})"
        print(f"[{time.time() - self.t0:6.0f}s] {running} running, {f'{paused} paused, ' if paused else ''}"
              f"{done} done, {failed} failed, "
              f"{max(pending, 0)} to go | best {best} | {event}",
              file=sys.stdout, flush=True)  # looked up per call: Tune pickles callbacks

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trials, f"{trial.trial_id} started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(self.metric)
        ep = int(result.get("epoch", 0))
        if isinstance(v, (int, float)) and is_better(float(v), self.best and self.best[0], self.mode):
            self.best = (float(v), trial.trial_id, ep)
        if "pretrain_loss" in result:
            self._line(trials, f"{trial.trial_id} epoch {ep} pretraining loss={result['pretrain_loss']:.4f}")
            return
        shown = f"{v:.4f}" if isinstance(v, (int, float)) else v
        self._line(trials, f"{trial.trial_id} epoch {ep} {self.metric}={shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        epoch = int((trial.last_result or {}).get("epoch", 0))
        how = "finished" if epoch >= self.max_epochs else f"stopped early at epoch {epoch}"
        self._line(trials, f"{trial.trial_id} {how}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, f"{trial.trial_id} FAILED")


class ConfirmProgress(Callback):
    """Terminal progress of ``e2e-search confirm``: one line per retraining started, finished or failed, with
    its test scores. ``labels``: (finalist index, seed) -> what to call the trial."""

    def __init__(self, *, labels: dict[tuple[int, int], str], total: int, metrics: list[str]):
        self.labels, self.total, self.metrics = labels, total, metrics
        self.t0 = time.time()
        self.done = 0

    def _label(self, trial) -> str:
        job = (trial.config or {}).get("job", {})
        return self.labels.get((job.get("finalist"), job.get("seed")), trial.trial_id)

    def _line(self, text: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {self.done}/{self.total} done | {text}", file=sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(f"{self._label(trial)} started")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        r = trial.last_result or {}
        scores = ", ".join(f"{m}={r[m]:.4f}" for m in dict.fromkeys(self.metrics) if isinstance(r.get(m), float))
        self._line(f"{self._label(trial)} trained {int(r.get('epoch', 0))} epoch(s), {scores or 'no test score'}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self._line(f"{self._label(trial)} FAILED")
