"""Closing a trial's MLflow run off Tune's event loop: its best checkpoint and plots uploaded (~1 s), then the run
terminated, on one background thread, so the other trials' results are not held up meanwhile."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mlflow.tracking import MlflowClient

from e2e_search.record.figures import attention_plot, learning_curves, prediction_plots, task_attention_plot
from trainables.attention.tasks import is_task_attention
from trainables.core.layout import (
    ATTENTION_FILE,
    BEST_ARTIFACT,
    PLOTS_ARTIFACT,
    PREDICTIONS_FILE,
    ROLLOUT_PLOT,
    TASK_ATTENTION_PLOT,
)


class RunCloser:
    """One closing thread; ``drain()`` waits for it (the end of a search). A run whose closing a killed driver never
    finished is closed again on resume (tag ``e2e.closing``, e2e_search/record/trial_resume.py)."""

    def __init__(self, client: MlflowClient, metric: str, on_failure: Callable[[str, Exception], None]):
        self.client, self.metric, self.on_failure = client, metric, on_failure
        self.busy_s = 0.0
        """Driver time spent here and in the callback's hooks (added by them)."""
        self.lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="e2e-mlflow-close")
        self._pending: list[Future] = []

    def add_busy(self, seconds: float) -> None:
        with self.lock:
            self.busy_s += seconds

    def submit(self, tid: str, rid: str, status: str, ckpt: str | None, history: dict | None) -> None:
        """Close run ``rid`` of trial ``tid`` with ``status``, after uploading ``ckpt`` and the plots."""
        self._pending.append(self._pool.submit(self._close, tid, rid, status, ckpt, history))

    def drain(self) -> None:
        """Wait until every run handed to the closing thread is closed."""
        while self._pending:
            self._pending.pop(0).result()

    def _close(self, tid: str, rid: str, status: str, ckpt: str | None, history: dict | None) -> None:
        """(background thread) The run's best checkpoint and plots uploaded, then the run closed; a trial whose
        best checkpoint cannot be kept is closed FAILED (``on_failure``: no champion can come from it)."""
        t0 = time.perf_counter()
        try:
            if ckpt:
                self.upload_checkpoint(rid, ckpt, history)
            self.client.set_terminated(rid, status="FINISHED" if status == "FINISHED" else "FAILED")
        except Exception as e:  # noqa: BLE001 - one run's record must not stop the others
            self.on_failure(tid, e)
        finally:
            self.add_busy(time.perf_counter() - t0)

    def upload_checkpoint(self, run_id: str, path: str, history: dict | None = None) -> None:
        """The checkpoint folder ``path`` as the run's ``best_checkpoint`` artifact, with its plots. The checkpoint
        is read first (a file a full disk truncated is not kept). Raises CheckpointLost when it cannot be read or
        uploaded; a failed plot is only tagged ``e2e.checkpoint_error`` on the run."""
        from ray.train import Checkpoint

        from trainables.core.checkpoint import TrialCheckpoint

        try:
            with Checkpoint(path).as_directory() as d:
                TrialCheckpoint.load(d)  # the whole file read: a truncated zip or pickle fails here
                self.client.log_artifacts(run_id, d, artifact_path=BEST_ARTIFACT)
                self.client.set_tag(run_id, "e2e.checkpoint", path)
                try:
                    with tempfile.TemporaryDirectory() as tmp:
                        _plots(Path(d), Path(tmp), history, self.metric)
                        self.client.log_artifacts(run_id, tmp, artifact_path=PLOTS_ARTIFACT)
                except Exception as e:  # noqa: BLE001 - a failed plot must not take the trial or the search down
                    self.client.set_tag(run_id, "e2e.checkpoint_error", f"plots: {type(e).__name__}: {e}"[:5000])
        except Exception as e:  # said as the trial's failure
            raise CheckpointLost(f"its best checkpoint ({path}) could not be kept: {type(e).__name__}: "
                                 f"{' '.join(str(e).split())}"[:2000]) from e


class CheckpointLost(RuntimeError):
    """A trial's best checkpoint could not be read or uploaded (a full disk truncated it, the folder is gone):
    the trial's run is closed FAILED."""


def _plots(ckpt: Path, out: Path, history: dict | None, metric: str) -> None:
    """A checkpoint's plots (e2e_search/record/figures.py) into ``out``."""
    if history:
        learning_curves(history, metric, out / "learning_curves.png")
    if (ckpt / PREDICTIONS_FILE).is_file():
        prediction_plots(ckpt / PREDICTIONS_FILE, out)
    attn = ckpt / ATTENTION_FILE
    if attn.is_file() and is_task_attention(attn):
        task_attention_plot(attn, out / TASK_ATTENTION_PLOT)
    elif attn.is_file():
        attention_plot(attn, out / ROLLOUT_PLOT)
