"""Data formats users hold, all read through one E2E-layout HDF5 file.

- ``hdf5``: an E2E HDF5 file (``X_jets`` (N, H, W, C), ``y``, ...; also the
  electron/photon ``X`` (N, 32, 32, 2)) is read in place, lazily, by the workers.
- ``parquet``: the CMS E2E parquet release, one row per jet: a column of nested
  lists (C) of (H) of (W) floats (``X_jets``) and scalar columns (``y``, ``m0``, ``pt``).
- ``root``: a TTree (or RNTuple) with one entry per jet: the image as a
  fixed-size array branch (``float[3][125][125]``) and scalar branches.

Parquet and ROOT files are converted once, in chunks (memory stays flat), into
an E2E HDF5 cache ``e2e_runs/cache/<stem>-<hash>.h5``: the image channels-last
float32 under the same key, chunked one sample per chunk, gzip 4 + shuffle, and
every numeric one-value-per-row column copied. The hash covers the source's
absolute path, size and mtime and the conversion options (image key, layout,
tree), so an unchanged source reuses its cache and a changed one gets a new
file. The cache is written to a tmp file and renamed into place: a failed
conversion (bad values, truncated file, Ctrl-C) leaves nothing behind. The cache's identity and
path are :mod:`e2e_search.data.h5cache`'s; CSV files go through :func:`e2e_search.data.objects.csv_cache`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from e2e_search.data.h5cache import cache_ok, cache_path, cached_cfg, identity
from e2e_search.data.labels import check_labels, label_source, target_source
from e2e_search.data.objects import csv_cache
from e2e_search.data.splits import split_checked
from e2e_search.spec.schema import DataConfig, SearchSpace
from trainables.errors import UserError

if TYPE_CHECKING:
    import h5py

EXTENSIONS = {".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".parquet": "parquet", ".pq": "parquet",
              ".root": "root", ".csv": "csv"}
COMPRESSED = {".gz", ".gzip", ".bz2", ".xz", ".zip"}
"""Compression suffixes a CSV may carry (HIGGS.csv.gz); the CSV reader tells the compression from the bytes."""
CHUNK_BYTES = 32 * 2**20
"""Image bytes (as float64) read per conversion step: what bounds the memory of a conversion."""
MIN_SAMPLES = 10
TREE_CLASSES = {"TTree", "TNtuple", "TNtupleD", "ROOT::RNTuple"}
# Numeric scalar C++ types of RNTuple fields (TTree branches are told by their interpretation).
_SCALAR_TYPES = {"bool", "char", "float", "double", "short", "int", "long", "long long", "unsigned char",
                 "unsigned short", "unsigned int", "unsigned long", "unsigned long long",
                 *(f"{u}int{b}_t" for u in ("", "u") for b in (8, 16, 32, 64))}


def resolve_format(d: DataConfig) -> str:
    """``data.format``, with ``auto`` told from the extension of ``data.path``."""
    if d.format != "auto":
        return d.format
    suffixes = [x.lower() for x in Path(d.path).suffixes]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if suffix in COMPRESSED and len(suffixes) > 1:
        inner = EXTENSIONS.get(suffixes[-2])
        if inner == "csv":  # HIGGS.csv.gz as distributed: read through the decompressor
            return inner
        if inner:
            raise UserError(f"'{d.path}' is a compressed {inner} file; decompress it first and set data.path to the "
                            f"{suffixes[-2]} file ({inner} files are compressed inside)", key="data.path")
    raise UserError(
        f"cannot tell the format of '{d.path}' from its extension '{suffix or '(none)'}' "
        f"(known: {', '.join(EXTENSIONS)}); set data.format to hdf5, parquet, root or csv",
        key="data.format",
    )


def source_layout(d: DataConfig) -> str:
    """Layout of the images in a parquet/ROOT source: data.layout if given, else channels_first (the CMS release)."""
    return d.layout if "layout" in d.model_fields_set else "channels_first"


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _listing(names: list[str], most: int = 20) -> str:
    """Names for an error line: the first ``most``, then how many more."""
    if not names:
        return "nothing"
    more = f", ... ({len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


# --------------------------------------------------------------------------- sources
class _Source:
    """A parquet or ROOT file opened for reading, one row (entry) per sample."""

    fmt = ""
    what = "column"  # what the format calls a column, for messages

    def __init__(self, path: Path):
        self.path = path
        self.n = 0
        self.names: list[str] = []
        self.scalars: list[str] = []

    def image_rank(self, key: str) -> tuple[int, str]:
        """(rank of one row's value, a type description), from the schema or the first entry."""
        raise NotImplementedError

    def read_column(self, key: str, which: str) -> np.ndarray:
        """A whole one-value-per-row column (``which``: the config key naming it, for errors)."""
        raise NotImplementedError

    def batches(self, image_key: str, scalars: list[str], rows: int,
                limit: int | None = None) -> Iterator[tuple[np.ndarray, dict]]:
        """(images (k, a, b, c) as stored, {scalar: (k,)}) of consecutive rows, ``rows`` at a time."""
        raise NotImplementedError

    def row_bytes(self, image_key: str) -> int:
        """Bytes of one image as float64 (for the chunk size)."""
        raise NotImplementedError

    def check_lengths(self, keys: list[tuple[str, str]]) -> None:
        pass

    def close(self) -> None:
        pass


def _describe_arrow(t) -> str:
    return str(t).replace("element: ", "").replace("item: ", "")


class _Parquet(_Source):
    fmt, what = "parquet", "column"

    def __init__(self, path: Path):
        super().__init__(path)
        import pyarrow.parquet as pq

        # Buffered reads, no pre-buffering: a big row group is not loaded at once.
        self.pf = pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)
        self.n = self.pf.metadata.num_rows
        schema = self.pf.schema_arrow
        self.types = {f.name: f.type for f in schema}
        self.names = list(self.types)
        import pyarrow as pa

        self.scalars = [k for k, t in self.types.items()
                        if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)]

    def _depth(self, key: str):
        import pyarrow as pa

        t, rank = self.types[key], 0
        while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            t, rank = t.value_type, rank + 1
        return rank, t

    def image_rank(self, key: str) -> tuple[int, str]:
        import pyarrow as pa

        rank, leaf = self._depth(key)
        if rank and not (pa.types.is_floating(leaf) or pa.types.is_integer(leaf)):
            raise UserError(f"column '{key}' of {self.path} holds {_describe_arrow(self.types[key])}: "
                            "the image needs numeric values; set data.image_key to the image column", key="data.image_key")
        return rank, _describe_arrow(self.types[key])

    def row_bytes(self, image_key: str) -> int:
        for b in self.pf.iter_batches(batch_size=1, columns=[image_key]):
            if b.num_rows:
                arr = b.column(0)
                for _ in range(self._depth(image_key)[0]):
                    arr = arr.flatten()
                return max(1, len(arr)) * 8
        return 8

    def read_column(self, key: str, which: str) -> np.ndarray:
        col = self.pf.read(columns=[key]).column(0)
        if col.null_count:
            raise UserError(f"column '{key}' of {self.path} has {col.null_count} null values; fill or drop those rows",
                            key=which)
        v = col.to_numpy()
        if v.dtype == object and len(v) and all(isinstance(r, np.ndarray) for r in v[:1000]):
            try:  # list<number> per row, e.g. one-hot labels: (n, C) when every row has the same length
                v = np.stack(v)
            except ValueError:
                pass  # different lengths: data.class_indices names them
        return v

    def batches(self, image_key, scalars, rows, limit=None):
        start = 0
        for b in self.pf.iter_batches(batch_size=rows, columns=[image_key, *scalars], use_threads=True):
            if limit is not None and start >= limit:
                return
            images = _nested_to_numpy(b.column(image_key), self._depth(image_key)[0], image_key, start, self.path)
            out = {}
            for k in scalars:
                col = b.column(k)
                out[k] = None if col.null_count else col.to_numpy(zero_copy_only=False)
            yield images, out
            start += b.num_rows

    def close(self) -> None:
        self.pf.close()


def _nested_to_numpy(arr, rank: int, key: str, start: int, path: Path) -> np.ndarray:
    """A batch of nested lists -> numpy (rows, d1, .., d_rank), by flattening offsets (no Python loop over values)."""
    import pyarrow.compute as pc

    n = len(arr)
    shape = []
    level = arr
    for depth in range(rank):
        if level.null_count:
            raise UserError(f"column '{key}' of {path} has missing (null) {'rows' if depth == 0 else 'entries'} "
                            f"near row {start}; fill or drop those rows", key="data.image_key")
        lengths = pc.list_value_length(level)
        lo, hi = (v.as_py() for v in pc.min_max(lengths).values())
        if lo != hi:
            raise UserError(f"column '{key}' of {path} has images of different shapes (dimension {depth + 1} has "
                            f"{lo} to {hi} entries in rows {start}..{start + n - 1}); every image must have the same shape",
                            key="data.image_key")
        shape.append(int(hi or 0))
        level = level.flatten()
    if level.null_count:
        raise UserError(f"column '{key}' of {path} has null pixel values near row {start}; fill them or drop those rows",
                        key="data.image_key")
    return level.to_numpy(zero_copy_only=False).reshape(n, *shape)


class _Root(_Source):
    fmt, what = "root", "branch"

    def __init__(self, path: Path, tree: str | None):
        super().__init__(path)
        import uproot

        self.file = uproot.open(path)
        try:
            self._find_tree(tree)
        except BaseException:
            self.file.close()
            raise

    def _find_tree(self, tree: str | None) -> None:
        classes = {k.rsplit(";", 1)[0]: v for k, v in self.file.classnames(recursive=True).items()}
        trees = sorted(k for k, v in classes.items() if v in TREE_CLASSES)
        if tree is None:
            if len(trees) != 1:
                if trees:
                    raise UserError(f"{self.path} holds {len(trees)} trees ({_listing(trees)}); set data.tree to one of them",
                                    key="data.tree")
                has = _listing([f"{k} ({v})" for k, v in classes.items()])
                raise UserError(f"no TTree in {self.path} (it has: {has}); give a ROOT file with a TTree of one entry "
                                "per jet", key="data.path")
            tree = trees[0]
        elif tree not in trees:
            raise UserError(f"no tree '{tree}' in {self.path} (it has: {_listing(trees) if trees else 'no trees'}); "
                            "set data.tree to one of those", key="data.tree")
        self.tree_name = tree
        self.tree = self.file[tree]
        self.is_ttree = classes[tree] != "ROOT::RNTuple"
        self.n = int(self.tree.num_entries)
        self.names = list(self.tree.keys(recursive=False) if self.is_ttree else self.tree.keys())
        self.scalars = [k for k in self.names if self._is_scalar(k)]

    def _is_scalar(self, key: str) -> bool:
        import uproot

        obj = self.tree[key]
        if self.is_ttree:
            i = obj.interpretation
            return (isinstance(i, uproot.interpretation.numerical.AsDtype) and i.inner_shape == ()
                    and i.to_dtype.kind in "biuf")
        return obj.typename.removeprefix("std::") in _SCALAR_TYPES

    def _read(self, keys: list[str], **kw) -> dict:
        wanted = set(keys)
        return self.tree.arrays(filter_name=lambda name: name in wanted, library="np", **kw)

    def _first(self, key: str) -> np.ndarray:
        return self._read([key], entry_stop=1)[key]

    def image_rank(self, key: str) -> tuple[int, str]:
        typename = self.tree[key].typename
        if self.n == 0:
            return 0, typename
        first = self._first(key)
        if first.dtype == object:
            raise UserError(f"branch '{key}' ({typename}) of {self.path} is a variable-size array: the image must be "
                            "a fixed-size array per entry, e.g. float[3][125][125]; set data.image_key to such a branch",
                            key="data.image_key")
        if first.dtype.kind not in "biuf":
            raise UserError(f"branch '{key}' ({typename}) of {self.path} is not numeric; set data.image_key to the image branch",
                            key="data.image_key")
        return first.ndim - 1, typename

    def row_bytes(self, image_key: str) -> int:
        return max(1, int(np.prod(self._first(image_key).shape[1:]))) * 8

    def read_column(self, key: str, which: str) -> np.ndarray:
        return self._read([key])[key]

    def check_lengths(self, keys):
        image_n = None
        for key, which in keys:
            n = int(getattr(self.tree[key], "num_entries", self.n))
            if image_n is None:
                image_n = n
            elif n != image_n:
                raise UserError(f"branch '{keys[0][0]}' of {self.path} has {image_n} entries but '{key}' has {n}; "
                                "they must match", key=which)

    def batches(self, image_key, scalars, rows, limit=None):
        wanted = {image_key, *scalars}
        for chunk in self.tree.iterate(filter_name=lambda name: name in wanted, step_size=rows, library="np",
                                       entry_stop=limit):
            yield chunk[image_key], {k: chunk[k] for k in scalars}

    def close(self) -> None:
        self.file.close()


def _open(path: Path, fmt: str, d: DataConfig) -> _Source:
    label = {"parquet": "Parquet", "root": "ROOT"}[fmt]
    try:
        return _Parquet(path) if fmt == "parquet" else _Root(path, d.tree)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise UserError(f"'{path}' is not a readable {label} file ({_short(e)}); it may be truncated or corrupt: "
                        "copy it again (or set data.format if it is another format)", key="data.path") from None


# --------------------------------------------------------------------------- checks
def _check_source(cfg: SearchSpace, src: _Source) -> tuple[list[str], dict[str, np.ndarray]]:
    """Keys, rank, number of rows, labels and the split of a source, before anything is written.

    Returns (the scalar columns copied as they are, {label or target key: its checked, converted values}): the
    cache holds class indices (int64) and targets (float64) whatever the source stored (bool, whole floats,
    one-hot lists, ...; see :func:`e2e_search.data.inspect.class_indices`).
    """
    d = cfg.data
    has = _listing(src.names)
    if d.image_key not in src.names:
        raise UserError(f"no {src.what} '{d.image_key}' in {src.path} (it has: {has}); set data.image_key to one of those",
                        key="data.image_key")
    label, which = label_source(cfg)
    keys = [(label, which)] + ([target_source(cfg)] if cfg.task.type == "joint" else [])
    for key, w in keys:
        if key not in src.names:
            raise UserError(f"no {src.what} '{key}' in {src.path} (it has: {has}); set {w} to one of those", key=w)
    if src.n == 0:
        raise UserError(f"{src.path} has no rows (0 samples); give a file with at least {MIN_SAMPLES} samples",
                        key="data.path")
    rank, typename = src.image_rank(d.image_key)
    if rank != 3:
        raise UserError(f"{src.what} '{d.image_key}' of {src.path} holds {typename}, rank {rank} per sample: each sample "
                        "must be an image of rank 3 (C, H, W or H, W, C); set data.image_key to the image", key="data.image_key")
    src.check_lengths([(d.image_key, "data.image_key"), *keys])
    if src.n < MIN_SAMPLES:
        raise UserError(f"'{d.image_key}' has only {src.n} samples; need at least {MIN_SAMPLES}", key="data.image_key")
    values = {}
    for i, (key, w) in enumerate(keys):
        v = src.read_column(key, w)
        if len(v) != src.n:
            raise UserError(f"'{d.image_key}' has {src.n} samples but '{key}' has {len(v)}; they must match", key=w)
        values[key] = check_labels(cfg, v, key, w, src.path, target=None if i == 0 else True)
    y, t = values[label], (values[keys[1][0]] if len(keys) > 1 else None)
    split_checked(cfg, src.n, y, t)
    return [k for k in src.scalars if k not in values], values


def _to_hwc(images: np.ndarray, layout: str, key: str, path: Path, start: int, expect: tuple | None) -> np.ndarray:
    """A chunk as stored -> float32 (k, H, W, C), checked for finite values and for the shape of earlier chunks."""
    x = images.astype(np.float32, copy=False)
    if layout == "channels_first":
        x = np.moveaxis(x, 1, -1)
    if expect is not None and x.shape[1:] != expect:
        raise UserError(f"'{key}' in {path} changes image shape at row {start}: {x.shape[1:]} after {expect}; "
                        "every image must have the same shape", key="data.image_key")
    if not np.isfinite(x).all():
        row = start + int(np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(axis=1))[0])
        raise UserError(f"'{key}' in {path} contains NaN or Inf values (first at row {row}); clean the file or drop "
                        "those samples", key="data.image_key")
    return np.ascontiguousarray(x)


def _check_shape(cfg: SearchSpace, hwc: tuple, layout: str, explicit: bool, src: _Source) -> None:
    d = cfg.data
    H, W, C = hwc
    if not explicit and layout == "channels_first" and W <= 4 < C:
        # Stored (H, W, C) read as (C, H, W): 125 "channels" of 125x3 images.
        raise UserError(f"'{d.image_key}' in {src.path} has rows of shape {C}x{H}x{W}, which looks channels-last, but "
                        f"{src.fmt} files default to data.layout: channels_first; set data.layout: channels_last "
                        "(or channels_first to keep this reading)", key="data.layout")
    channels = d.channels if d.channels is not None else list(range(C))
    bad = [c for c in channels if not 0 <= c < C]
    if bad or not channels:
        raise UserError(f"channel {bad[0] if bad else '[]'} does not exist: the file has {C} channels (0..{C - 1}) "
                        f"in layout {layout}", key="data.channels")


def _convert(src: _Source, cfg: SearchSpace, layout: str, scalars: list[str], labels: dict[str, np.ndarray],
             cache: Path, ident: dict, first_hwc: tuple, rows: int) -> None:
    """Stream ``src`` into ``cache`` (tmp file + rename); on any error nothing is left."""
    import h5py

    d = cfg.data
    key = d.image_key
    H, W, C = first_hwc
    made = []  # directories created here, removed again if the conversion fails
    for p in reversed([cache.parent, *cache.parent.parents]):
        if not p.exists():
            made.append(p)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    tty = sys.stderr.isatty()
    t0 = time.time()
    ok = False
    try:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the cache folder '{cache.parent}' ({e.strerror}); run from a writable "
                            "directory", key="data.path") from None
        with h5py.File(tmp, "w") as f:
            X = f.create_dataset(key, (src.n, H, W, C), np.float32, chunks=(1, H, W, C), compression="gzip",
                                 compression_opts=4, shuffle=True)
            for name, v in labels.items():  # checked and converted by _check_source
                f.create_dataset(name, data=v)
            dropped = _copy_rows(src, f, X, key, layout, (H, W, C), scalars, rows, tty)
            for name in dropped:
                if name in f:
                    del f[name]
            f.attrs.update(ident)
            f.attrs.update(channel_layout="channels_last", n=src.n, complete=True, created=time.time())
        os.replace(tmp, cache)
        ok = True
    finally:
        if tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        if tmp.exists():
            tmp.unlink()
        if not ok:
            _remove_dirs(made)
    print(f"data: converted {src.path} ({src.fmt}, {src.n} rows, {C}x{H}x{W}) to {cache} in {time.time() - t0:.1f}s; "
          "reused while the file is unchanged", file=sys.stderr)


def _copy_rows(src: _Source, f: h5py.File, X: h5py.Dataset, key: str, layout: str, hwc: tuple, scalars: list[str],
               rows: int, tty: bool) -> set[str]:
    """Copy every row of ``src`` into the open cache ``f``: the images (``key``, as ``hwc``) into ``X``, the
    ``scalars`` into datasets of their own, ``rows`` at a time (progress on stderr when ``tty``). Returns the
    scalar columns that hold nulls (to be left out of the cache)."""
    dsets: dict[str, h5py.Dataset] = {}
    dropped: set[str] = set()
    start = 0
    try:
        for images, cols in src.batches(key, scalars, rows):
            k = len(images)
            if start + k > src.n:
                raise UserError(f"{src.path} holds more rows than its metadata says ({src.n}); the file is "
                                "corrupt: copy it again", key="data.path")
            X[start : start + k] = _to_hwc(images, layout, key, src.path, start, hwc)
            for name, v in cols.items():
                if v is None:  # nulls in a column the search does not use: left out of the cache
                    dropped.add(name)
                    continue
                if name not in dsets:
                    dt = np.uint8 if v.dtype == bool else v.dtype
                    dsets[name] = f.create_dataset(name, (src.n,), dt)
                dsets[name][start : start + k] = v
            start += k
            if tty:
                print(f"\r  converting {src.path.name}: {start}/{src.n} rows", end="", file=sys.stderr, flush=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a read failure mid-file: truncated or corrupt
        raise UserError(f"cannot read row {start} of '{src.path}' ({_short(e)}); the file may be truncated or "
                        "corrupt: copy it again", key="data.path") from None
    if start != src.n:
        raise UserError(f"'{src.path}' ended after {start} of its {src.n} rows; the file is truncated: copy it again",
                        key="data.path")
    return dropped


def _remove_dirs(made: list[Path]) -> None:
    """Remove the (empty) directories ``made`` for a conversion that failed, deepest first."""
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------- entry point
def materialize(cfg: SearchSpace, *, generate: bool = True) -> SearchSpace | None:
    """The config to inspect and train on: itself for HDF5, else a copy pointing at the HDF5 cache of ``data.path``.

    With ``generate=False`` (``validate``, ``--dry-run``) nothing is written: a
    parquet/ROOT source with no cache yet is checked (keys, rank, rows,
    labels, the first chunk's values) and None is returned.
    """
    d = cfg.data
    try:
        fmt = resolve_format(d)
    except UserError:
        if not Path(d.path).is_file():
            return cfg  # inspect() says the file is missing or a directory, naming data.path
        raise
    if fmt == "hdf5":
        return cfg
    if fmt == "csv":
        return csv_cache(cfg, generate=generate)
    path = Path(d.path)
    if path.is_dir():
        raise UserError(f"'{d.path}' is a directory; give the path of a {fmt} file", key="data.path")
    if not path.is_file():
        raise UserError(f"file '{d.path}' not found; fix the path "
                        f"(e.g. --set data.path=FILE.{'parquet' if fmt == 'parquet' else 'root'})",
                        key="data.path")
    if path.stat().st_size == 0:
        raise UserError(f"'{d.path}' is empty (0 bytes); give a complete {'Parquet' if fmt == 'parquet' else 'ROOT'} file",
                        key="data.path")
    layout = source_layout(d)
    ident = identity(path, fmt, d, layout)
    cache = cache_path(ident)
    need = (label_source(cfg)[0],) + ((target_source(cfg)[0],) if cfg.task.type == "joint" else ())
    if cache_ok(cache, ident, need):
        return cached_cfg(cfg, cache)

    src = _open(path, fmt, d)
    try:
        try:
            scalars, labels = _check_source(cfg, src)
            rows = max(1, min(65536, CHUNK_BYTES // src.row_bytes(d.image_key)))
            first = next(src.batches(d.image_key, [], min(rows, src.n), limit=min(rows, src.n)))[0]
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot read '{d.path}' ({_short(e)}); the file may be truncated or corrupt: copy it again",
                            key="data.path") from None
        hwc = _to_hwc(first, layout, d.image_key, path, 0, None).shape[1:]
        _check_shape(cfg, hwc, layout, "layout" in d.model_fields_set, src)
        if not generate:
            return None
        _convert(src, cfg, layout, scalars, labels, cache, ident, hwc, rows)
    finally:
        src.close()
    return cached_cfg(cfg, cache)
