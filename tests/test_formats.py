"""Parquet and ROOT inputs: converted once to an E2E HDF5 cache, checked like HDF5 (no Ray here).

Files are written in tmp_path with pyarrow (nested lists, the CMS parquet
layout) and uproot (a TTree with a fixed-size float[C][H][W] branch), from the
same arrays as an E2E HDF5 file written by ``conftest.write_e2e``.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uproot

from e2e_search.cli import main
from e2e_search.data import formats
from e2e_search.data.formats import materialize
from e2e_search.data.inspect import inspect
from e2e_search.spec.loader import validate
from tests.conftest import base_config, write_e2e, write_yaml

N = 40
FLOAT32 = pa.float32()  # the default leaf type of the writers


# --------------------------------------------------------------------------- writers
def reference(tmp: Path, n: int = N, size: int = 16, channels: int = 3, seed: int = 0) -> tuple[Path, dict]:
    """An E2E HDF5 file and its arrays (X channels-last)."""
    h5 = write_e2e(tmp / f"ref{seed}.h5", n=n, size=size, channels=channels, seed=seed)
    with h5py.File(h5) as f:
        arrays = {k: f[k][...] for k in f}
    return h5, arrays


def nested(x: np.ndarray, leaf=FLOAT32) -> pa.Array:
    """(n, a, b, c) -> list<list<list<leaf>>> per row (what pandas/pyarrow write for the CMS release)."""
    t = leaf
    for _ in range(x.ndim - 1):
        t = pa.list_(t)
    return pa.array(x.tolist(), type=t)


def write_parquet(path: Path, X: np.ndarray, cols: dict, *, image_key: str = "X_jets", row_group_size: int = 16,
                  leaf=FLOAT32) -> Path:
    table = pa.table({image_key: nested(X, leaf), **{k: pa.array(v) for k, v in cols.items()}})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_root(path: Path, X: np.ndarray, cols: dict, *, image_key: str = "X_jets", tree: str = "jets",
               extra_trees: tuple[str, ...] = ()) -> Path:
    with uproot.recreate(path) as f:
        f.mktree(tree, {image_key: (X.dtype, X.shape[1:]) if X.ndim > 1 else X.dtype,
                        **{k: (np.asarray(v).dtype, np.asarray(v).shape[1:]) if np.asarray(v).ndim > 1
                           else np.asarray(v).dtype for k, v in cols.items()}})
        half = len(X) // 2  # two baskets
        for a, b in ((0, half), (half, len(X))):
            if b > a:
                f[tree].extend({image_key: X[a:b], **{k: np.asarray(v)[a:b] for k, v in cols.items()}})
        for name in extra_trees:
            f.mktree(name, {"z": np.int32})
            f[name].extend({"z": np.arange(3, dtype=np.int32)})
    return path


def chw(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(X, -1, 1))


def source(tmp: Path, fmt: str, arrays: dict, *, layout: str = "channels_first", name: str = "jets") -> Path:
    X = chw(arrays["X_jets"]) if layout == "channels_first" else arrays["X_jets"]
    cols = {k: arrays[k] for k in ("y", "m0", "pt")}
    if fmt == "parquet":
        return write_parquet(tmp / f"{name}.parquet", X, cols)
    return write_root(tmp / f"{name}.root", X, cols)


def cfg_for(tmp: Path, data_path: Path, **data):
    raw = base_config(tmp, data_path)
    raw["data"].update(data)
    return validate(raw, source="t.yaml")


def cache_files(tmp: Path) -> list[str]:
    d = tmp / "e2e_runs" / "cache"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- same images as HDF5
@pytest.mark.parametrize("fmt", ["parquet", "root"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_same_images_as_e2e_hdf5(ws, fmt, layout):
    h5, arrays = reference(ws)
    src = source(ws, fmt, arrays, layout=layout)
    over = {"layout": "channels_last"} if layout == "channels_last" else {}  # channels_first is the default here
    cfg = cfg_for(ws, src, **over)
    cached = materialize(cfg)
    assert cached is not cfg and cfg.data.path == str(src) and cfg.data.format == "auto"  # the user's cfg untouched
    assert cached.data.format == "hdf5" and cached.data.layout == "channels_last"
    cache = Path(cached.data.path)
    assert cache.parent == Path("e2e_runs") / "cache" and cache.name.startswith("jets-") and cache.suffix == ".h5"
    with h5py.File(cache) as f:
        X = f["X_jets"]
        assert X.dtype == np.float32 and X.chunks == (1, *X.shape[1:])
        assert X.compression == "gzip" and X.compression_opts == 4 and X.shuffle
        np.testing.assert_array_equal(X[...], arrays["X_jets"])  # same pixels, channels-last
        for k in ("y", "m0", "pt"):
            np.testing.assert_array_equal(f[k][...], arrays[k])
        assert f.attrs["source_path"] == str(src.resolve()) and f.attrs["source_format"] == fmt
        assert f.attrs["source_size"] == src.stat().st_size and f.attrs["source_mtime_ns"] == src.stat().st_mtime_ns
    got, want = inspect(cached), inspect(cfg_for(ws, h5))
    assert got.path == str(cache.resolve())
    for field in ("train", "val", "test", "in_chans", "img_size", "channels", "layout", "num_classes"):
        assert getattr(got, field) == getattr(want, field), field
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6)
    np.testing.assert_allclose(got.std, want.std, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["parquet", "root"])
def test_regression_target_and_channel_subset_use_the_same_cache(ws, fmt):
    h5, arrays = reference(ws)
    src = source(ws, fmt, arrays)
    first = materialize(cfg_for(ws, src))
    raw = base_config(ws, src, task={"type": "regression", "target": "pt"})
    raw["data"]["channels"] = [2, 0]
    cfg = validate(raw, source="t.yaml")
    again = materialize(cfg)
    assert again.data.path == first.data.path and len(cache_files(ws)) == 1  # label and channels: no new cache
    raw["data"]["path"] = str(h5)
    got, want = inspect(again), inspect(validate(raw, source="t.yaml"))
    assert got.channels == [2, 0] and got.label_key == "pt"
    assert got.target_mean == pytest.approx(want.target_mean) and got.target_std == pytest.approx(want.target_std)


def test_hdf5_is_read_in_place(ws):
    h5, _ = reference(ws, size=32, channels=2)  # the electron/photon shape
    cfg = cfg_for(ws, h5)
    assert materialize(cfg) is cfg
    assert materialize(cfg_for(ws, h5, format="hdf5")).data.path == str(h5)
    assert not (ws / "e2e_runs").exists()


def test_root_rntuple_and_a_tree_in_a_folder(ws):
    """uproot's default writer makes RNTuples; data.tree picks one tree among several, also in a TDirectory."""
    _, arrays = reference(ws)
    X = chw(arrays["X_jets"])
    with uproot.recreate(ws / "nt.root") as f:
        f["jets"] = {"X_jets": X, "y": arrays["y"], "m0": arrays["m0"], "flag": arrays["y"].astype(bool)}
        f.mkdir("sub")
        f["sub"].mktree("t", {"X_jets": (np.float32, X.shape[1:]), "y": np.int64})
        f["sub/t"].extend({"X_jets": X, "y": arrays["y"]})
    for tree, cols in (("jets", ["X_jets", "flag", "m0", "y"]), ("sub/t", ["X_jets", "y"])):
        cached = materialize(cfg_for(ws, ws / "nt.root", tree=tree))
        with h5py.File(cached.data.path) as f:
            assert sorted(f) == cols
            np.testing.assert_array_equal(f["X_jets"][...], arrays["X_jets"])
            np.testing.assert_array_equal(f["y"][...], arrays["y"])
        assert inspect(cached).img_size == (16, 16)
    assert len(cache_files(ws)) == 2


def test_parquet_unused_int_column_with_nulls_is_left_out(ws):
    _, arrays = reference(ws)
    run = pa.array([None if i == 30 else i for i in range(N)], type=pa.int64())
    path = write_parquet(ws / "jets.parquet", chw(arrays["X_jets"]), {"y": arrays["y"], "run": run})
    with h5py.File(materialize(cfg_for(ws, path)).data.path) as f:
        assert sorted(f) == ["X_jets", "y"]


@pytest.mark.parametrize("fmt", ["parquet", "root"])
def test_cache_reused_then_refreshed_when_the_source_changes(ws, fmt):
    _, arrays = reference(ws)
    src = source(ws, fmt, arrays)
    cfg = cfg_for(ws, src)
    cache = Path(materialize(cfg).data.path)
    stamp = cache.stat().st_mtime_ns
    assert Path(materialize(cfg).data.path) == cache and cache.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert Path(materialize(cfg, generate=False).data.path) == cache  # a dry run uses an existing cache too

    _, changed = reference(ws, seed=7)
    source(ws, fmt, changed)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = Path(materialize(cfg).data.path)
    assert fresh != cache
    with h5py.File(fresh) as f:
        np.testing.assert_array_equal(f["X_jets"][...], changed["X_jets"])
        assert f.attrs["source_mtime_ns"] == src.stat().st_mtime_ns
    assert Path(materialize(cfg).data.path) == fresh
    assert not [p for p in (ws / "e2e_runs" / "cache").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("fmt", ["parquet", "root"])
def test_conversion_streams_in_chunks(ws, monkeypatch, fmt):
    _, arrays = reference(ws)
    src = source(ws, fmt, arrays)
    monkeypatch.setattr(formats, "CHUNK_BYTES", 3 * 16 * 16 * 8 * 7)  # 7 images a chunk
    seen = []
    real = formats._to_hwc

    def spy(images, *a, **kw):
        seen.append(len(images))
        return real(images, *a, **kw)

    monkeypatch.setattr(formats, "_to_hwc", spy)
    cached = materialize(cfg_for(ws, src))
    assert max(seen) <= 7 and sum(seen[1:]) == N  # seen[0]: the first chunk, checked before writing
    with h5py.File(cached.data.path) as f:
        np.testing.assert_array_equal(f["X_jets"][...], arrays["X_jets"])


@pytest.mark.parametrize("fmt", ["parquet", "root"])
@pytest.mark.parametrize("cmd", [["validate"], ["run", "--dry-run"]])
def test_dry_run_checks_without_writing(ws, capsys, fmt, cmd):
    _, arrays = reference(ws)
    src = source(ws, fmt, arrays)
    yml = write_yaml(ws / "s.yaml", base_config(ws, ws / "other.h5"))
    before = sorted(os.listdir(ws))
    argv = [cmd[0], str(yml), *cmd[1:], "--set", f"data.path={src}"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "checked without converting it" in out
    assert sorted(os.listdir(ws)) == before and not (ws / "e2e_runs").exists()
    materialize(cfg_for(ws, src))  # with a cache, the dry run shows the full summary
    capsys.readouterr()
    assert main(argv) == 0
    assert "30/10/0 train/val/test, 3x16x16 images, 2 classes" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad input
def _arrays(n: int = N) -> dict:
    rng = np.random.default_rng(0)
    return {"X": rng.exponential(0.1, (n, 3, 16, 16)).astype(np.float32), "y": (np.arange(n) % 2).astype(np.int64),
            "m0": rng.uniform(50, 200, n).astype(np.float32)}


def _pq(name: str = "jets.parquet", X=None, **cols) -> str:
    a = _arrays()
    write_parquet(Path(name), a["X"] if X is None else X, {"y": a["y"], "m0": a["m0"], **cols})
    return name


def _root(name: str = "jets.root", X=None, **kw) -> str:
    a = _arrays()
    write_root(Path(name), a["X"] if X is None else X, {"y": a["y"], "m0": a["m0"]}, **kw)
    return name


def _with_nan(row: int, value=np.nan) -> np.ndarray:
    X = _arrays()["X"].copy()
    X[row, 1, 3, 4] = value
    return X


def _truncated(make, name: str) -> str:
    full = make()
    data = Path(full).read_bytes()
    Path(full).unlink()
    Path(name).write_bytes(data[: len(data) // 2])
    return name


def _empty_parquet() -> str:
    a = _arrays(0)
    write_parquet(Path("empty.parquet"), a["X"], {"y": a["y"]})
    return "empty.parquet"


def _ragged_parquet() -> str:
    X = _arrays()["X"].tolist()
    X[25] = [row[:15] for row in X[25]]  # one image 3x16x15
    pq.write_table(pa.table({"X_jets": pa.array(X), "y": np.arange(N) % 2}), "jets.parquet", row_group_size=16)
    return "jets.parquet"


def _jagged_root() -> str:
    import awkward as ak

    with uproot.recreate("jets.root") as f:
        f.mktree("jets", {"X_jets": "var * float32", "y": np.int64})
        f["jets"].extend({"X_jets": ak.Array([[1.0, 2.0]] * N), "y": np.arange(N) % 2})
    return "jets.root"


def _zero(name: str) -> str:
    Path(name).write_bytes(b"")
    return name


def _h5_truncated() -> str:
    write_e2e(Path("full.h5"), n=N)
    return _truncated(lambda: "full.h5", "jets.h5")


def _h5_lengths() -> str:
    with h5py.File("jets.h5", "w") as f:
        f["X_jets"] = np.zeros((N, 16, 16, 3), np.float32)
        f["y"] = np.arange(N - 3) % 2
    return "jets.h5"


def _txt() -> str:
    Path("jets.txt").write_text("a,b\n1,2\n")
    return "jets.txt"


# (id, builder -> data path, extra --set, words the error line must hold); LATE: found past the first chunk
BAD = [
    ("parquet-no-image", _pq, ["data.image_key=images"], ["data.image_key", "'images'", "X_jets, y, m0"]),
    ("root-no-image", _root, ["data.image_key=images"], ["data.image_key", "'images'", "X_jets, y, m0"]),
    ("parquet-no-label", _pq, ["data.label_key=label"], ["data.label_key", "'label'", "X_jets, y, m0"]),
    ("root-no-label", _root, ["data.label_key=label"], ["data.label_key", "'label'"]),
    ("root-no-target", _root, ["task.type=regression", "task.target=mass"], ["task.target", "'mass'"]),
    ("parquet-rank-2", lambda: _pq(X=_arrays()["X"][:, 0]), [], ["data.image_key", "rank 2"]),
    ("root-rank-2", lambda: _root(X=_arrays()["X"][:, 0]), [], ["data.image_key", "rank 2"]),
    ("root-flat", lambda: _root(X=_arrays()["X"].reshape(N, -1)), [], ["data.image_key", "rank 1"]),
    ("root-jagged", _jagged_root, [], ["data.image_key", "variable-size"]),
    ("parquet-ragged", _ragged_parquet, [], ["data.image_key", "different shapes"]),
    ("parquet-nan-late", lambda: _pq(X=_with_nan(35)), [], ["data.image_key", "NaN or Inf", "row 35"]),
    ("parquet-inf-first", lambda: _pq(X=_with_nan(0, np.inf)), [], ["data.image_key", "NaN or Inf", "row 0"]),
    ("root-nan-late", lambda: _root(X=_with_nan(33)), [], ["data.image_key", "NaN or Inf", "row 33"]),
    ("parquet-nan-label", lambda: _pq(y=np.where(np.arange(N) == 5, np.nan, np.arange(N) % 2)), [],
     ["data.label_key", "NaN or Inf"]),
    ("parquet-0-rows", _empty_parquet, [], ["data.path", "no rows"]),
    ("root-0-entries", lambda: _root(X=_arrays(0)["X"]), [], ["data.path", "no rows"]),
    ("parquet-0-bytes", lambda: _zero("jets.parquet"), [], ["data.path", "empty (0 bytes)"]),
    ("root-0-bytes", lambda: _zero("jets.root"), [], ["data.path", "empty (0 bytes)"]),
    ("h5-0-bytes", lambda: _zero("jets.h5"), [], ["data.path", "not a readable HDF5 file"]),
    ("parquet-truncated", lambda: _truncated(lambda: _pq("full.parquet"), "jets.parquet"), [],
     ["data.path", "truncated"]),
    ("root-truncated", lambda: _truncated(lambda: _root("full.root"), "jets.root"), [], ["data.path", "truncated"]),
    ("h5-truncated", _h5_truncated, [], ["data.path", "not a readable HDF5 file"]),
    ("h5-lengths", _h5_lengths, [], ["data.label_key", "must match"]),
    ("unknown-extension", _txt, [], ["data.format", ".txt", "hdf5, parquet, root or csv"]),
    ("unknown-format", _pq, ["data.format=feather"], ["data.format", "feather"]),
    ("parquet-as-root", _pq, ["data.format=root"], ["data.path", "not a readable ROOT file"]),
    ("root-several-trees", lambda: _root(extra_trees=("lumi",)), [], ["data.tree", "jets, lumi"]),
    ("root-no-such-tree", _root, ["data.tree=events"], ["data.tree", "'events'", "jets"]),
    ("parquet-looks-channels-last", lambda: _pq(X=np.moveaxis(_arrays()["X"], 1, -1)), [],
     ["data.layout", "channels_last"]),
    ("parquet-bad-channel", _pq, ["data.channels=[0,3]"], ["data.channels", "channel 3"]),
]
LATE = {"parquet-ragged", "parquet-nan-late", "root-nan-late"}


@pytest.mark.parametrize("cmd", ["validate", "run"])
@pytest.mark.parametrize("case, make, sets, names", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_and_no_cache(ws, capsys, monkeypatch, cmd, case, make, sets, names):
    monkeypatch.setattr(formats, "CHUNK_BYTES", 3 * 16 * 16 * 8 * 7)  # 7 rows a chunk: row 25+ is mid-conversion
    data = make()
    yml = write_yaml(ws / "s.yaml", base_config(ws, ws / "other.h5"))
    before = sorted(os.listdir(ws))
    argv = [cmd, str(yml)] + [a for s in [f"data.path={data}", *sets] for a in ("--set", s)]
    rc = main(argv)
    out, err = capsys.readouterr()
    if cmd == "validate" and case in LATE:  # a dry run reads the first chunk only (documented)
        assert rc == 0 and "checked without converting it" in out, err
        assert sorted(os.listdir(ws)) == before
        return
    assert rc == 2, (out, err)
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], f"{name!r} not in: {lines[0]}"
    assert not (ws / "e2e_runs").exists()  # no cache, no tmp file, not even the folder
    assert sorted(os.listdir(ws)) == before


# --- issue 13: labels of every type Parquet and ROOT hold become class indices in the cache
@pytest.mark.parametrize("fmt", ["hdf5", "parquet", "root"])
@pytest.mark.parametrize("kind", ["bool", "float", "onehot", "column"])
def test_label_types_become_class_indices(tmp_path, monkeypatch, fmt, kind):
    """bool, whole floats (1.0), one-hot rows and (n, 1) columns are what physicists store; the cache holds int64."""
    from trainables.data.images import H5ImageDataset

    monkeypatch.chdir(tmp_path)
    _, arrays = reference(tmp_path)
    y = arrays["y"]
    lab = {"bool": y.astype(bool), "float": y.astype(np.float32), "onehot": np.eye(2, dtype=np.int8)[y],
           "column": y[:, None].astype(np.int32)}[kind]
    cols = {"y": lab.tolist() if fmt == "parquet" and lab.ndim > 1 else lab, "m0": arrays["m0"]}
    X = chw(arrays["X_jets"])
    if fmt == "hdf5":  # read in place: converted when read (inspect, and each worker's dataset)
        data = write_e2e(tmp_path / "jets.h5", n=N)
        with h5py.File(data, "a") as f:
            del f["y"]
            f["y"] = lab
        cached = validate(base_config(tmp_path, data), source="t")
        assert materialize(cached) is cached
    else:
        data = (write_parquet(tmp_path / "jets.parquet", X, cols) if fmt == "parquet"
                else write_root(tmp_path / "jets.root", X, cols))
        cfg = validate(base_config(tmp_path, data), source="t")
        assert materialize(cfg, generate=False) is None  # checked without writing
        cached = materialize(cfg)
        with h5py.File(cached.data.path) as f:
            assert f["y"].dtype == np.int64 and (f["y"][...] == y).all()
    setup = inspect(cached)
    ds = H5ImageDataset(setup, setup.val)
    assert ds.labels.dtype == np.int64 and (ds.labels == y[setup.val]).all()
