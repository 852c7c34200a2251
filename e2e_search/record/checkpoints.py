"""A trial's checkpoint as a model: fetched from a path, an MLflow run (its ``best_checkpoint`` artifact) or a
registered model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), rebuilt exactly as the worker loop built it
(``trainables.core.model.build_model``) and loaded in eval mode; realistic random inputs for it. Read by
``export`` (e2e_search/export/onnx.py) and ``report`` (its cost columns)."""

from __future__ import annotations

import dataclasses
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
    form: str = "preprocessed"
    """``raw``: ``model`` is the trained model wrapped in its preprocessing and output transform
    (trainables/inference.py) and takes rows as the data file holds them; ``preprocessed``: the model alone."""
    raw_row: tuple[int, ...] | None = None
    """``raw``: the shape of one row of the file's image dataset (its layout, every channel)."""
    dense: Any = None
    """``sparse`` (``inputs == "patches"``): the model with its own patch choice, which builds the patch list."""


INPUT_FORMS = ("auto", "raw", "preprocessed", "sparse")
"""``export --inputs``: auto is raw where the family can take raw rows, else its preprocessed form; sparse is the
form whose cost follows the hits (vit with token_keep nonempty: its patch list; hit_transformer: its hit list)."""


def as_raw(t: Trained, asked: str) -> Trained:
    """``t`` in the input form ``asked`` (INPUT_FORMS). Raises UserError (``--inputs``) when ``raw`` is asked of a
    model that cannot take raw rows (a hit-list family, a resize torch cannot replay)."""
    from trainables.inference import (
        PatchListModel,
        RawInputError,
        RawInputModel,
        Rebuilt,
        file_row_shape,
        kept_patches_vit,
    )

    if asked == "sparse":
        if t.inputs == "hits":
            return t
        if kept_patches_vit(t.model) is None:
            raise UserError(f"family '{t.family}' has no sparse form (vit with token_keep: nonempty exports its patch "
                            "list, hit_transformer its hit list); use --inputs auto, raw or preprocessed",
                            key="--inputs")
        return dataclasses.replace(t, model=PatchListModel(t.model).eval(), inputs="patches", form="sparse",
                                   dense=t.model)
    if asked == "preprocessed":
        return t
    try:
        wrapped = RawInputModel(Rebuilt(t.model, t.family, t.params, t.setup, t.inputs, t.epoch, t.metrics, t.data))
    except RawInputError as e:
        if asked == "raw":
            raise UserError(f"{e}", key="--inputs") from None
        return t
    wrapped.eval()
    return dataclasses.replace(t, model=wrapped, form="raw", raw_row=file_row_shape(t.setup))


def real_inputs(t: Trained, n: int) -> list[np.ndarray] | None:
    """Up to ``n`` rows of the search's data file (test split first) in the model's input form, or None when the
    file is not readable here."""
    from trainables.inference import raw_rows

    s = t.setup
    rows = (list(s.test) or list(s.val) or list(s.train) or list(range(n)))[:n]
    try:
        raw = raw_rows(s, rows)
    except (OSError, KeyError, ValueError):
        return None
    return inputs_of_rows(t, raw)


def inputs_of_rows(t: Trained, raw: list[np.ndarray]) -> list[np.ndarray]:
    """Rows as the data file holds them (trainables.inference.raw_rows) -> the model's inputs in ``t``'s form."""
    from trainables.data.transforms import preprocess, to_chw

    s = t.setup
    if t.form == "raw":
        return raw
    if t.inputs == "objects":
        x, mask = raw
        if s.mean is not None and s.std is not None:
            x = (x - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
        return [np.where(mask[..., None], x, 0).astype(np.float32), mask]
    x = preprocess(to_chw(raw[0], s.layout), s)
    if t.inputs == "patches":
        return _patch_form(t, x)
    if t.inputs == "hits":
        from trainables.core.model import empty_pixel
        from trainables.families.hit_transformer import hit_list, input_hits

        return list(hit_list(x, empty_pixel(s), s.std, input_hits(t.model)))
    return [x]



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



def log_beside(source: str, tracking_uri: str | None, path: Path) -> str | None:
    """Log file ``path`` (an exported ONNX file) to the run that ``source`` (a run id or models:/ URI) names, under
    ``onnx/``, beside its ``model/`` and ``best_checkpoint/``. Returns the run id, or None for a file source."""
    if not (source.startswith("models:/") or _RUN_ID.match(source)):
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_store_uri(tracking_uri))
    rid: str | None
    if _RUN_ID.match(source):
        rid = source
    else:
        body = source.removeprefix("models:/")
        name, ref = body.rsplit("@", 1) if "@" in body else body.rsplit("/", 1)
        mv = client.get_model_version_by_alias(name, ref) if "@" in body else client.get_model_version(name, ref)
        rid = mv.run_id
    if rid:
        client.log_artifact(rid, str(path), artifact_path="onnx")
    return rid or None


# --------------------------------------------------------------------------- checkpoint -> model
def load_trained(path: Path, desc: str) -> Trained:
    """The model of checkpoint ``path`` as the worker loop built it (trainables.inference.rebuild); a checkpoint
    that cannot be read or rebuilt is a UserError naming SOURCE (``desc`` says where it came from)."""
    from trainables.core.checkpoint import CheckpointError, TrialCheckpoint
    from trainables.inference import rebuild

    try:
        r = rebuild(path)
    except CheckpointError as e:
        raise UserError(f"'{desc}' {e}; give a trial's checkpoint.pt" if not str(e).startswith("the checkpoint")
                        else f"'{desc}': {e}", key="SOURCE") from None
    except UserError as e:
        raise UserError(f"'{desc}': {e.message}", key="SOURCE") from None
    except RuntimeError as e:  # load_state_dict: names or shapes that do not fit
        raise UserError(f"the weights of '{desc}' do not fit the {TrialCheckpoint.load(path).family} model rebuilt "
                        f"from its params ({first_line(e)[:300]})", key="SOURCE") from None
    except Exception as e:  # noqa: BLE001 - pydantic/ValueError from a family's build
        raise UserError(f"cannot rebuild family '{TrialCheckpoint.load(path).family}' from the checkpoint's params "
                        f"({first_line(e)[:300]})", key="SOURCE") from None
    return Trained(model=r.model, family=r.family, inputs=r.inputs, params=r.params, data=r.data, setup=r.setup,
                   epoch=r.epoch, metrics=r.metrics, source=desc)



# --------------------------------------------------------------------------- inputs
def input_names(t: Trained) -> list[str]:
    if t.inputs == "patches":
        return ["patches", "index", "valid"]
    return ["objects", "mask"] if t.inputs == "objects" else ["hits", "mask"] if t.inputs == "hits" else ["image"]






def _patch_form(t: Trained, images: np.ndarray) -> list[np.ndarray]:
    from trainables.inference import patch_list

    return patch_list(t.dense, images)


def random_inputs(t: Trained, n: int, seed: int = 0) -> list[np.ndarray]:
    """Realistic random inputs of batch ``n`` in ``t``'s input form (see :func:`random_model_inputs`); for the raw
    form, rows shaped as the file's with ~2% of the pixels holding exponential energies (object lists: normal
    features, 1..N real objects)."""
    if t.form == "sparse" and t.inputs == "patches":
        return _patch_form(t, random_model_inputs(dataclasses.replace(t, inputs="image"), n, seed)[0])
    if t.form != "raw":
        return random_model_inputs(t, n, seed)
    rng = np.random.default_rng(seed)
    shape = (n, *(t.raw_row or ()))
    if t.inputs == "objects":
        n_obj = shape[1]
        x = rng.normal(0.0, 1.0, shape).astype(np.float32)
        mask = np.arange(n_obj)[None, :] < rng.integers(1, n_obj + 1, n)[:, None]
        return [np.where(mask[..., None], x, 0).astype(np.float32), mask]
    hits = rng.random(shape) < OCCUPANCY
    return [np.where(hits, rng.exponential(1.0, shape), 0.0).astype(np.float32)]


def random_model_inputs(t: Trained, n: int, seed: int = 0) -> list[np.ndarray]:
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
