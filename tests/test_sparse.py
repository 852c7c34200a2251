"""The sparse image cache (``data.cache: sparse``, default ``auto``): batches equal to the dense path's bit for
bit, one ingest per dataset reused until the source changes, no usable cache after a failed ingest, refusals
through the CLI, ``auto`` resolution. Real HDF5 files, no Ray (except the one slow search test)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from e2e_search.data.inspect import inspect
from e2e_search.spec.loader import validate
from tests.conftest import base_config, write_objects
from tests.test_bad_input import YAML, bad_run, base_cfg, cli, write_yaml, ws  # noqa: F401 (ws: fixture)
from trainables.core.datasets import SparseSplit, forget, loaders, open_split
from trainables.data.images import H5ImageDataset
from trainables.data.sparse_cache import MAX_FILL, open_cache
from trainables.data.sparse_ingest import ensure
from trainables.errors import UserError

CPU = torch.device("cpu")


def write_sparse(path: Path, *, n: int = 24, h: int = 32, w: int = 32, c: int = 2, layout: str = "channels_last",
                 fill: float = 0.03, seed: int = 0) -> Path:
    """Mostly empty images: exponential energies, some negative, some tiny (below a zero_suppress), some -0.0,
    and a brighter centre for class 1."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = np.zeros((n, h * w * c), np.float32)
    k = max(4, int(h * w * c * fill))
    for i in range(n):
        at = rng.choice(h * w * c, k, replace=False)
        v = rng.exponential(1.0, k).astype(np.float32)
        v[: k // 5] *= -0.5
        v[k // 5 : k // 4] = 1e-4
        v[-1] = -0.0
        X[i, at] = v
    X = X.reshape(n, h, w, c)
    X[y == 1, h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1, :] += 2.0
    if layout == "channels_first":
        X = np.ascontiguousarray(np.moveaxis(X, -1, 1))
    with h5py.File(path, "w") as f:
        f.create_dataset("X_jets", data=X, chunks=(1, *X.shape[1:]), compression="gzip")
        f["y"] = y.astype(np.int64)
        f["m0"] = (50 + 100 * y + rng.normal(0, 5, n)).astype(np.float32)
    return path


def setup_for(tmp: Path, path: Path, **data):
    raw = base_config(tmp, path, data={"path": str(path), "val_fraction": 0.25, "test_fraction": 0.15, **data})
    return inspect(validate(raw, source="t.yaml"))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (-0.0 and +0.0 differ)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.int32),
                                                                      b.contiguous().view(torch.int32))


def batches(setup, cache: str, *, flip: bool, epochs=(1, 2)):
    """Training batches of ``epochs`` and validation batches through ``loaders`` (as a trial gets them)."""
    s = dataclasses.replace(setup, cache=cache, flip_augment=flip)
    forget()
    train_ds = open_split(s, "train", s.train, train=True)
    val_ds = open_split(s, "val", s.val)
    train, val = loaders(s, train_ds, val_ds, batch_size=8, device=CPU, rank=0, world=1, seed=5, loader_workers=0,
                         session=None)
    torch.manual_seed(0)  # the flips' generator
    out = []
    for epoch in epochs:
        train.set_epoch(epoch)
        out += [(x.clone(), y.clone()) for x, y in train]
    return out, [(x.clone(), y.clone()) for x, y in val], len(train)


def assert_same_as_dense(setup):
    assert setup.cache == "sparse", setup.cache
    for flip in (False, True):
        (sp, sp_val, n_sp), (de, de_val, n_de) = (batches(setup, c, flip=flip) for c in ("sparse", "device"))
        assert n_sp == n_de and len(sp) == len(de) > 0 and len(sp_val) == len(de_val) > 0
        for (xs, ys), (xd, yd) in zip(sp + sp_val, de + de_val):
            assert same_bits(xs, xd) and torch.equal(ys, yd)
    # validation batches are the split's items as the file-reading path (cache: none) gives them
    plain = H5ImageDataset(dataclasses.replace(setup, cache="none"), setup.val)
    items = torch.stack([plain[i][0] for i in range(len(plain))])
    assert same_bits(torch.cat([x for x, _ in sp_val]), items)
    sparse_items = SparseSplit(setup, setup.val)
    assert same_bits(torch.stack([sparse_items[i][0] for i in range(len(sparse_items))]), items)
    np.testing.assert_array_equal(sparse_items.labels, plain.labels)


# Every preprocessing option (a function of the image height, for the resize targets).
PREPROC = {
    "plain": lambda h: {},
    "no-normalization": lambda h: {"normalize": "none"},
    "given-mean-std": lambda h: {"mean": [0.1] * 2, "std": [0.7] * 2},
    "zero_suppress": lambda h: {"zero_suppress": 0.01},
    "clip": lambda h: {"clip": [0, 2]},
    "clip-above-zero": lambda h: {"clip": [0.5, 3]},  # an empty pixel becomes 0.5: the background
    "log1p": lambda h: {"log1p": True},
    "all-pixel-ops": lambda h: {"zero_suppress": 0.01, "clip": [-1, 5], "log1p": True},
    "crop": lambda h: {"resize": [h - 7, h - 7], "resize_mode": "crop"},
    "pad_crop": lambda h: {"resize": [h + 8, h - 3], "resize_mode": "pad_crop"},
    "avgpool": lambda h: {"resize": [h // 2, h // 2], "resize_mode": "avgpool"},
    "avgpool-uneven": lambda h: {"resize": [h * 2 // 3, h // 3], "resize_mode": "avgpool", "log1p": True},
}
SIZES = {"32x32x2": (32, 32, 2), "125x125x3": (125, 125, 3), "125x125x8": (125, 125, 8)}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("opts", list(PREPROC))
def test_batches_equal_the_dense_path_for_every_preprocessing(tmp_path, monkeypatch, opts, size):
    monkeypatch.chdir(tmp_path)
    h, w, c = SIZES[size]
    fill = (0.01 if opts.startswith("avgpool") else 0.03) if h < 100 else 0.004  # pooling spreads the pixels
    path = write_sparse(tmp_path / "d.h5", h=h, w=w, c=c, fill=fill)
    data = PREPROC[opts](h)
    if "mean" in data:
        data = {**data, "mean": [0.1] * c, "std": [0.7] * c}
    assert_same_as_dense(setup_for(tmp_path, path, cache="sparse", **data))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
@pytest.mark.parametrize("subset", [False, True])
def test_batches_equal_the_dense_path_for_every_layout_and_channel_subset(tmp_path, monkeypatch, size, layout,
                                                                         subset):
    monkeypatch.chdir(tmp_path)
    h, w, c = SIZES[size]
    path = write_sparse(tmp_path / "d.h5", h=h, w=w, c=c, layout=layout, fill=0.03 if h < 100 else 0.004)
    channels = ([c - 1, 0] if c < 8 else [7, 2, 5]) if subset else None
    s = setup_for(tmp_path, path, cache="sparse", layout=layout, channels=channels, zero_suppress=0.01)
    assert s.in_chans == (len(channels) if channels else c)
    assert_same_as_dense(s)


def test_regression_labels_and_a_trial_match_the_dense_path(tmp_path, monkeypatch):
    """Same trial metrics (no Ray: the core on a LocalSession) from the sparse and the device cache."""
    from trainables.core.contract import TrialConfig
    from trainables.core.loop import train_trial
    from trainables.core.session import LocalSession

    monkeypatch.chdir(tmp_path)
    path = write_sparse(tmp_path / "d.h5", n=48, h=16, w=16, c=3, fill=0.05)
    s = setup_for(tmp_path, path, flip_augment=True)
    assert s.cache == "sparse"  # auto
    reports = {}
    for cache in ("sparse", "device"):
        forget()
        cfg = TrialConfig(family="vit", params={"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2,
                                                "batch_size": 8}, data=dataclasses.replace(s, cache=cache).to_dict(),
                          max_epochs=2, metric="val_auc", mode="max", metrics=["val_auc"])
        session = LocalSession(tmp_path / cache)
        train_trial(cfg, session)
        reports[cache] = [{k: m[k] for k in ("train_loss", "val_loss", "val_auc")} for m, _ in session.reports]
    assert reports["sparse"] == reports["device"]

    raw = base_config(tmp_path, path, task={"type": "regression", "target": "m0"},
                      data={"path": str(path), "cache": "sparse"})
    r = inspect(validate(raw, source="t.yaml"))
    np.testing.assert_array_equal(SparseSplit(r, r.val).labels, H5ImageDataset(r, r.val).labels)


# --------------------------------------------------------------------------- one ingest per dataset
def _stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_ingest_is_reused_and_redone_when_the_source_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_sparse(tmp_path / "d.h5", n=40)
    s = setup_for(tmp_path, path, cache="sparse")
    assert s.sparse_dir and not Path(s.sparse_dir).exists()  # planned by inspect, written by nobody yet
    folder = ensure(s)
    assert str(folder) == s.sparse_dir and folder.parent == (tmp_path / "e2e_runs" / "cache").resolve()
    assert sorted(p.name for p in folder.iterdir()) == ["index.npy", "meta.json", "offsets.npy", "rows.npy",
                                                        "values.npy"]
    meta = json.loads((folder / "meta.json").read_text())
    c = open_cache(folder)
    assert c.shape == (2, 32, 32) and meta["n_rows"] == 40 and len(c.offsets) == 41 and c.offsets[-1] == meta["nnz"]
    assert 0 < meta["fill"] < MAX_FILL and c.index.dtype == np.int32 and c.values.dtype == np.float32
    stamps = _stamps(folder)

    again = setup_for(tmp_path, path, cache="sparse", seed=7)  # another split of all rows: the same cache
    assert again.sparse_dir == s.sparse_dir
    forget()
    open_split(again, "train", again.train, train=True)  # a trial opens it: nothing rebuilt
    assert ensure(again) == folder and _stamps(folder) == stamps

    # per-pixel settings, channels and a row subset are part of the key
    for other in ({"log1p": True}, {"channels": [1]}, {"limit": 30}):
        o = setup_for(tmp_path, path, cache="sparse", **other)
        assert o.sparse_dir != s.sparse_dir and ensure(o) != folder

    with h5py.File(path, "r+") as f:  # the source changes: re-ingested into a new folder, the old one kept
        X = f["X_jets"][...]
        X[:, 0, 0, 0] = 9.0
        f["X_jets"][...] = X
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    fresh = ensure(s)
    assert fresh != folder and folder.is_dir() and _stamps(folder) == stamps
    pos = open_cache(fresh)
    assert pos.values[pos.offsets[0]] == 9.0 and pos.index[pos.offsets[0]] == 0
    assert not [p for p in fresh.parent.iterdir() if p.name.endswith(".tmp")]


def _no_cache_left(tmp: Path, setup) -> None:
    root = tmp / "e2e_runs" / "cache"
    names = [p.name for p in root.iterdir()] if root.exists() else []
    assert not [n for n in names if n.endswith(".tmp") or n.startswith("sparse-")], names
    assert not Path(setup.sparse_dir).exists()


def test_a_failing_block_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_sparse(tmp_path / "d.h5", n=40)
    with h5py.File(path, "r") as f:  # a damaged chunk in the middle of the file
        info = f["X_jets"].id.get_chunk_info(21)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    s = setup_for(tmp_path, path, cache="sparse", stats_samples=4)
    with pytest.raises(OSError, match="read"):
        ensure(s, block_rows=256)
    _no_cache_left(tmp_path, s)


def test_nan_in_a_row_stops_the_ingest_with_one_line_and_no_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_sparse(tmp_path / "d.h5", n=40)
    s = setup_for(tmp_path, path, cache="sparse", stats_samples=4)
    with h5py.File(path, "r+") as f:
        f["X_jets"][s.val[0], 3, 3, 0] = np.nan
    with pytest.raises(UserError) as e:
        ensure(s)
    assert e.value.key == "data.image_key" and "NaN" in e.value.message
    _no_cache_left(tmp_path, s)


def test_a_killed_ingest_leaves_nothing_usable_and_the_next_one_cleans_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_sparse(tmp_path / "d.h5", n=1200, h=125, w=125, c=3, fill=0.003)
    s = setup_for(tmp_path, path, cache="sparse")
    code = ("import sys, dataclasses, json; from trainables.data.setup import DataSetup; "
            "from trainables.data.sparse_ingest import ensure; "
            "ensure(DataSetup(**json.loads(sys.stdin.read())), block_rows=256)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, env=env, cwd=tmp_path)
    proc.stdin.write(json.dumps(s.to_dict()).encode())
    proc.stdin.close()
    root = tmp_path / "e2e_runs" / "cache"
    deadline = time.time() + 60
    while time.time() < deadline and not list(root.glob(".sparse-*.tmp/b000001-values.npy")):
        assert proc.poll() is None, "the ingest ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = list(root.glob(".sparse-*.tmp"))
    assert len(left) == 1 and not Path(s.sparse_dir).exists()
    assert ensure(s) == Path(s.sparse_dir) and len(open_cache(s.sparse_dir).rows) == 1200
    assert not left[0].exists()  # the killed process's folder is removed by the next ingest


# --------------------------------------------------------------------------- choosing the cache, refusals
def test_auto_picks_sparse_for_sparse_images_device_for_dense_and_none_when_nothing_fits(tmp_path, monkeypatch):
    import trainables.data.images as images
    from tests.conftest import write_e2e

    monkeypatch.chdir(tmp_path)
    sparse = setup_for(tmp_path, write_sparse(tmp_path / "s.h5"))
    assert sparse.cache == "sparse" and 0 < sparse.fill < MAX_FILL and sparse.sparse_dir
    assert "sparse cache (" in sparse.summary()
    dense = setup_for(tmp_path, write_e2e(tmp_path / "e.h5", n=40, size=16))
    assert dense.cache == "device" and dense.fill == 1.0 and dense.sparse_dir is None
    assert setup_for(tmp_path, tmp_path / "e.h5", cache="none").cache == "none"
    assert setup_for(tmp_path, tmp_path / "e.h5", cache="memory").cache == "memory"
    monkeypatch.setattr(images, "available_memory", lambda: 10_000)
    assert setup_for(tmp_path, tmp_path / "e.h5").cache == "none"
    assert setup_for(tmp_path, tmp_path / "s.h5").cache == "none"  # neither form fits: read from the file
    assert not (tmp_path / "e2e_runs").exists()  # inspect decides and writes nothing

    objs = write_objects(tmp_path / "o.h5")
    raw = base_config(tmp_path, objs, family="deepsets", data={"path": str(objs), "image_key": "X_objects"})
    raw["params"] = {"hidden": 16, "depth": 1, "batch_size": 8}
    o = inspect(validate(raw, source="t.yaml"))
    assert o.kind == "objects" and o.cache == "none"


def test_a_dense_file_with_cache_sparse_is_refused_with_its_fill(ws, capsys):  # noqa: F811 - the imported fixture
    line = bad_run(ws, capsys, ["validate", write_yaml(base_cfg()), "--set", "data.cache=sparse"],
                   YAML, "data.cache", "100.0% of the pixels", "under 20%", "--set data.cache")
    assert "set data.cache: auto" in line


def test_a_sparse_cache_too_big_for_memory_is_refused_before_anything_starts(
        ws, capsys, monkeypatch):  # noqa: F811 - the imported fixture
    import trainables.data.images as images

    write_sparse(ws / "jets.h5", n=40)
    monkeypatch.setattr(images, "available_memory", lambda: 10_000)
    line = bad_run(ws, capsys, ["run", write_yaml(base_cfg()), "--set", "data.cache=sparse"],
                   YAML, "data.cache", "40 images of 2x32x32", "GiB", "data.limit")
    assert "0.00 GiB of memory is available" in line
    rc, out, err = cli(["validate", write_yaml(base_cfg())], capsys)  # auto: falls back to reading the file
    assert rc == 0 and "valid" in out and "sparse cache (" not in out and "cache in" not in out, err


def test_validate_shows_the_sparse_choice_and_writes_nothing(ws, capsys):  # noqa: F811 - the imported fixture
    write_sparse(ws / "jets.h5", n=40)
    rc, out, err = cli(["validate", write_yaml(base_cfg())], capsys)
    assert rc == 0, err
    assert "sparse cache (" in out and "of pixels non-zero" in out
    assert not (ws / "e2e_runs").exists()


# --------------------------------------------------------------------------- a real search (Ray)
@pytest.mark.slow
def test_sparse_and_memory_searches_give_the_same_metrics(tmp_path, monkeypatch, capsys, ray_local):
    from e2e_search.cli import main
    from tests.conftest import write_yaml as write_cfg
    from tests.test_search import _runs

    monkeypatch.chdir(tmp_path)
    data = write_sparse(tmp_path / "jets.h5", n=64, h=16, w=16, c=3, fill=0.05)
    metrics = {}
    for name, cache in (("sp", "sparse"), ("mem", "memory"), ("sp2", "sparse")):
        cfg = base_config(tmp_path, data, name=name, search={"num_samples": 1, "seed": 3},
                          data={"path": str(data), "val_fraction": 0.25, "test_fraction": 0.0, "flip_augment": True})
        yml = write_cfg(tmp_path / f"{name}.yaml", cfg)
        assert main(["run", str(yml), "--set", f"data.cache={cache}"]) == 0
        err = capsys.readouterr().err
        if name == "sp":  # built by Ray tasks before the trial: the same arrays as an in-process build
            assert "data: sparse cache built in" in err and "Ray tasks" in err
            (built,) = (tmp_path / "e2e_runs" / "cache").glob("sparse-jets-*")
            s = inspect(validate(cfg, source="t.yaml"))
            local = ensure(s, root=tmp_path / "local")
            assert local.name == built.name
            for f in ("rows", "offsets", "index", "values"):
                assert np.load(built / f"{f}.npy").tobytes() == np.load(local / f"{f}.npy").tobytes()
        if name == "sp2":
            assert "reused" in err and "built in" not in err  # the second search: no ingest
        client, _, children = _runs(cfg["tracking"]["uri"], name)
        (run,) = children
        metrics[name] = {k: run.data.metrics[k] for k in ("val_auc", "val_loss", "train_loss")}
        assert run.data.metrics["setup_s"] > 0
    assert metrics["sp"] == pytest.approx(metrics["mem"], rel=1e-5, abs=1e-6)
    assert metrics["sp2"] == metrics["sp"]


def test_cache_rows_are_the_sorted_distinct_rows_of_the_splits_computed_once_per_split_lists():
    from types import SimpleNamespace

    from trainables.data.sparse_cache import cache_rows

    rng = np.random.default_rng(0)
    rows = rng.permutation(5000)[:3000]
    s = SimpleNamespace(train=rows[:2000].tolist(), val=rows[2000:2600].tolist(), test=rows[2600:].tolist() + [int(rows[0])])
    got = cache_rows(s)
    assert np.array_equal(got, np.unique(rows)) and got.dtype == np.int64 and not got.flags.writeable
    assert cache_rows(s) is got                                     # every split of a trial: computed once
    s.val.append(4999 if 4999 not in rows else int(np.setdiff1d(np.arange(6000), rows)[0]))  # a changed list
    again = cache_rows(s)
    assert again is not got and np.array_equal(again, np.unique(np.concatenate([rows, [s.val[-1]]])))
    other = SimpleNamespace(train=list(s.train), val=list(s.val), test=list(s.test))  # equal lists, new objects
    assert np.array_equal(cache_rows(other), again)
    assert len(cache_rows(SimpleNamespace(train=[7], val=[], test=[]))) == 1
