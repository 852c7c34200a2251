"""Champions where physicists use them (issue 28): ONNX that takes rows as the data file holds them and answers in
probabilities or physical units; a registered champion that is a real MLflow Model (pyfunc), loadable by
``mlflow.pyfunc.load_model`` and ``mlflow models predict``; the bad inputs of both, one line each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from e2e_search.cli import main
from tests.conftest import base_config, write_e2e, write_objects, write_yaml
from tests.test_export import IMAGE, OBJECTS, VIT, make_checkpoint, run_export
from trainables.data.transforms import preprocess, to_chw


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _reference(model: torch.nn.Module, data: dict, rows: np.ndarray) -> np.ndarray:
    """What training saw (trainables.data.transforms.preprocess, numpy), the model, then the task's output."""
    x = preprocess(to_chw(rows, data["layout"]), data)
    with torch.inference_mode():
        out = model(torch.from_numpy(x)).numpy()
    if data["task"] == "classification":
        e = np.exp(out - out.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return out[:, 0] * data["target_std"] + data["target_mean"]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_raw_export_takes_the_files_rows(tmp_path, capsys, task):
    """Channel selection, zero suppression, log1p, a centre crop and the normalization run inside the graph: the
    file's rows in, probabilities (or the mass in GeV) out, equal to the training path's numpy preprocessing."""
    path = write_e2e(tmp_path / "jets.h5", n=40, size=16, channels=3)
    data = {**IMAGE, "path": str(path), "img_size": (12, 12), "src_size": (16, 16), "resize": [12, 12],
            "zero_suppress": 0.05, "log1p": True}
    if task == "regression":
        data.update(task="regression", num_classes=0, target_mean=120.0, target_std=30.0)
    ckpt, model = make_checkpoint(tmp_path / "trial", "vit", {**VIT, "patch_size": 4}, data)
    out = tmp_path / "raw.onnx"
    code, stdout, stderr = run_export(capsys, ckpt, out, "--inputs", "auto")
    assert code == 0, stderr
    assert "raw image (batch, 16, 16, 3)" in stdout and "rows of the data file" in stdout
    meta = _meta(out)
    assert meta["e2e.input_form"] == "raw" and meta["e2e.file_key"] == "X_jets"
    assert meta["e2e.file_layout"] == "channels_last" and "channels [0, 2]" in meta["e2e.input_layout"]
    rows = np.asarray(h5py.File(path)["X_jets"][:9], np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["output"], {"image": rows})[0]
    ref = _reference(model, data, rows)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4
    if task == "classification":
        assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)
    else:
        assert "physical units" in meta["e2e.outputs"] and 0 < np.abs(got).max() < 1e4


def test_raw_export_of_object_lists_standardizes_inside(tmp_path, capsys):
    path = write_objects(tmp_path / "events.h5", n=30)
    data = {**OBJECTS, "path": str(path)}
    ckpt, model = make_checkpoint(tmp_path / "trial", "deepsets", {"hidden": 8}, data)
    out = tmp_path / "ds.onnx"
    code, stdout, stderr = run_export(capsys, ckpt, out, "--inputs", "auto")
    assert code == 0, stderr
    with h5py.File(path) as f:
        x, mask = np.asarray(f["X_objects"][:7], np.float32), np.asarray(f["mask"][:7], bool)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["output"], {"objects": x, "mask": mask})[0]
    z = np.where(mask[..., None], (x - np.float32(data["mean"])) / np.float32(data["std"]), 0).astype(np.float32)
    with torch.inference_mode():
        logits = model(torch.from_numpy(z), torch.from_numpy(mask)).numpy()
    ref = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.abs(got - ref).max() <= 1e-4 and _meta(out)["e2e.input_form"] == "raw"


def test_preprocessed_form_and_hit_lists(tmp_path, capsys):
    """``--inputs preprocessed`` keeps the model's own input and logits; a hit-list family exports its hit list
    by default, and refuses ``--inputs raw`` in one line (exit 2, nothing written)."""
    ckpt, _ = make_checkpoint(tmp_path / "vit", "vit", VIT, IMAGE)
    code, _, stderr = run_export(capsys, ckpt, tmp_path / "pre.onnx", "--inputs", "preprocessed", "--runs", "0")
    assert code == 0, stderr and _meta(tmp_path / "pre.onnx")["e2e.input_form"] == "preprocessed"
    hit = {"max_hits": 16, "depth": 1, "embed_dim": 16, "num_heads": 2}
    ckpt, _ = make_checkpoint(tmp_path / "hits", "hit_transformer", hit, IMAGE)
    code, stdout, stderr = run_export(capsys, ckpt, tmp_path / "hits.onnx", "--runs", "0", "--inputs", "auto")
    assert code == 0, stderr
    assert "hits (batch, 16, 4)" in stdout and _meta(tmp_path / "hits.onnx")["e2e.input_form"] == "preprocessed"
    out = tmp_path / "refused.onnx"
    code, _, stderr = run_export(capsys, ckpt, out, "--inputs", "raw")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--inputs" in stderr and "hit list" in stderr
    assert not out.exists()


def test_unknown_input_form_is_one_line(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "vit", "vit", VIT, IMAGE)
    out = tmp_path / "x.onnx"
    code, _, stderr = run_export(capsys, ckpt, out, "--inputs", "raww")
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "--inputs" in stderr and "did you mean 'raw'" in stderr and not out.exists()


def test_champion_is_an_mlflow_model(tmp_path, capsys, monkeypatch, ray_local):
    """A search's champion loads with mlflow.pyfunc and `mlflow models predict --env-manager local`, takes the
    file's rows, and gives the probabilities `e2e-search export` + onnxruntime gives on the same rows."""
    import mlflow

    data = write_e2e(tmp_path / "jets.h5", n=48, size=16)
    cfg = base_config(tmp_path, data, name="champ", data={"path": str(data), "val_fraction": 0.25,
                                                             "test_fraction": 0.25})
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(write_yaml(tmp_path / "s.yaml", cfg))]) == 0
    capsys.readouterr()
    uri = cfg["tracking"]["uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/champ-classifier@champion")
    sig = model.metadata.signature
    assert sig is not None and list(sig.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 16, 16, 3]
    rows = np.asarray(h5py.File(data)["X_jets"][:8], np.float32)
    probs = model.predict(rows)
    assert probs.shape == (8, 2) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    out = tmp_path / "champ.onnx"
    code, _, stderr = run_export(capsys, "models:/champ-classifier@champion", out, "--tracking-uri", uri, "--runs", "0",
                                 "--inputs", "auto")
    assert code == 0, stderr
    onnx_probs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["output"], {"image": rows})[0]
    assert np.abs(onnx_probs - probs).max() <= 1e-4
    client = mlflow.tracking.MlflowClient()
    mv = client.get_model_version_by_alias("champ-classifier", "champion")
    logged = {a.path for a in client.list_artifacts(mv.run_id, "onnx")}
    assert logged == {"onnx/champ.onnx"}  # the ONNX file beside the MLflow Model it was exported from
    (tmp_path / "in.json").write_text(json.dumps({"inputs": rows[:2].tolist()}))
    cli = subprocess.run([sys.executable, "-m", "mlflow", "models", "predict", "-m", "models:/champ-classifier@champion",
                          "--env-manager", "local", "-i", str(tmp_path / "in.json"), "-t", "json"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert cli.returncode == 0, cli.stderr[-2000:]
    served = np.asarray(json.loads(cli.stdout.strip().splitlines()[-1])["predictions"])
    assert np.abs(served - probs[:2]).max() <= 1e-5


def test_sparse_export_of_kept_patches_follows_the_hits(tmp_path, capsys):
    """vit with token_keep: nonempty exports its patch list (a dynamic token count): fed the non-empty patches of
    each image it gives the dense model's answer, at a cost that follows the hits."""
    from trainables.inference import patch_list

    rng = np.random.default_rng(0)
    X = np.zeros((20, 40, 40, 2), np.float32)
    for i in range(20):
        X[i, rng.integers(0, 40, 8 + i), rng.integers(0, 40, 8 + i), rng.integers(0, 2, 8 + i)] = 4.0
    path = tmp_path / "sparse.h5"
    with h5py.File(path, "w") as f:
        f["X_jets"], f["y"] = X, np.arange(20) % 2
    data = {**IMAGE, "path": str(path), "channels": [0, 1], "img_size": (40, 40), "mean": [0.1, 0.1], "std": [1.0, 1.0]}
    params = {"patch_size": 5, "depth": 1, "embed_dim": 16, "num_heads": 2, "token_keep": "nonempty"}
    ckpt, model = make_checkpoint(tmp_path / "trial", "vit", params, data)
    code, stdout, stderr = run_export(capsys, ckpt, tmp_path / "sparse.onnx", "--inputs", "sparse", "--runs", "0")
    assert code == 0, stderr
    assert "patches (batch, tokens, C*p*p)" in stdout and _meta(tmp_path / "sparse.onnx")["e2e.input_form"] == "sparse"
    code, _, stderr = run_export(capsys, ckpt, tmp_path / "dense.onnx", "--inputs", "raw", "--runs", "0")
    assert code == 0, stderr
    sparse = ort.InferenceSession(str(tmp_path / "sparse.onnx"), providers=["CPUExecutionProvider"])
    dense = ort.InferenceSession(str(tmp_path / "dense.onnx"), providers=["CPUExecutionProvider"])
    for rows in (X[:1], X[3:9]):
        feed = dict(zip(["patches", "index", "valid"], patch_list(model, preprocess(to_chw(rows, "channels_last"), data))))
        assert feed["patches"].shape[1] < 64  # a few of the 64 patches hold hits
        logits = sparse.run(["output"], feed)[0]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        assert np.abs(probs - dense.run(["output"], {"image": rows})[0]).max() <= 1e-4
    ckpt, _ = make_checkpoint(tmp_path / "resnet", "resnet15", {"width": 4, "blocks": 1}, IMAGE)
    code, _, stderr = run_export(capsys, ckpt, tmp_path / "no.onnx", "--inputs", "sparse")
    assert code == 2 and "no sparse form" in stderr and not (tmp_path / "no.onnx").exists()
