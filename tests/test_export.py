"""``e2e-search export``: trial checkpoints (file, MLflow run, registered model) -> ONNX, checked in onnxruntime.

Real small models of every family, real checkpoint files in the worker loop's format, a real
MLflow SQLite store; no Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from e2e_search.cli import main
from trainables.core.layout import CHECKPOINT_FILE
from trainables.core.model import build_model
from trainables.data.setup import DataSetup

IMAGE = dict(path="jets.h5", image_key="X_jets", label_key="y", layout="channels_last", channels=[0, 2], in_chans=2,
             img_size=(32, 32), task="classification", num_classes=2, mean=[0.05, 0.1], std=[0.5, 2.0])
OBJECTS = dict(path="events.h5", image_key="X_objects", label_key="y", layout="objects", channels=[0, 1, 2, 3],
               in_chans=4, img_size=(6, 4), task="classification", num_classes=2, mean=[1.0, 0.0, 0.0, 0.5],
               std=[2.0, 1.0, 1.5, 0.5], kind="objects", mask_key="mask")
VIT = {"patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}

CASES = {
    "vit": ("vit", VIT, IMAGE),
    "vit_linear": ("vit", {**VIT, "attention": "linear"}, IMAGE),
    "vit_window": ("vit", {**VIT, "patch_size": 4, "attention": "window", "window_size": 3}, IMAGE),
    "resnet15": ("resnet15", {"width": 4, "blocks": 2}, IMAGE),
    "mae": ("mae", {"patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2, "decoder_dim": 8}, IMAGE),
    "swin": ("swin", {"patch_size": 4, "embed_dim": 16, "stages": 2, "depth": 1, "num_heads": 2, "window_size": 4},
             IMAGE),
    "cait": ("cait", {"patch_size": 8, "embed_dim": 16, "depth": 1, "class_attn_layers": 1, "num_heads": 2}, IMAGE),
    "hybrid_vit": ("hybrid_vit", {"stem_channels": 8, "stem_layers": 1, "stem_stride": 2, "patch_size": 4, "depth": 1,
                                  "embed_dim": 16, "num_heads": 2}, IMAGE),
    "event_transformer": ("event_transformer", {"embed_dim": 16, "depth": 1, "num_heads": 2}, OBJECTS),
    "deepsets": ("deepsets", {"hidden": 8, "set_pool": "max"}, OBJECTS),
}


def make_checkpoint(folder: Path, family: str, params: dict, data: dict, **data_over) -> tuple[Path, torch.nn.Module]:
    """A checkpoint.pt as the worker loop writes it, of a small model with non-trivial weights and BN statistics."""
    data = {**data, **data_over}
    setup = DataSetup(**data, train=[], val=[], test=[])
    torch.manual_seed(0)
    model = build_model(family, params, setup)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.2)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "epoch": 3, "family": family,
                "params": params, "data": data, "metrics": {"val_loss": 0.5, "val_auc": 0.8}}, path)
    return path, model


def random_feed(sess: ort.InferenceSession, data: dict, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if data.get("kind") == "objects":
        x = rng.normal(0, 1, (n, *data["img_size"])).astype(np.float32)
        mask = rng.random((n, data["img_size"][0])) < 0.7
        mask[:, 0] = True
        x[~mask] = 0
        return {"objects": x, "mask": mask}
    x = np.where(rng.random((n, data["in_chans"], *data["img_size"])) < 0.05,
                 rng.exponential(1.0, (n, data["in_chans"], *data["img_size"])), 0).astype(np.float32)
    return {"image": x}


def check_onnx(out: Path, model: torch.nn.Module, data: dict, family: str) -> None:
    assert out.is_file()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["output"]
    for n in (1, 17):
        feed = random_feed(sess, data, n, seed=n)
        with torch.inference_mode():
            ref = model(*(torch.from_numpy(v) for v in feed.values())).numpy()
        got = sess.run(["output"], feed)[0]
        assert got.shape == (n, data["num_classes"] if data["task"] == "classification" else 1)
        assert np.abs(got - ref).max() <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["e2e.family"] == family and meta["e2e.task"] == data["task"]
    assert meta["e2e.num_classes"] == str(data["num_classes"])
    assert {"e2e.target_mean", "e2e.target_std", "e2e.input_layout", "e2e.data", "e2e.mean"} <= set(meta)


def run_export(capsys, source, out: Path, *extra: str) -> tuple[int, str, str]:
    """``e2e-search export``; the model's own input form unless ``extra`` names one (these tests feed the model's
    preprocessed input; tests/test_champions.py tests the raw form, the default)."""
    form = [] if "--inputs" in extra else ["--inputs", "preprocessed"]
    code = main(["export", str(source), "--format", "onnx", "--out", str(out), "--runs", "3", *form, *extra])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("case", list(CASES))
def test_export_every_family(tmp_path, capsys, case):
    family, params, data = CASES[case]
    ckpt, model = make_checkpoint(tmp_path / "trial", family, params, data)
    out = tmp_path / f"{case}.onnx"
    code, stdout, stderr = run_export(capsys, ckpt, out)
    assert code == 0, stderr
    assert "parity" in stdout and "onnxruntime" in stdout and "pytorch eager" in stdout
    check_onnx(out, model, data, family)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_export_regression_metadata_and_folder_source(tmp_path, capsys):
    data = {**IMAGE, "task": "regression", "num_classes": 0, "target_mean": 120.0, "target_std": 30.0,
            "label_key": "m0", "log1p": True}
    ckpt, model = make_checkpoint(tmp_path / "trial", "resnet15", {"width": 4, "blocks": 1}, data)
    out = tmp_path / "reg.onnx"
    code, _, stderr = run_export(capsys, ckpt.parent, out, "--runs", "0")  # a folder holding checkpoint.pt
    assert code == 0, stderr
    check_onnx(out, model, data, "resnet15")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["e2e.target_mean"] == "120" and meta["e2e.target_std"] == "30"
    assert "output * 30 + 120" in meta["e2e.outputs"] and "log1p" in meta["e2e.input_layout"]


def test_dynamo_exporter(tmp_path, capsys):
    ckpt, model = make_checkpoint(tmp_path / "trial", "deepsets", {"hidden": 8}, OBJECTS)
    out = tmp_path / "ds.onnx"
    code, stdout, stderr = run_export(capsys, ckpt, out, "--exporter", "dynamo", "--runs", "0")
    assert code == 0, stderr
    assert "dynamo exporter" in stdout
    check_onnx(out, model, OBJECTS, "deepsets")


# --------------------------------------------------------------------------- MLflow sources
@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A real SQLite MLflow store with a trial run per family (vit, resnet15) and a champion alias for each."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("jets", artifact_location=(root / "artifacts").as_uri())
    runs = {}
    for case in ("vit", "resnet15"):
        family, params, data = CASES[case]
        ckpt, model = make_checkpoint(root / case, family, params, data)
        run = client.create_run(exp, tags={"e2e.kind": "trial", "e2e.family": family})
        rid = run.info.run_id
        client.log_artifact(rid, str(ckpt), artifact_path="best_checkpoint")
        client.set_terminated(rid)
        name = f"jets-{case}-classifier"
        client.create_registered_model(name)
        mv = client.create_model_version(name, source=f"runs:/{rid}/best_checkpoint", run_id=rid)
        client.set_registered_model_alias(name, "champion", mv.version)
        runs[case] = (rid, name, model, data)
    return uri, runs


@pytest.mark.parametrize("case", ["vit", "resnet15"])
def test_export_from_mlflow_run_and_alias(tmp_path, capsys, mlflow_store, case):
    uri, runs = mlflow_store
    rid, name, model, data = runs[case]
    for i, source in enumerate((rid, f"models:/{name}@champion")):
        out = tmp_path / f"{case}-{i}.onnx"
        code, stdout, stderr = run_export(capsys, source, out, "--tracking-uri", uri, "--runs", "0")
        assert code == 0, stderr
        assert rid in stdout
        check_onnx(out, model, data, CASES[case][0])


# --------------------------------------------------------------------------- refusals
def _one_line_error(code: int, stderr: str, out: Path, *words: str) -> None:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_missing_path(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, _, stderr = run_export(capsys, tmp_path / "nope" / "checkpoint.pt", out)
    _one_line_error(code, stderr, out, "not found")


def test_garbage_file(tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00garbage, not a checkpoint" * 10)
    out = tmp_path / "m.onnx"
    code, _, stderr = run_export(capsys, bad, out)
    _one_line_error(code, stderr, out, "not a PyTorch checkpoint")


def test_not_a_trial_checkpoint(tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    out = tmp_path / "m.onnx"
    code, _, stderr = run_export(capsys, bad, out)
    _one_line_error(code, stderr, out, "not an e2e-search trial checkpoint")


def test_unknown_run_id_and_alias(tmp_path, capsys, mlflow_store):
    uri, _ = mlflow_store
    out = tmp_path / "m.onnx"
    code, _, stderr = run_export(capsys, "0123456789abcdef0123456789abcdef", out, "--tracking-uri", uri)
    _one_line_error(code, stderr, out, "no run")
    code, _, stderr = run_export(capsys, "models:/jets-vit-classifier@nosuch", out, "--tracking-uri", uri)
    _one_line_error(code, stderr, out, "no registered model version")


def test_unknown_format(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "trial", "deepsets", {"hidden": 8}, OBJECTS)
    out = tmp_path / "m.tflite"
    code = main(["export", str(ckpt), "--format", "tflite", "--out", str(out)])
    _one_line_error(code, capsys.readouterr().err, out, "unknown format 'tflite'")


def test_exporter_failure_is_a_refusal(tmp_path, capsys, monkeypatch):
    """A model neither exporter can convert (an op without ONNX counterpart): one line naming family and reasons."""
    import trainables.families.deepsets as ds

    ckpt, _ = make_checkpoint(tmp_path / "trial", "deepsets", {"hidden": 8}, OBJECTS)
    out = tmp_path / "m.onnx"
    original = ds.DeepSets.forward

    def forward(self, x, mask):  # torch.linalg.eigvals has no ONNX export in either exporter
        return original(self, x, mask) + torch.linalg.eigvals(x[:, :4, :4]).real.sum(-1, keepdim=True)

    monkeypatch.setattr(ds.DeepSets, "forward", forward)
    code, _, stderr = run_export(capsys, ckpt, out)
    _one_line_error(code, stderr, out, "cannot export family 'deepsets'", "torchscript exporter", "dynamo exporter")


def test_parity_failure_is_a_refusal(tmp_path, capsys):
    """Logits of ~1e6 (a head scaled up): float32 rounding alone exceeds the 1e-4 limit, so nothing is written."""
    family, params, data = CASES["resnet15"]
    ckpt, _ = make_checkpoint(tmp_path / "trial", family, params, data)
    state = torch.load(ckpt, weights_only=True)
    state["model"]["9.weight"] *= 1e6  # the final Linear of this resnet15
    torch.save(state, ckpt)
    out = tmp_path / "m.onnx"
    code, _, stderr = run_export(capsys, ckpt, out, "--exporter", "torchscript")
    _one_line_error(code, stderr, out, "cannot export family 'resnet15'", "differs from PyTorch", "limit 0.0001")


# --------------------------------------------------------------------------- --opset (issue 13, case 7)
def _file_opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("case, exporter, opset", [
    ("vit", "torchscript", 14),  # the lowest the TorchScript exporter writes for scaled_dot_product_attention
    ("vit", "dynamo", 17),  # the dynamo exporter builds 18 and down-converts (LayerNormalization exists from 17)
    ("resnet15", "auto", 9),
    ("deepsets", "dynamo", 21),  # above the dynamo exporter's own 18
])
def test_opset_is_written_exactly(tmp_path, capsys, case, exporter, opset):
    family, params, data = CASES[case]
    ckpt, model = make_checkpoint(tmp_path / "trial", family, params, data)
    out = tmp_path / "m.onnx"
    code, stdout, stderr = run_export(capsys, ckpt, out, "--exporter", exporter, "--opset", str(opset), "--runs", "0")
    assert code == 0, stderr
    assert _file_opset(out) == opset
    assert f"opset {opset})" in stdout
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["e2e.opset"] == str(opset)
    check_onnx(out, model, data, family)


def test_opset_too_old_names_the_operator_and_the_lowest_that_works(tmp_path, capsys):
    """`--opset 13` on a ViT wrote opset 18 (the TorchScript exporter refused 13, the dynamo exporter ignored it)."""
    ckpt, _ = make_checkpoint(tmp_path / "trial", "vit", VIT, IMAGE)
    out = tmp_path / "m.onnx"
    code, _, stderr = run_export(capsys, ckpt, out, "--opset", "13")
    _one_line_error(code, stderr, out, "--opset", "cannot write opset 13 for family 'vit'",
                    "operator aten::scaled_dot_product_attention needs opset 14",
                    "LayerNormalization needs opset 17", "the lowest opset that works is 14 (torchscript exporter)",
                    "use --opset 14 or higher")


@pytest.mark.parametrize("family, args, says", [
    # the dynamo exporter cannot convert LayerNormalization below 17: refused with 17, its lowest
    ("deepsets", ["--exporter", "dynamo", "--opset", "16"],
     ["dynamo exporter", "LayerNormalization needs opset 17", "the lowest opset that works is 17 (dynamo exporter)"]),
    # newer than the TorchScript exporter knows
    ("resnet15", ["--exporter", "torchscript", "--opset", "24"],
     ["does not write opset 24", "use a lower --opset or --exporter dynamo"]),
], ids=["dynamo-only-refusal", "newer-than-torchscript-knows"])
def test_opset_refused_by_one_exporter(tmp_path, capsys, family, args, says):
    family, params, data = CASES[family]
    ckpt, _ = make_checkpoint(tmp_path / "trial", family, params, data)
    out = tmp_path / "m.onnx"
    code, _, stderr = run_export(capsys, ckpt, out, *args)
    _one_line_error(code, stderr, out, "--opset", *says)
