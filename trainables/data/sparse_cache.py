"""The sparse image cache of a dataset (``data.cache: sparse``): its layout, key, fill measure and size checks.

Detector images are almost empty (generated jets: 0.29% of the pixels non-zero). The cache keeps, for every row
of the data file a search uses, only the pixels that differ from an empty pixel, after every transform that
does not depend on the split (channel selection, ``zero_suppress``, ``clip``, ``log1p``, ``resize``), in CSR form.
One folder ``e2e_runs/cache/sparse-<stem>-<key>/`` holds::

    rows.npy     int64   (n,)      the file's row of each cached image, sorted
    offsets.npy  int64   (n + 1,)  image i's pixels are entries offsets[i]:offsets[i + 1]
    index.npy    int32   (nnz,)    flat pixel index in the transformed (C, H, W) image, ascending per image
    values.npy   float32 (nnz,)    the pixel's value after the per-pixel transforms and resize (not normalized)
    meta.json                      the key fields below, shape [C, H, W], background, nnz, fill, build time

An image is ``full(background)`` with ``values`` at ``index``. ``background`` is what an empty pixel becomes
after the per-pixel transforms (0, or ``clip``'s low end above 0); pixels are compared bit for bit, so a -0.0
is kept. The values are those of the dense path (:func:`e2e_search.data.inspect.read_images` with ``normalize=False``)
bit for bit; normalization and flips happen on the training device when a batch is built
(:mod:`trainables.core.batches`), in the dense path's float32 op order.

Key: the source's absolute path, size and mtime (ns), the image key, layout, channels, image size, the
per-pixel transforms and resize, the cached rows (a digest) and the numpy and torch versions (they compute the
values). A changed source gets a new folder; old ones are left for searches still reading them. The folder is
written under a temporary name and renamed into place: an interrupted ingest leaves no folder a run would use.
Every process on a node opens the same files read-only (``np.load(mmap_mode="r")``): the page cache holds one
copy per node, whatever the number of trials. Building it is :mod:`trainables.data.sparse_ingest`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np

from trainables.errors import UserError
from trainables.workdir import cache_dir

SPARSE_VERSION = 1
"""Bumped when the layout or the values change: older sparse caches are then rebuilt."""
MAX_FILL = 0.20
"""``cache: auto`` picks sparse under this fill fraction; ``cache: sparse`` is refused at or above it."""
STORED_BYTES = 8
"""Bytes per stored pixel: int32 index + float32 value."""
FILES = ("rows", "offsets", "index", "values")
META = "meta.json"


def _versions() -> dict[str, str]:
    out = {"numpy": np.__version__}
    try:
        out["torch"] = metadata.version("torch")
    except metadata.PackageNotFoundError:
        out["torch"] = ""
    return out


def background(setup: Any) -> np.float32:
    """What an empty (0) pixel becomes after the per-pixel transforms of ``setup`` (float32)."""
    from trainables.data.transforms import preprocess

    pixel = {"zero_suppress": getattr(setup, "zero_suppress", 0.0), "clip": getattr(setup, "clip", None),
             "log1p": getattr(setup, "log1p", False)}
    return np.float32(preprocess(np.zeros((1, 1, 1, 1), np.float32), pixel, normalize=False, select=False)[0, 0, 0, 0])


def stored_mask(imgs: np.ndarray, bg: np.float32) -> np.ndarray:
    """Pixels of float32 ``imgs`` that differ from ``bg`` bit for bit (what the cache stores)."""
    flat = np.ascontiguousarray(imgs, dtype=np.float32)
    return flat.view(np.uint32) != np.asarray(bg, np.float32).view(np.uint32)


def fill_fraction(imgs: np.ndarray, bg: np.float32) -> float:
    """Fraction of the pixels of ``imgs`` (n, C, H, W) float32 that the cache would store."""
    return float(stored_mask(imgs, bg).mean()) if imgs.size else 0.0


_ROWS_OF: dict[tuple, tuple[tuple, np.ndarray]] = {}
"""cache_rows by the identity of the three split lists (held here, so an id is not reused while cached):
every split a trial opens asks for the same rows, and at 10^6 rows converting and sorting them costs ~0.3 s."""


def cache_rows(setup: Any) -> np.ndarray:
    """The file rows a search uses (train, validation and test), sorted without repeats: the rows the cache
    holds. (n,) int64, read-only."""
    lists = (setup.train, setup.val, setup.test)
    key = tuple((id(v), len(v)) for v in lists)
    hit = _ROWS_OF.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], lists)):
        return hit[1]
    rows = np.sort(np.concatenate([np.asarray(v, np.int64) for v in lists]))
    if len(rows) > 1:  # a sort and a neighbour test: np.unique's hash table is several times slower here
        keep = np.empty(len(rows), bool)
        keep[0] = True
        np.not_equal(rows[1:], rows[:-1], out=keep[1:])
        rows = rows[keep]
    rows.setflags(write=False)
    if len(_ROWS_OF) >= 4:
        _ROWS_OF.clear()
    _ROWS_OF[key] = (lists, rows)
    return rows


def identity(setup: Any, rows: np.ndarray | None = None) -> dict:
    """The key fields of the sparse cache of ``setup`` as the source file is now (raises OSError if it is gone)."""
    rows = cache_rows(setup) if rows is None else rows
    st = os.stat(setup.path)
    resized = bool(setup.resize) and tuple(setup.resize) != tuple(setup.src_size or ())
    return {"version": SPARSE_VERSION, "source_path": str(Path(setup.path).resolve()), "source_size": int(st.st_size),
            "source_mtime_ns": int(st.st_mtime_ns), "image_key": setup.image_key, "layout": setup.layout,
            "channels": [int(c) for c in setup.channels], "src_size": [int(v) for v in setup.src_size or ()],
            "zero_suppress": float(setup.zero_suppress or 0.0),
            "clip": [float(v) for v in setup.clip] if setup.clip is not None else None, "log1p": bool(setup.log1p),
            "resize": [int(v) for v in setup.resize] if resized else None,
            "resize_mode": setup.resize_mode if resized else None,
            "n_rows": int(len(rows)),
            "rows_sha256": hashlib.sha256(np.ascontiguousarray(rows, np.int64).data).hexdigest(),
            **_versions()}


def folder_name(ident: dict) -> str:
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"sparse-{Path(ident['source_path']).stem}-{digest}"


def planned_folder(setup: Any, root: Path | None = None) -> Path:
    """The absolute folder of the sparse cache of ``setup`` (it may not exist yet)."""
    return ((root or cache_dir()) / folder_name(identity(setup))).resolve()


def is_complete(folder: Path, ident: dict) -> bool:
    """True when ``folder`` holds a finished cache of exactly ``ident`` (files present, lengths consistent)."""
    try:
        meta = json.loads((folder / META).read_text())
        if not meta.get("complete") or any(meta.get(k) != v for k, v in ident.items()):
            return False
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in FILES}
    except (OSError, ValueError):
        return False
    n, nnz = int(meta["n_rows"]), int(meta["nnz"])
    return (arrays["rows"].shape == (n,) and arrays["offsets"].shape == (n + 1,)
            and arrays["index"].shape == (nnz,) and arrays["values"].shape == (nnz,))


@dataclass
class SparseCache:
    """An opened sparse cache: read-only memory maps (shared through the page cache) and its description."""

    folder: Path
    rows: np.ndarray
    offsets: np.ndarray
    index: np.ndarray
    values: np.ndarray
    shape: tuple[int, int, int]
    """(C, H, W) of an image."""
    background: np.float32
    meta: dict

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.rows, self.offsets, self.index, self.values)))

    def positions(self, indices) -> np.ndarray:
        """Cache positions of the file rows ``indices`` (int64, same order); KeyError for a row not cached."""
        idx = np.asarray(indices, dtype=np.int64)
        pos = np.searchsorted(self.rows, idx)
        bad = (pos >= len(self.rows)) | (self.rows[np.minimum(pos, len(self.rows) - 1)] != idx)
        if bad.any():
            raise KeyError(f"row {int(idx[bad][0])} is not in the sparse cache {self.folder}")
        return pos


def open_cache(folder: str | Path) -> SparseCache:
    """The cache in ``folder``, memory-mapped read-only (nothing is read until used)."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in FILES}
    shape = cast("tuple[int, int, int]", tuple(int(v) for v in meta["shape"]))  # (C, H, W) as written
    return SparseCache(folder=folder, **arrays, shape=shape,
                       background=np.float32(meta["background"]), meta=meta)


# --------------------------------------------------------------------------- planning (before Ray starts)
def sparse_bytes(n_rows: int, pixels: int, fill: float) -> int:
    """Estimated bytes of the cache of ``n_rows`` images of ``pixels`` values each at ``fill``."""
    return int(n_rows * pixels * fill * STORED_BYTES + n_rows * 16 + 8)


def refuse_dense(fill: float, n_sample: int) -> None:
    """``cache: sparse`` on images that are not sparse: UserError naming data.cache and the measured fill."""
    if fill >= MAX_FILL:
        raise UserError(
            f"cache: sparse needs mostly empty images, but {fill:.1%} of the pixels of {n_sample} sampled training "
            f"images are non-zero after preprocessing (sparse needs under {MAX_FILL:.0%}); set data.cache: auto "
            "(picks device or none for dense images), device, memory or none", key="data.cache")


def check_sparse_fits(n_rows: int, setup: Any, fill: float, host_avail: int, device_total: int | None = None,
                      copies_per_device: int = 1) -> None:
    """Raise a UserError naming data.cache when the sparse cache of ``n_rows`` images at ``fill`` exceeds half
    of ``host_avail`` bytes, or (a GPU trial moves it to its GPU) half of ``device_total`` bytes shared by
    ``copies_per_device`` trials."""
    C, (h, w) = setup.in_chans, setup.img_size
    need = sparse_bytes(n_rows, C * h * w, fill)
    what = f"{n_rows} images of {C}x{h}x{w} at {fill:.2%} non-zero, {STORED_BYTES} bytes per stored pixel"
    fix = "set data.cache: none, or shrink the data with data.limit, data.channels or data.resize"
    if need > host_avail / 2:
        raise UserError(f"cache: sparse needs about {need / 2**30:.2f} GiB for {what}, but only "
                        f"{host_avail / 2**30:.2f} GiB of memory is available (the cache may take at most half); "
                        f"{fix}", key="data.cache")
    if device_total is not None and need * copies_per_device > device_total / 2:
        raise UserError(f"cache: sparse needs about {need / 2**30:.2f} GiB on each GPU trial's device ({what}; "
                        f"{copies_per_device} trial(s) per GPU) but a GPU has {device_total / 2**30:.2f} GiB (the cache "
                        f"may take at most half); {fix}, or raise resources.gpus_per_worker", key="data.cache")


def device_memory() -> int | None:
    """Bytes of the smallest local GPU (nvidia-smi; no CUDA context is created), or None without one."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        sizes = [int(v) * 2**20 for v in out.split() if v.strip().isdigit()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(sizes) if sizes else None
