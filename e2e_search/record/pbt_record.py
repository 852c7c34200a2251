"""PBT in a trial's MLflow run: the lineage of its weights (which trial and epoch they came from at each exploit,
the donor's earlier epochs copied in) and the values a scheduler changed mid-trial (``pbt/<name>`` metrics,
``e2e.pbt.<name>`` tags), so that one run keeps one value per epoch of the weights it ends with."""

from __future__ import annotations

from typing import Any

from mlflow.entities import Metric, RunTag

from e2e_search.record.trial_book import TrialBook
from trainables.names import mlflow_key, param_value, tag_value
from trainables.params import public_params


def exploit(book: TrialBook, client, tid: str, rid: str, source: str, epoch: int) -> list[RunTag]:
    """Trial ``tid`` got another trial's weights of epoch ``src`` (``source`` = "<donor>@<src>") and trains the
    epochs after ``src`` again, with new values: its logged epochs after ``src`` are forgotten, the donor's
    epochs it lacks are copied in. -> the run's lineage tags."""
    done, hist = book.logged.setdefault(tid, set()), book.history.setdefault(tid, {})
    donor, src = source.rsplit("@", 1)[0], int(source.rsplit("@", 1)[1])
    done -= {(k, e) for k, e in done if e > src}
    for k in hist:
        hist[k] = [(e, v) for e, v in hist[k] if e <= src]
    tags = []
    own = max((e for _, e in done), default=0)
    if own < src:  # the donor was ahead (asynchronous PBT): its epochs own+1..src are these weights' past
        copy_epochs(book, client, donor, rid, own, src, done, hist)
        tags.append(RunTag("e2e.pbt_copied_epochs", f"{own + 1}-{src} from {donor}"))
    trail = [*book.sources.get(tid, []), f"{source}>{epoch}"]
    book.sources[tid] = trail
    return tags + [RunTag("e2e.pbt_source", source), RunTag("e2e.pbt_sources", tag_value(",".join(trail)))]


def copy_epochs(book: TrialBook, client, donor: str, rid: str, after: int, upto: int, done: set, hist: dict) -> None:
    """Log the donor trial's metrics of epochs ``after``+1..``upto`` into run ``rid``: a trial exploited
    by PBT from a donor ahead of it carries weights trained through those epochs by the donor, and its
    run keeps one value per epoch (its whole history; tag ``e2e.pbt_copied_epochs`` says which)."""
    drid = book.runs.get(donor)
    if drid is None:
        return
    metrics = []
    for key in client.get_run(drid).data.metrics:
        for m in client.get_metric_history(drid, key):
            if after < m.step <= upto and (key, m.step) not in done:
                metrics.append(Metric(key, m.value, m.timestamp, m.step))
                done.add((key, m.step))
                if key in book.curves():
                    hist.setdefault(key, []).append((m.step, m.value))
    for k in hist:
        hist[k].sort()
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(rid, metrics=metrics[i:i + 1000])


def changed_values(book: TrialBook, tid: str, config: dict[str, Any], mutable: tuple[str, ...],
                   numeric: dict[str, float]) -> list[RunTag]:
    """The values epoch's ``config`` trained with: each ``mutable`` one as metric ``pbt/<name>`` (added to
    ``numeric``); a value that is no longer the run's param (PBT: a perturbed one, or the donor's architecture
    after an exploit) as tag ``e2e.pbt.<name>``."""
    for name in mutable:
        v = config.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            numeric[mlflow_key(f"pbt/{name}")] = float(v)
    tags = []
    current = book.current.setdefault(tid, public_params(config))
    for name, v in public_params(config).items():
        if current.get(name) != v:
            current[name] = v
            tags.append(RunTag(mlflow_key(f"e2e.pbt.{name}"), param_value(v)))
    return tags
