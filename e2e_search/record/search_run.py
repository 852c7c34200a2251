"""A search's MLflow parent run: opened (or re-opened on resume) with the resolved YAML, its tags and params;
closed with the best trial, the registered champions and the counts, never left RUNNING."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from e2e_search.spec.loader import dump
from e2e_search.spec.schema import SearchSpace
from trainables.data.setup import DataSetup


def start_search_run(client, exp_id: str, cfg: SearchSpace, data: DataSetup, storage: Path, warm=None) -> tuple[str, str]:
    """Open the parent run of a new search -> (run name, run id). ``warm``: the earlier trials it starts from
    (e2e_search/search/warm_start.py)."""
    from e2e_search.data.fileid import TAG, data_hash
    from e2e_search.record.runs_view import share_runs_view
    from e2e_search.record.store import start_parent_run

    metric, mode = cfg.metrics[0], cfg.modes[0]
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # RUN_STAMP in record.store.check_names
    warm_tags = {} if warm is None else {  # where the search started from
        "e2e.warm_start": warm.experiment, "e2e.warm_start_runs": ",".join(warm.run_ids)}
    parent = start_parent_run(
        client, exp_id, name=run_name, resolved_yaml=dump(cfg),
        tags={"e2e.family": cfg.family_label, "e2e.task": cfg.task.type, "e2e.metric": metric, "e2e.mode": mode,
              "e2e.tune_path": str(storage / run_name),
              TAG: data_hash(cfg.data.path) or "",  # the data file's identity: confirm checks it
              **warm_tags},
        params={"family": cfg.family_label, "task": cfg.task.type, "algorithm": cfg.search.algorithm,
                "num_samples": cfg.search.num_samples, "scheduler": cfg.scheduler.type,
                "max_epochs": cfg.scheduler.max_epochs, "workers": cfg.resources.workers,
                "data_path": cfg.data.path, "train_size": len(data.train), "val_size": len(data.val),
                **({"warm_start": warm.experiment} if warm is not None else {})},
    )
    share_runs_view(client, exp_id, metric, cfg.task.type)  # the runs table `ui` links (its columns)
    return run_name, parent


def reopen_search_run(client, parent: str, times: int) -> None:
    """An interrupted search's parent run, RUNNING again and tagged with how often it was resumed."""
    client.update_run(parent, status="RUNNING")
    client.set_tag(parent, "e2e.resumed", str(times))
    if client.get_run(parent).data.tags.get("e2e.interrupted"):
        client.delete_tag(parent, "e2e.interrupted")


def finish_search_run(client, parent: str, trials_cb, cfg: SearchSpace, run_name: str, status: str,
            error: str | None, interrupted: str | None = None) -> dict[str, Any]:
    """Record the end of a search on its parent run: best trial, champions, counts; the run is always closed
    (FAILED, with tag ``e2e.error``, when any of this fails: it never stays RUNNING).
    Returns {"winner", "best_rid", "end_error"}."""
    from mlflow.entities import RunTag

    from e2e_search.record.store import register_champions
    from trainables.names import mlflow_key, tag_value

    metric, mode = cfg.metrics[0], cfg.modes[0]
    assert cfg.tracking.experiment is not None  # SearchSpace's validator defaults it to the search's name
    try:
        trials_cb.drain()  # every trial's run closed, its best checkpoint uploaded (champions point at it)
    except Exception:  # noqa: BLE001 - the parent run must still be closed
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
        if status == "KILLED":  # a signal: resumable (a KILLED search without this tag stopped before Ray saved it)
            done = sum(1 for s in trials_cb.status.values() if s in ("FINISHED", "FAILED"))
            running = sum(1 for tid in trials_cb.runs if tid not in trials_cb.status)
            client.set_tag(parent, "e2e.interrupted", f"{interrupted or 'interrupted'}: {done} of "
                                                      f"{cfg.search.num_samples} trials ended, {running} interrupted")
        client.log_metric(parent, "tracking_s", trials_cb.busy_s)  # driver time in MLflow logging
        n_failed = sum(1 for s in trials_cb.status.values() if s == "FAILED")
        client.set_tag(parent, "e2e.trials_failed", str(n_failed))
    except Exception as e:  # noqa: BLE001 - recorded as the end error: the run is closed FAILED
        end_error = " ".join(f"{type(e).__name__}: {e}".split())[:2000]
        status = "FAILED"
    finally:
        if error or end_error:
            try:
                client.log_batch(parent, tags=[RunTag("e2e.error", tag_value(end_error or error))])
            except Exception:  # noqa: BLE001 - closing the run matters more than the tag
                pass
        try:
            client.set_terminated(parent, status=status)
        except Exception as e:  # noqa: BLE001 - returned as the end error to the caller
            end_error = end_error or " ".join(f"{type(e).__name__}: {e}".split())[:2000]
    return {"winner": winner, "best_rid": best_rid, "end_error": end_error}
