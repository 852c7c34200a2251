"""A trial's checkpoint as a model: fetched from a path, an MLflow run (its ``best_checkpoint`` artifact) or a
registered model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), rebuilt exactly as the worker loop built it
(``trainables.core.model.build_model``) and loaded in eval mode; realistic random inputs for it. Read by
``export`` (e2e_search/export/onnx.py) and ``report`` (its cost columns)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainables.core.layout import BEST_CHECKPOINT_ARTIFACT
from trainables.errors import UserError

OCCUPANCY = 0.02
"""Fraction of non-zero pixels of the random parity images (detector images are ~98% empty)."""



CHECKPOINT_ARTIFACT = BEST_CHECKPOINT_ARTIFACT



_RUN_ID = re.compile(r"^[0-9a-f]{32}$")



ANSI = re.compile(r"\x1b\[[0-9;]*m")



@dataclass
class Trained:
    """A rebuilt trial model and what the export records about it."""

    model: Any  # torch.nn.Module in eval mode
    family: str
    inputs: str  # "image", "objects" or "hits" (hit-list families)
    params: dict[str, Any]
    data: dict[str, Any]  # the checkpoint's DataSetup dict (no split lists)
    setup: Any  # DataSetup
    epoch: int | None
    metrics: dict[str, Any]
    source: str



# --------------------------------------------------------------------------- source -> checkpoint.pt
def _store_uri(tracking_uri: str | None) -> str:
    """--tracking-uri > MLFLOW_TRACKING_URI > the work directory's store, which must exist (never created)."""
    from e2e_search.record.store import store_uri
    from trainables.workdir import DEFAULT_WORKDIR

    return store_uri(tracking_uri, DEFAULT_WORKDIR)



def first_line(e: BaseException) -> str:
    text = ANSI.sub("", str(e)).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__



def _download_run_checkpoint(client, uri: str, run_id: str, dst: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        raise UserError(f"no run '{run_id}' in {uri}; give a trial's run id (e2e-search best EXPERIMENT lists them), "
                        "a models:/NAME@ALIAS or a checkpoint.pt path", key="SOURCE") from None
    try:
        return client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, dst)
    except Exception as e:  # noqa: BLE001 - any store error means the artifact is not there
        raise UserError(f"run '{run_id}' has no artifact {CHECKPOINT_ARTIFACT} ({first_line(e)}); "
                        "export a trial run that finished at least one epoch", key="SOURCE") from None



def _download_model_checkpoint(client, uri: str, ref: str, dst: str) -> tuple[str, str]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (local checkpoint.pt, description)."""
    from mlflow.exceptions import MlflowException

    body = ref.removeprefix("models:/")
    try:
        if "@" in body:
            name, alias = body.rsplit("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in body:
            name, version = body.rsplit("/", 1)
            mv = client.get_model_version(name, version)
        else:
            raise UserError(f"'{ref}' names no version; give models:/NAME@ALIAS (e.g. @champion) or models:/NAME/VERSION",
                            key="SOURCE")
    except MlflowException as e:
        from e2e_search.record.store import registry_uri

        raise UserError(f"no registered model version '{ref}' in {registry_uri(uri)} ({first_line(e)}); give a model a "
                        "search registered (models:/<experiment>-classifier@champion), or set --tracking-uri / "
                        "MLFLOW_TRACKING_URI (and MLFLOW_REGISTRY_URI) to its store", key="SOURCE") from None
    desc = f"{ref} (version {mv.version}, run {mv.run_id})"
    if mv.run_id:
        return _download_run_checkpoint(client, uri, mv.run_id, dst), desc
    try:  # a version registered without a run: its source folder holds the checkpoint
        import mlflow.artifacts

        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source.rstrip('/')}/checkpoint.pt",
                                                   dst_path=dst, tracking_uri=uri)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"model version '{ref}' (source {mv.source}) holds no checkpoint.pt ({first_line(e)})",
                        key="SOURCE") from None
    return path, desc



def fetch_checkpoint(source: str, tracking_uri: str | None, tmpdir: str) -> tuple[Path, str]:
    """(local checkpoint.pt, a description of the source) for a path, a run id or a models:/ URI."""
    if source.startswith("models:/"):
        from mlflow.tracking import MlflowClient

        uri = _store_uri(tracking_uri)
        client = MlflowClient(tracking_uri=uri)  # the registry: MLFLOW_REGISTRY_URI, else the tracking store
        path, desc = _download_model_checkpoint(client, uri, source, tmpdir)
        return Path(path), desc
    p = Path(source)
    if p.is_dir():
        if (p / "checkpoint.pt").is_file():
            return p / "checkpoint.pt", str(p / "checkpoint.pt")
        raise UserError(f"'{source}' is a folder without a checkpoint.pt; give the checkpoint file", key="SOURCE")
    if p.is_file():
        return p, str(p)
    if _RUN_ID.match(source):
        from mlflow.tracking import MlflowClient

        uri = _store_uri(tracking_uri)
        return Path(_download_run_checkpoint(MlflowClient(tracking_uri=uri), uri, source, tmpdir)), f"run {source}"
    raise UserError(f"file '{source}' not found; give a checkpoint.pt path, an MLflow run id or models:/NAME@ALIAS",
                    key="SOURCE")



# --------------------------------------------------------------------------- checkpoint -> model
def load_trained(path: Path, desc: str) -> Trained:
    from trainables.core.checkpoint import CheckpointError, TrialCheckpoint
    from trainables.core.model import build_model
    from trainables.registry import get_family

    try:
        ckpt = TrialCheckpoint.load(path)
    except CheckpointError as e:
        raise UserError(f"'{desc}' {e}; give a trial's checkpoint.pt" if not str(e).startswith("the checkpoint")
                        else f"'{desc}': {e}", key="SOURCE") from None
    setup = ckpt.setup()
    data, family, params = dict(ckpt.data), ckpt.family, dict(ckpt.params)
    try:
        model = build_model(family, params, setup)
    except UserError as e:
        raise UserError(f"'{desc}': {e.message}", key="SOURCE") from None
    except Exception as e:  # noqa: BLE001 - pydantic/ValueError from a family's build
        raise UserError(f"cannot rebuild family '{family}' from the checkpoint's params ({first_line(e)[:300]})",
                        key="SOURCE") from None
    try:
        model.load_state_dict(ckpt.model_state())
    except RuntimeError as e:
        raise UserError(f"the weights of '{desc}' do not fit the {family} model rebuilt from its params "
                        f"({first_line(e)[:300]})", key="SOURCE") from None
    model.eval()
    caps = get_family(params.get("family", family)).capabilities
    inputs = "objects" if caps.inputs == "objects" else "hits" if caps.hits else "image"
    return Trained(model=model, family=params.get("family", family), inputs=inputs,
                   params=params, data=data, setup=setup, epoch=ckpt.epoch, metrics=dict(ckpt.metrics),
                   source=desc)



# --------------------------------------------------------------------------- inputs
def input_names(t: Trained) -> list[str]:
    return ["objects", "mask"] if t.inputs == "objects" else ["hits", "mask"] if t.inputs == "hits" else ["image"]



def random_inputs(t: Trained, n: int, seed: int = 0) -> list[np.ndarray]:
    """Realistic random model inputs of batch ``n`` (numpy, in ``input_names`` order).

    Images: ~2% of the pixels of every channel hold exponential energies, the rest zero; the
    data's deterministic preprocessing (zero_suppress, clip, log1p, resize, normalization)
    follows. Objects: standardized normal features, 1..N real objects per event, padding zeroed. Hit lists: the
    hits of such images (trainables.families.hit_transformer.hit_list).
    """
    from trainables.data.transforms import preprocess

    s = t.setup
    rng = np.random.default_rng(seed)
    x: np.ndarray | None  # (images: None when the preprocessing refuses the settings)
    if t.inputs == "objects":
        n_obj, n_feat = (int(v) for v in s.img_size)
        x = rng.normal(0.0, 1.0, (n, n_obj, n_feat)).astype(np.float32)
        n_real = rng.integers(1, n_obj + 1, n)
        n_real[0] = n_obj
        mask = np.arange(n_obj)[None, :] < n_real[:, None]
        x[~mask] = 0.0
        return [x, mask]
    C, (H, W) = int(s.in_chans), (int(v) for v in s.img_size)
    src = tuple(int(v) for v in (s.src_size or s.img_size))

    def sparse(shape):
        hits = rng.random(shape) < OCCUPANCY
        return np.where(hits, rng.exponential(1.0, shape), 0.0).astype(np.float32)

    try:
        x = preprocess(sparse((n, C, *src)), s, select=False)
    except Exception:  # noqa: BLE001 - inconsistent settings: normalization only
        x = None
    if x is None or x.shape != (n, C, H, W):
        x = sparse((n, C, H, W))
        if s.mean is not None and s.std is not None:
            x = (x - np.asarray(s.mean, np.float32).reshape(1, C, 1, 1)) / np.asarray(s.std, np.float32).reshape(1, C, 1, 1)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if t.inputs == "hits":
        from trainables.core.model import empty_pixel
        from trainables.families.hit_transformer import hit_list, input_hits

        return list(hit_list(x, empty_pixel(s), s.std, input_hits(t.model)))
    return [x]



def torch_forward(t: Trained, arrays: list[np.ndarray]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return t.model(*(torch.from_numpy(a) for a in arrays)).float().numpy()
