"""Event-level object lists: generator files and HIGGS-style CSV behind the one dataset interface."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from e2e_search.cli import main
from e2e_search.data.formats import materialize
from e2e_search.data.inspect import inspect
from e2e_search.data.objects import higgs_objects
from e2e_search.spec.loader import validate
from tests.conftest import base_config, write_objects, write_yaml
from trainables.data.object_lists import ObjectDataset


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
    from e2e_search.data.physics.generate import GenSpec, generate

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


# --- issue 13: CSV files as they are distributed (compression, byte-order marks, CRLF, header or not)
def _csv_bytes(rows: np.ndarray, *, header: list[str] | None = None, sep: str = ",", eol: str = "\n",
               fmt: str = "{:.18e}") -> str:
    lines = ([sep.join(header)] if header else []) + [sep.join(fmt.format(v) for v in row) for row in rows]
    return eol.join(lines) + eol


def _compress(path, text: str, compression: str | None, encoding: str = "utf-8"):
    import bz2
    import gzip
    import lzma
    import zipfile

    data = text.encode(encoding)
    if compression == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("HIGGS.csv", data)
        return path
    path.write_bytes({None: lambda b: b, "gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[compression](data))
    return path


STYLES = {  # name: (header, label column, separator, line end, encoding)
    "higgs": (False, 0, ",", "\n", "utf-8"),               # HIGGS.csv.gz: no header, label first as 1.000e+00
    "header-crlf-bom": (True, 0, ",", "\r\n", "utf-8-sig"),  # Excel's "CSV UTF-8"
    "header-label-last": (True, -1, ",", "\n", "utf-8"),     # the header names the label column (data.label_key)
    "utf16-header": (True, 0, ",", "\r\n", "utf-16"),         # Excel's "Unicode text" with commas
    "tab-no-header": (False, 0, "\t", "\n", "utf-8"),
}


@pytest.mark.parametrize("compression, suffix", [(None, ".csv"), ("gzip", ".csv.gz"), ("bz2", ".csv.bz2"),
                                                 ("xz", ".csv.xz"), ("zip", ".csv.zip"), ("gzip", ".csv")],
                         ids=["plain", "gz", "bz2", "xz", "zip", "gz-named-csv"])
@pytest.mark.parametrize("style", list(STYLES))
def test_csv_as_distributed_keeps_every_row(tmp_path, monkeypatch, compression, suffix, style):
    """Every data row becomes a sample (none lost to a header guess, no header read as data); the label is
    the first column, or the one a header names data.label_key; nothing is written before the checks pass."""
    header, col, sep, eol, enc = STYLES[style]
    monkeypatch.chdir(tmp_path)
    n = 50
    rng = np.random.default_rng(1)
    y = (np.arange(n) % 2).astype(float)
    feats = rng.normal(0, 1, (n, 28))
    rows = np.column_stack([feats, y] if col == -1 else [y, feats])
    names = None
    if header:
        names = [f"f{i}" for i in range(28)]
        names = names + ["y"] if col == -1 else ["label"] + names
    path = _compress(tmp_path / f"HIGGS{suffix}", _csv_bytes(rows, header=names, sep=sep, eol=eol), compression, enc)
    cfg = validate(_cfg(tmp_path, path), source="t")
    assert materialize(cfg, generate=False) is None  # validate / --dry-run: checked, nothing written
    assert not (tmp_path / "e2e_runs").exists()
    cached = materialize(cfg)
    with h5py.File(cached.data.path) as f:
        assert f["y"].dtype == np.int64 and (f["y"][...] == y).all()
        assert f["X_features"].shape == (n, 28)
        assert np.allclose(f["X_features"][...], feats, atol=1e-6)
        assert np.allclose(f["X_objects"][...], higgs_objects(feats), atol=1e-5)
    setup = inspect(cached)
    assert len(setup.train) + len(setup.val) + len(setup.test) == n


def test_csv_header_rule(tmp_path):
    """A first line with no number is a header; one with any number is data (bad cells are refused, not skipped)."""
    from e2e_search.data.objects import _sniff_csv

    for text, header in [("label,a,b\n1,2,3\n", True), ("1,2,3\n0,1,2\n", False), (",a,b\n0,1,2\n", True),
                         ("1.0e+00,nan,-inf\n", False), ("y,1,2\n0,1,2\n", False), ('"y","a"\n1,2\n', True),
                         ("\ufeffy;a;b\r\n1;2;3\r\n", True), ("1 2 3\n", False)]:
        p = tmp_path / "t.csv"
        p.write_text(text, encoding="utf-8")
        assert _sniff_csv(p)[2] is header, text
