"""Taking over the trial runs of an interrupted search (``e2e-search run --resume``): run ids and statuses, runs
a killed driver had not finished closing, and for trials that were running their metric history, with the
epochs Ray saw but MLflow did not logged from their checkpoints."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from e2e_search.record.run_closer import RunCloser
from e2e_search.record.trial_book import TrialBook, numeric_metrics
from trainables.core.layout import METRICS_FILE, epoch_checkpoints


def rehydrate(book: TrialBook, client, experiment_id: str, parent: str, closer: RunCloser,
              search_dir: str) -> dict[str, int]:
    """Fill ``book`` from the child runs of search run ``parent``. Returns {"finished": n, "failed": n,
    "interrupted": n}."""
    counts = {"finished": 0, "failed": 0, "interrupted": 0}
    runs = client.search_runs([experiment_id], max_results=5000,
                              filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")
    for r in runs:
        tid = r.data.tags.get("e2e.trial_id")
        if not tid:
            continue
        book.runs[tid] = r.info.run_id
        st = r.data.tags.get("e2e.status")
        if st in ("FINISHED", "FAILED"):
            _closed(book, r, tid, st, closer)
            counts["finished" if st == "FINISHED" else "failed"] += 1
        else:
            _interrupted(book, client, r, tid, search_dir)
            counts["interrupted"] += 1
    return counts


def _closed(book: TrialBook, r, tid: str, st: str, closer: RunCloser) -> None:
    """A trial that ended before the interruption: its status, best and last epoch; closed again if the killed
    driver had not finished closing it."""
    rid, m = r.info.run_id, r.data.metrics
    book.status[tid] = st
    if r.info.status == "RUNNING":  # the killed driver had not finished closing it
        closer.submit(tid, rid, st, r.data.tags.get("e2e.closing") or None, None)
    if f"best_{book.metric}" in m:
        book.best[tid] = {"value": m[f"best_{book.metric}"], "epoch": int(m.get("best_epoch", 0)),
                          "metrics": {k[5:]: v for k, v in m.items() if k.startswith("best_") and k != "best_epoch"},
                          "checkpoint": None}
    book.last[tid] = {"epoch": int(m.get("epochs_run", 0))}


def _interrupted(book: TrialBook, client, r, tid: str, search_dir: str) -> None:
    """A trial that was running: its metric history (so the best epoch and the learning curves span the
    interruption) and its best epoch's kept checkpoint."""
    rid, m = r.info.run_id, r.data.metrics
    series = {k: sorted((x.step, x.value) for x in client.get_metric_history(rid, k)) for k in m}
    kept = epoch_checkpoints(search_dir, tid)
    backfill(client, rid, kept, series)
    book.logged[tid] = {(k, e) for k, pts in series.items() for e, _ in pts}
    book.history[tid] = {k: v for k, v in series.items() if k in book.curves()}
    scored = [(v, e) for e, v in series.get(book.metric, []) if math.isfinite(v)]
    if scored:
        value, epoch = (max if book.mode == "max" else min)(scored, key=lambda ve: (ve[0], -ve[1]))
        ckpt = kept.get(epoch)
        book.best[tid] = {"value": value, "epoch": epoch, "checkpoint": str(ckpt) if ckpt else None,
                          "metrics": {k: v for k, pts in series.items() for e, v in pts if e == epoch}}
    last_epoch = max((e for pts in series.values() for e, _ in pts), default=0)
    book.last[tid] = {"epoch": last_epoch, **{k: pts[-1][1] for k, pts in series.items() if pts}}


def backfill(client, rid: str, kept: dict[int, Path], series: dict[str, list[tuple[int, float]]]) -> None:
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
        numeric = {k: v for k, v in numeric_metrics(reported).items() if math.isfinite(v)}
        client.log_batch(rid, metrics=[Metric(k, v, now, epoch) for k, v in numeric.items()])
        for k, v in numeric.items():
            series.setdefault(k, []).append((epoch, v))
            series[k].sort()
