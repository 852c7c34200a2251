"""A registered champion as an MLflow Model: the trial's best checkpoint saved as a pyfunc model
(trainables/serving.py) with a signature and an input example of raw rows of the search's data file, logged to
the trial's run as ``model/``; its registered version's source."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from trainables.core.layout import BEST_ARTIFACT
from trainables.inference import file_row_shape

MODEL_ARTIFACT = "model"
"""Where a champion's MLflow Model sits in its trial's run."""
EXAMPLE_ROWS = 2


def _pip_requirements() -> list[str]:
    """What the model's own environment needs (given, so MLflow does not load the model to infer it)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "timm", "numpy", "mlflow", "pydantic")]


def _example(r) -> list[np.ndarray]:
    """A few raw rows of the data file (the test split first), or zeros of the file's shape when it is gone."""
    from trainables.inference import raw_rows

    s = r.setup
    rows = (list(s.test) or list(s.val) or list(s.train) or list(range(EXAMPLE_ROWS)))[:EXAMPLE_ROWS]  # a checkpoint
    # keeps no split lists: the first rows of the file then
    try:
        return raw_rows(s, rows)
    except OSError:  # the file moved since the search: the shape is enough for a signature
        shape = (EXAMPLE_ROWS, *file_row_shape(s))
        if s.kind == "objects":
            return [np.zeros(shape, np.float32), np.ones(shape[:2], bool)]
        return [np.zeros(shape, np.float32)]


def log_champion_model(client: MlflowClient, run) -> str:
    """Save run ``run``'s best checkpoint as an MLflow pyfunc model under its ``model/`` artifact (once per run).
    Returns the model's artifact URI (a registered version's source)."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from trainables.inference import predict_raw, rebuild
    from trainables.serving import ChampionModel

    rid = run.info.run_id
    uri = f"{run.info.artifact_uri}/{MODEL_ARTIFACT}"
    if any(a.path == f"{MODEL_ARTIFACT}/MLmodel" for a in client.list_artifacts(rid, MODEL_ARTIFACT)):
        return uri
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = client.download_artifacts(rid, f"{BEST_ARTIFACT}/checkpoint.pt", tmp)
        r = rebuild(ckpt)
        example = _example(r)
        output = predict_raw(r, example)
        given = {"objects": example[0], "mask": example[1]} if r.inputs == "objects" else example[0]
        path = Path(tmp) / MODEL_ARTIFACT
        mlflow.pyfunc.save_model(path=str(path), python_model=ChampionModel(), artifacts={"checkpoint": ckpt},
                                 signature=infer_signature(given, output), input_example=given,
                                 pip_requirements=_pip_requirements())
        client.log_artifacts(rid, str(path), artifact_path=MODEL_ARTIFACT)
    return uri
