"""A trial's MLflow run: found or created (nested under the search's run, keyed by the trial id) with its
parameters; what closing it logs (best and final metrics, status tags, which checkpoint to upload)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from e2e_search.record.trial_book import TrialBook, numeric_metrics
from trainables.names import mlflow_key, param_value, tag_value, unique_keys
from trainables.params import public_params


def open_trial_run(book: TrialBook, client, experiment_id: str, parent: str, search_name: str, family: str,
                   trial) -> str:
    """The run id of ``trial``: known, found in the store (a resumed search) or created with its parameters."""
    tid = trial.trial_id
    if tid in book.runs:
        return book.runs[tid]
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`e2e.trial_id` = '{tid}' and tags.`mlflow.parentRunId` = '{parent}'",
        max_results=1)
    if found:
        book.runs[tid] = found[0].info.run_id
        return book.runs[tid]
    # "<family>-<trial id>": short enough for the MLflow runs table to show whole (the search is its parent run)
    run = client.create_run(
        experiment_id, run_name=f"{tag_value(trial.config.get('family', family))}-{tid}",
        tags={MLFLOW_PARENT_RUN_ID: parent, "e2e.kind": "trial", "e2e.trial_id": tid,
              "e2e.family": tag_value(trial.config.get("family", family)), "e2e.search": search_name,
              "e2e.status": "RUNNING"})
    rid = run.info.run_id
    book.runs[tid] = rid  # from here on a failure closes this run
    params = public_params(trial.config)
    book.current[tid] = dict(params)
    logged = unique_keys(dict(sorted(params.items())))
    client.log_batch(rid, params=[Param(k, param_value(v)) for k, v in logged.items()])
    client.log_dict(rid, {"family": params.get("family", family), "params": params}, "config.yaml")
    return rid


def closing_record(book: TrialBook, tid: str, status: str,
                   error: str | None) -> tuple[list[Metric], list[RunTag], str | None]:
    """(metrics, tags, checkpoint to upload) that close trial ``tid``'s run: ``best_*`` at the best epoch,
    ``final_*`` at the last, ``e2e.status``, ``e2e.stopped_early``, ``e2e.error``; the best epoch's checkpoint, or
    the latest when Ray no longer keeps it."""
    now = int(time.time() * 1000)
    metrics: list[Metric] = []
    best, last = book.best.get(tid), book.last.get(tid, {})
    if best:
        metrics += [Metric(mlflow_key(f"best_{k}"), float(v), now, int(best["epoch"]))
                    for k, v in best["metrics"].items()]
        metrics.append(Metric("best_epoch", float(best["epoch"]), now, int(best["epoch"])))
    if last:
        epoch = int(last.get("epoch", 0))
        metrics += [Metric(mlflow_key(f"final_{k}"), float(v), now, epoch) for k, v in numeric_metrics(last).items()]
        metrics.append(Metric("epochs_run", float(epoch), now, epoch))
    tags = [RunTag("e2e.status", status)]
    if status == "FINISHED" and last and int(last.get("epoch", 0)) < book.max_epochs:
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
    return metrics, tags, ckpt


def trial_error(trial) -> str:
    """The line naming the exception of an errored Tune trial (from its error file)."""
    text = ""
    for read in (lambda: Path(trial.error_file).read_text(), lambda: str(trial.get_error() or "")):
        try:
            text = read()
        except Exception:  # noqa: BLE001 - no error file or no error: try the next source
            text = ""
        if text:
            break
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^([A-Za-z_]\w*\.)*[A-Z]\w*: \S", ln)]  # "pkg.mod.SomeError: why"
    if named:
        return named[-1]
    return lines[-1] if lines else "trial failed (no error recorded)"


def result_values(trial, result: dict[str, Any]) -> dict[str, Any]:
    """The parameter values epoch ``result`` trained with: the config Ray put in the result (the trainable's own).
    Not trial.config: Tune calls the scheduler before the callbacks, so at the epoch where PBT exploits,
    trial.config already holds the values the next epochs will use."""
    config = result.get("config")
    return config if isinstance(config, dict) else trial.config
