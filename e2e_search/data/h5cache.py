"""The HDF5 cache a converted source (parquet, ROOT, CSV) is read from: its identity, path and completeness.

A cache is ``e2e_runs/cache/<stem>-<hash>.h5``; the hash covers the source's absolute path,
size and mtime and the conversion options, which the file's attributes repeat. A cache is
used only when it is complete and its attributes match the source as it is now.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from e2e_search.spec.schema import DataConfig, SearchSpace
from trainables.workdir import cache_dir

CACHE_VERSION = 1
"""Bumped when the cache layout changes: older caches are then rebuilt."""


def identity(path: Path, fmt: str, d: DataConfig, layout: str) -> dict:
    st = path.stat()
    return {"source_path": str(path.resolve()), "source_size": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns),
            "source_mtime": float(st.st_mtime), "source_format": fmt, "image_key": d.image_key, "layout": layout,
            "tree": d.tree or "", "cache_version": CACHE_VERSION}


def cache_path(ident: dict) -> Path:
    keys = ("source_path", "source_size", "source_mtime_ns", "source_format", "image_key", "layout", "tree",
            "cache_version")
    digest = hashlib.sha256("\0".join(str(ident[k]) for k in keys).encode()).hexdigest()[:12]
    return cache_dir() / f"{Path(ident['source_path']).stem}-{digest}.h5"


def cache_ok(cache: Path, ident: dict, need: tuple[str, ...] = ()) -> bool:
    """A complete cache of this very source and options, holding the datasets ``need`` too (a cache converted for
    another task may lack a label that is not a plain number column, e.g. one-hot lists)."""
    import h5py

    if not cache.is_file():
        return False
    try:
        with h5py.File(cache, "r") as f:
            a = f.attrs
            same = all(k == "source_mtime" or _plain(a.get(k)) == v for k, v in ident.items())
            return bool(same and a.get("complete", False) and all(k in f for k in (ident["image_key"], *need)))
    except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt
        return False


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def cached_cfg(cfg: SearchSpace, cache: Path) -> SearchSpace:
    out = cfg.model_copy(deep=True)
    out.data.path = str(cache)
    out.data.format = "hdf5"
    out.data.layout = "channels_last"
    out.data.tree = None
    return out
