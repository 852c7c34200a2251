"""Building the sparse cache of a dataset once (layout and key: :mod:`trainables.data.sparse_cache`).

The cached rows are cut into blocks; each block is read with the dense path's own steps (those of
:func:`e2e_search.data.inspect.read_images` with ``normalize=False``: the same reads, channel selection and
:func:`trainables.data.transforms.preprocess`) in chunks of ``READ_CHUNK`` images and reduced to its stored pixels,
written as three ``.npy`` files into the temporary folder. ``ingest`` then merges the blocks
in row order into the final arrays, writes ``meta.json`` and renames the folder into place.

Blocks run as Ray tasks (``run_blocks`` of e2e_search/data/ingest.py: one CPU each, at most ``parallel`` at a time,
on this node, where the folder is) or in this process, one after the other (no Ray: unit tests, a trial that finds
no cache on its node). A file lock makes concurrent callers on a node build it once: the others wait and reuse it.
Any error (a bad chunk, NaN in the file, Ctrl-C) removes the temporary folder; a killed process leaves a ``.tmp``
folder that no run uses and that the next ingest of the same cache removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainables.data.images import READ_CHUNK, check_finite, read_rows
from trainables.data.setup import DataSetup
from trainables.data.sparse_cache import META, background, cache_rows, folder_name, identity, is_complete, stored_mask
from trainables.data.transforms import preprocess, to_chw
from trainables.errors import UserError
from trainables.workdir import cache_dir

BLOCK_ROWS = 8192
"""Most rows in one block (one Ray task)."""


def block_spec(setup: DataSetup) -> dict:
    """What a block task needs of ``setup``: its settings, without the split lists."""
    return {k: v for k, v in setup.to_dict().items() if k not in ("train", "val", "test", "label_order")}


def encode_rows(spec: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """File rows ``rows`` (sorted) -> (stored pixels per row int64 (n,), flat index int32 (nnz,), value float32
    (nnz,)). Raises UserError (data.image_key) on NaN/Inf."""
    import h5py

    setup = DataSetup(**spec, train=[], val=[], test=[])
    bg = background(setup)
    lens, index, values = [], [], []
    with h5py.File(setup.path, "r") as f:
        X = f[setup.image_key]
        for a in range(0, len(rows), READ_CHUNK):
            # read_images' steps for one sorted chunk, without its output copy: the same values bit for bit
            raw = to_chw(read_rows(X, rows[a : a + READ_CHUNK]), setup.layout)[:, setup.channels]
            check_finite(raw, "data.image_key")
            flat = preprocess(raw, setup, normalize=False, select=False).reshape(len(raw), -1)
            mask = stored_mask(flat, bg)
            lens.append(mask.sum(axis=1, dtype=np.int64))
            at = np.flatnonzero(mask)  # row-major: ascending within each image
            index.append((at % flat.shape[1]).astype(np.int32))
            values.append(flat.reshape(-1)[at])
    cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
    return cat(lens, np.int64), cat(index, np.int32), cat(values, np.float32)


def write_block(spec: dict, block: int, rows: np.ndarray, tmp: str) -> tuple[int, int]:
    """Encode ``rows`` into ``tmp``/b<block>-{lens,index,values}.npy; -> (block, stored pixels)."""
    lens, index, values = encode_rows(spec, rows)
    for name, arr in (("lens", lens), ("index", index), ("values", values)):
        np.save(Path(tmp) / f"b{block:06d}-{name}.npy", arr)
    return block, int(len(index))


def blocks(n: int, parallel: int, block_rows: int | None = None) -> list[tuple[int, int]]:
    """[start, stop) row ranges: about 4 blocks per parallel task, multiples of READ_CHUNK, at most BLOCK_ROWS."""
    if block_rows is None:
        per = -(-n // max(1, 4 * parallel))
        block_rows = min(BLOCK_ROWS, max(READ_CHUNK, -(-per // READ_CHUNK) * READ_CHUNK))
    return [(a, min(n, a + block_rows)) for a in range(0, n, block_rows)]


def _run_local(spec: dict, rows: np.ndarray, parts: list[tuple[int, int]], tmp: Path) -> list[tuple[int, int]]:
    return [write_block(spec, i, rows[a:b], str(tmp)) for i, (a, b) in enumerate(parts)]




def _merge(tmp: Path, rows: np.ndarray, done: list[tuple[int, int]], meta: dict) -> None:
    """The blocks of ``tmp`` -> rows/offsets/index/values.npy and meta.json (block files removed)."""
    from numpy.lib.format import open_memmap

    nnz = sum(k for _, k in done)
    lens = np.concatenate([np.load(tmp / f"b{i:06d}-lens.npy") for i, _ in done]) if done else np.zeros(0, np.int64)
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    assert offsets[-1] == nnz and len(lens) == len(rows)
    np.save(tmp / "rows.npy", np.ascontiguousarray(rows, np.int64))
    np.save(tmp / "offsets.npy", offsets)
    for name, dt in (("index", np.int32), ("values", np.float32)):
        out = open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dt, shape=(nnz,))
        at = 0
        for i, k in done:
            part = tmp / f"b{i:06d}-{name}.npy"
            out[at : at + k] = np.load(part, mmap_mode="r")
            at += k
            part.unlink()
        out.flush()
        del out
    for i, _ in done:
        (tmp / f"b{i:06d}-lens.npy").unlink()
    meta = {**meta, "nnz": int(nnz)}
    meta["fill"] = nnz / max(1, len(rows) * int(np.prod(meta["shape"])))
    (tmp / META).write_text(json.dumps({**meta, "complete": True}, indent=1))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(final: Path) -> None:
    """Temporary folders of this cache left by killed processes."""
    for p in final.parent.glob(f".{final.name}.*.tmp"):
        try:
            pid = int(p.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _locked(final: Path):
    """An exclusive lock on this cache's lock file (another process building it: wait for it)."""
    import fcntl

    with open(final.parent / f".{final.name}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _image_shape(setup: DataSetup) -> list[int]:
    return [len(setup.channels), int(setup.img_size[0]), int(setup.img_size[1])]


BlockRunner = Callable[[dict, np.ndarray, list[tuple[int, int]], Path], list[tuple[int, int]]]
"""Writes the blocks ``parts`` ([start, stop) ranges of ``rows``) of a cache with :func:`write_block` into the
temporary folder -> [(block, stored pixels)]; e2e_search/data/ingest.py has one that runs them as Ray tasks."""


def build(setup: DataSetup, final: Path, ident: dict, *, parallel: int = 1, run_blocks: BlockRunner | None = None,
          block_rows: int | None = None) -> dict:
    """Write the cache of ``setup`` to ``final`` (temporary folder + rename) in blocks for ``parallel`` tasks, run by
    ``run_blocks`` (None: one after the other in this process). -> its meta."""
    rows = cache_rows(setup)
    parts = blocks(len(rows), parallel, block_rows)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        spec = block_spec(setup)
        done = (run_blocks or _run_local)(spec, rows, parts, tmp)
        bg = background(setup)
        meta = {**ident, "shape": _image_shape(setup), "background": float(bg), "blocks": len(parts),
                "tasks": parallel if run_blocks else 1, "ray": run_blocks is not None}
        _merge(tmp, rows, done, meta)
        meta = json.loads((tmp / META).read_text())
        meta["seconds"] = time.perf_counter() - t0
        (tmp / META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # built meanwhile by a process that does not share our lock (another node): keep theirs
            if not is_complete(final, ident):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def ensure(setup: DataSetup, *, parallel: int = 1, run_blocks: BlockRunner | None = None, root: Path | None = None,
           block_rows: int | None = None, log=None) -> Path:
    """The folder of the sparse cache of ``setup`` as its source is now: reused when complete, else built
    (in blocks for ``parallel`` tasks run by ``run_blocks``; None: in this process). ``log``: a callable for one line of progress.
    Raises UserError for NaN/Inf in the images."""
    if root is None:
        root = Path(setup.sparse_dir).parent if setup.sparse_dir else cache_dir()
    root = Path(root).resolve()
    ident = identity(setup)
    final = root / folder_name(ident)
    if is_complete(final, ident):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache folder '{root}' ({e.strerror}); run from a writable directory",
                        key="data.cache") from None
    with _locked(final):
        if is_complete(final, ident):  # built while we waited
            return final
        _remove_stale(final)
        if final.exists():  # an unusable folder (another version, damaged): replaced
            shutil.rmtree(final)
        if log:
            log(f"data: building the sparse cache of {setup.path} ({ident['n_rows']} images"
                + (f", {parallel} {getattr(run_blocks, 'tasks', 'tasks')}" if run_blocks else "") + f") in {final}")
        meta = build(setup, final, ident, parallel=parallel, run_blocks=run_blocks, block_rows=block_rows)
        if log:
            log(f"data: sparse cache built in {meta['seconds']:.1f} s ({meta['n_rows'] / max(meta['seconds'], 1e-9):,.0f}"
                f" images/s): {meta['fill']:.2%} of pixels non-zero, {_size(final) / 2**20:,.1f} MiB")
    return final


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


