"""The runs table a search opens on in the MLflow UI: its model-training view, sorted by the search metric, with
the family, the search metric and the test metrics as columns.

MLflow 3's UI keeps its column choice in the browser (local storage), but it reads a view shared through an
experiment tag: ``mlflow.sharedViewState.<key>`` holds the view (search facets and UI state, as JSON) and the link
``#/experiments/<id>/runs?viewStateShareKey=<key>`` opens it (MLflow's "Share" button writes the same tag). A search
writes one such view per search metric at its start (:func:`share_runs_view`); ``e2e-search ui`` prints its link
(:func:`runs_link`). Column keys follow the UI: ``metrics.`<name>```, ``tags.`<name>```.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from mlflow.tracking import MlflowClient

from e2e_search.spec.schema import MAXIMIZED

SHARED_VIEW_TAG = "mlflow.sharedViewState."
"""MLflow UI's experiment-tag prefix of a shared runs view (its ``viewStateShareKey``)."""

TRAINING_VIEW = "workflowType=machine_learning"
"""MLflow 3's UI shows an experiment in its GenAI mode (traces, judges, prompts) unless the link asks for its
model-training mode (or the user switched it once in that browser)."""


def view_key(metric: str) -> str:
    """The share key of the runs view of a search by ``metric`` (one per metric an experiment's searches use)."""
    return f"e2e-search-{metric}"


def view_columns(metric: str, task: str) -> list[str]:
    """The runs table's columns: the trial's family, ``best_<metric>`` (trial runs), the test metric of the same
    name and its confirm figures (``test_<m>`` on seed runs, ``test_<m>_mean`` and the 95% interval on finalist
    runs), and ``test_auc``/``test_mae`` (the champion metric when the search metric has no test bootstrap)."""
    base = metric.removeprefix("val_")
    tests = dict.fromkeys([base, "auc" if task == "classification" else "mae"] if task != "joint" else [base, "auc", "mae"])
    cols = ["tags.`e2e.family`", f"metrics.`best_{metric}`"]
    for t in tests:
        cols += [f"metrics.`test_{t}`", f"metrics.`test_{t}_mean`", f"metrics.`test_{t}_lo`", f"metrics.`test_{t}_hi`"]
    return cols


def view_state(metric: str, task: str) -> dict:
    """The shared view: sorted by ``best_<metric>`` (best first), the columns of :func:`view_columns`."""
    return {"orderByKey": f"metrics.`best_{metric}`", "orderByAsc": metric not in MAXIMIZED,
            "selectedColumns": view_columns(metric, task)}


def share_runs_view(client: MlflowClient, experiment_id: str, metric: str, task: str) -> str:
    """Write the experiment tag of the search's runs view -> its share key (idempotent)."""
    key = view_key(metric)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, json.dumps(view_state(metric, task)))
    return key


def runs_link(base: str, exp_id: str, metric: str | None, shared: bool = True) -> str:
    """The runs table of an experiment in MLflow's model-training view: the shared view of searches by ``metric``
    when ``shared`` (its tag exists), else sorted by the search metric (best first); MLflow's UI ignores a shared
    view when the link also names a sort."""
    link = f"{base}/#/experiments/{exp_id}/runs?{TRAINING_VIEW}"
    if metric and shared:
        return f"{link}&viewStateShareKey={quote(view_key(metric))}"
    if metric:
        link += f"&orderByKey={quote(f'metrics.`best_{metric}`')}&orderByAsc={'false' if metric in MAXIMIZED else 'true'}"
    return link
