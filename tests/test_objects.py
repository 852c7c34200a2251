"""Event-level object lists: generator files and HIGGS-style CSV behind the one dataset interface."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from e2e_search.cli import main
from e2e_search.config import validate
from e2e_search.data import inspect
from e2e_search.formats import materialize
from e2e_search.objects import ObjectDataset, higgs_objects
from tests.conftest import base_config, write_objects, write_yaml


def write_higgs_csv(path, n=60, seed=0, header=False):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    feats = rng.normal(0, 1, (n, 28))
    feats[:, 0] += 2.0 * y
    text = "\n".join(",".join(f"{v:.6f}" for v in row) for row in np.column_stack([y, feats]))
    path.write_text(("label," + ",".join(f"f{i}" for i in range(28)) + "\n" if header else "") + text + "\n")
    return path, y, feats


def _cfg(tmp_path, data_path, **data):
    cfg = base_config(tmp_path, data_path, family="deepsets",
                      data={"path": str(data_path), "image_key": "X_objects", "val_fraction": 0.25,
                            "test_fraction": 0.0, **data})
    cfg["params"] = {"hidden": 16, "depth": 1, "batch_size": 8}
    return cfg


def test_objects_dataset_masks_padding_and_standardizes(tmp_path):
    path = write_objects(tmp_path / "ev.h5")
    setup = inspect(validate(_cfg(tmp_path, path), source="t"))
    assert setup.kind == "objects" and setup.img_size == (6, 4) and len(setup.mean) == 4
    ds = ObjectDataset(setup, setup.train)
    (x, mask), y = ds[0]
    assert x.shape == (6, 4) and mask.dtype == torch.bool
    xs = torch.stack([ds[i][0][0] for i in range(len(ds))])
    ms = torch.stack([ds[i][0][1] for i in range(len(ds))])
    assert (xs[~ms] == 0).all() and (~ms).any()
    assert xs[ms].mean(0).abs().max() < 0.3


@pytest.mark.parametrize("header", [False, True])
def test_higgs_csv_becomes_objects(tmp_path, monkeypatch, header):
    monkeypatch.chdir(tmp_path)
    path, y, feats = write_higgs_csv(tmp_path / "higgs.csv", header=header)
    cfg = validate(_cfg(tmp_path, path), source="t")
    cached = materialize(cfg)
    with h5py.File(cached.data.path) as f:
        assert np.allclose(f["X_objects"][...], higgs_objects(feats), atol=1e-5)
        assert (f["y"][...] == y).all() and f["X_features"].shape == (60, 28)
    assert inspect(cached).img_size == (6, 4)
    mtime = (tmp_path / cached.data.path).stat().st_mtime_ns
    assert materialize(cfg).data.path == cached.data.path  # reused
    assert (tmp_path / cached.data.path).stat().st_mtime_ns == mtime


@pytest.mark.parametrize("content,needle", [
    ("", "empty"),
    ("1,2,3\n0,1,2\n", "columns"),
    ("1," + ",".join(["0.5"] * 21) + "\n0," + ",".join(["nan"] * 21) + "\n", "row 2"),
])
def test_bad_csv(tmp_path, monkeypatch, capsys, content, needle):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    yml = write_yaml(tmp_path / "s.yaml", _cfg(tmp_path, bad))
    assert main(["run", str(yml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "data.path" in err[0]
    assert not (tmp_path / "e2e_runs").exists()


def test_family_and_data_kind_must_match(tmp_path, capsys):
    from tests.conftest import write_e2e

    objects = write_objects(tmp_path / "ev.h5")
    images = write_e2e(tmp_path / "img.h5", n=20)
    yml = write_yaml(tmp_path / "a.yaml", base_config(tmp_path, objects, data={"path": str(objects), "image_key": "X_objects"}))
    assert main(["validate", str(yml)]) == 2
    assert "objects family" in capsys.readouterr().err
    yml = write_yaml(tmp_path / "b.yaml", _cfg(tmp_path, images, image_key="X_jets"))
    assert main(["validate", str(yml)]) == 2
    assert "image family" in capsys.readouterr().err


def test_deepsets_search_on_csv_and_generated_objects(tmp_path, monkeypatch, ray_local):
    from e2e_search.physics.generate import GenSpec, generate

    monkeypatch.chdir(tmp_path)
    csv, _, _ = write_higgs_csv(tmp_path / "higgs.csv", n=60)
    gen = tmp_path / "ev.h5"
    generate(GenSpec(process="event_objects", n=40, out=str(gen), seed=4, workers=2), progress=False)
    yml = write_yaml(tmp_path / "s.yaml", _cfg(tmp_path, csv) | {"search": {"num_samples": 1},
                                                                 "scheduler": {"type": "none", "max_epochs": 1}})
    assert main(["run", str(yml)]) == 0
    assert main(["run", str(yml), "--set", f"data.path={gen}", "--set", "name=gen_objects"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for exp in ("t", "gen_objects"):
        runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id],
                                  filter_string="tags.`e2e.kind` = 'trial'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "best_val_auc" in runs[0].data.metrics
