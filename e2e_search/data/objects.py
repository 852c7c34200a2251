"""Event-level data as padded lists of objects (leptons, missing momentum, jets, ...).

Layout (HDF5, e.g. from ``e2e-search data generate event_objects`` or a converted
HIGGS-style CSV)::

    X_objects  (N, n_objects, n_features) float   pt, eta, phi, b-tag, ...
    mask       (N, n_objects)             0/1     real object (1) or padding (0)
    y          (N,)                       int     class label

The arrays are small (tens of floats per event): each worker loads its split
into memory. Features are standardized per feature over the real objects of a
training sample; padding stays 0.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from e2e_search.data.h5cache import cache_ok, cache_path, cached_cfg, identity
from e2e_search.data.labels import check_labels, label_source, read_labels, target_source
from e2e_search.data.splits import label_order_checked, split_checked
from e2e_search.spec.schema import SearchSpace
from trainables.data.h5file import need_dataset, open_h5
from trainables.data.setup import DataSetup
from trainables.data.targets import target_stats
from trainables.errors import UserError


def inspect_objects(cfg: SearchSpace) -> DataSetup:
    d = cfg.data
    with open_h5(d) as f:
        X = need_dataset(f, d.image_key, "data.image_key", d.path)
        label_key, which = label_source(cfg)
        y, t, _, tkey = read_labels(cfg, lambda key, w: need_dataset(f, key, w, d.path))
        if X.ndim != 3:
            raise UserError(f"'{d.image_key}' has shape {X.shape}: object lists must be (N, n_objects, n_features) "
                            f"(images? use an image family such as vit)", key="data.image_key")
        n, n_obj, n_feat = X.shape
        if len(y) != n:
            raise UserError(f"'{d.image_key}' has {n} samples but '{label_key}' has {len(y)}; they must match", key=which)
        if n < 10:
            raise UserError(f"'{d.image_key}' has only {n} samples; need at least 10", key="data.image_key")
        mask_key = d.mask_key if d.mask_key in f else None
        if mask_key and f[mask_key].shape != (n, n_obj):
            raise UserError(f"'{mask_key}' has shape {f[mask_key].shape}, expected ({n}, {n_obj})", key="data.mask_key")
        train, val, test = split_checked(cfg, n, y, t)
        slot_types = _slot_types(f, n_obj)
        sample = sorted(np.random.default_rng(d.seed + 1).choice(train, min(len(train), d.stats_samples * 8),
                                                                 replace=False).tolist())
        xs = X[sample].astype(np.float64)
        if not np.isfinite(xs).all():
            raise UserError(f"'{d.image_key}' contains NaN or Inf values; clean the file", key="data.image_key")
        ms = f[mask_key][sample].astype(bool) if mask_key else np.ones(xs.shape[:2], bool)
    setup = DataSetup(path=str(Path(d.path).resolve()), image_key=d.image_key, label_key=label_key, layout="objects",
                      channels=list(range(n_feat)), in_chans=n_feat, img_size=(n_obj, n_feat), task=cfg.task.type,
                      num_classes=cfg.task.num_classes or 0, train=train, val=val, test=test, mean=d.mean, std=d.std,
                      kind="objects", mask_key=mask_key, target_key=tkey, label_order=label_order_checked(cfg, train, y),
                      slot_types=slot_types)
    if d.mean is not None and len(d.mean) != n_feat:
        raise UserError(f"mean/std need {n_feat} values (one per feature)", key="data.mean")
    if d.normalize == "per_channel" and d.mean is None:
        real = xs[ms]  # (n_real_objects, n_features)
        setup.mean = real.mean(axis=0).tolist()
        setup.std = [float(v) if v > 0 else 1.0 for v in real.std(axis=0)]
    elif d.normalize == "none":
        setup.mean = setup.std = None
    if cfg.task.regresses:
        setup.target_mean, setup.target_std = target_stats(y if t is None else t, train)
    return setup




def _slot_types(f, n_obj: int) -> list[int] | None:
    """The object type of each slot from the file's ``object_type`` (N, n_objects) dataset (``f``: the open
    h5py.File), when every event has the same types in the same slots (``data generate event_objects``: lepton,
    missing pT, 4 jets); else None (``object_embedding: type`` then gives each slot its own type)."""
    if "object_type" not in f or f["object_type"].shape[1:] != (n_obj,):
        return None
    types = np.asarray(f["object_type"][: min(len(f["object_type"]), 10_000)])
    if len(types) == 0 or not (types == types[0]).all() or types.min() < 0 or types.max() > 1000:
        return None
    return [int(v) for v in types[0]]


# --------------------------------------------------------------------------- HIGGS-style CSV
HIGGS_LOW_LEVEL = 21
"""Columns after the label: lepton pT, eta, phi; missing-energy magnitude, phi; 4 jets x (pT, eta, phi, b-tag)."""

_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"PK\x03\x04", "zip"),
          (b"\x28\xb5\x2f\xfd", "zstd"))
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def higgs_objects(features: np.ndarray) -> np.ndarray:
    """(n, >= 21) HIGGS low-level features -> (n, 6, 4) objects in the generator's layout."""
    f = features
    n = len(f)
    obj = np.zeros((n, 6, 4), np.float32)
    obj[:, 0, :3] = f[:, 0:3]                          # lepton pt, eta, phi
    obj[:, 1, 0], obj[:, 1, 2] = f[:, 3], f[:, 4]      # MET magnitude, phi
    obj[:, 2:] = f[:, 5:21].reshape(n, 4, 4)           # jets: pt, eta, phi, b-tag
    return obj


def _open_csv_bytes(path: Path):
    """The decompressed bytes of ``path`` (gzip, bz2, xz or a one-file zip, told by their magic bytes, not the
    extension) as a binary file object, and the compression's name (None: plain)."""
    with path.open("rb") as f:
        head = f.read(8)
    comp = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if comp == "zstd":
        raise UserError(f"'{path}' is zstd-compressed, which needs the zstandard package; decompress it first "
                        f"(zstd -d {path.name}) and set data.path to the .csv", key="data.path")
    if comp == "zip":
        z = zipfile.ZipFile(path)
        names = [i.filename for i in z.infolist() if not i.is_dir()]
        if len(names) != 1:
            raise UserError(f"'{path}' is a zip archive of {len(names)} files ({', '.join(names[:5])}); extract the "
                            "CSV and set data.path to it", key="data.path")
        return z.open(names[0]), comp
    openers: dict[str | None, Callable[..., Any]] = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open, None: open}
    opener = openers[comp]
    return opener(path, "rb"), comp


def _sniff_csv(path: Path) -> tuple[str, str, bool, list[str]]:
    """(encoding, delimiter, header?, first row's fields) from the decompressed start of the file.

    Encoding: from a byte-order mark (UTF-8, UTF-16, UTF-32), else UTF-8. Delimiter: the most frequent of
    ``,`` ``;`` tab in the first line, else whitespace. Header: the first line is a header when none of its fields
    is a number (so a headerless file loses no row, and a header is never read as data).
    """
    try:
        fh, comp = _open_csv_bytes(path)
        with fh:
            head = fh.read(1 << 16)
    except UserError:
        raise
    except _READ_ERRORS as e:
        raise UserError(f"cannot read '{path}' ({_short(e)}); the file may be truncated or corrupt: copy it again",
                        key="data.path") from None
    enc = next((name for bom, name in _BOMS if head.startswith(bom)), "utf-8")
    text = head.decode(enc, errors="replace")
    lines = [ln.strip("\r") for ln in text.split("\n")]
    first = next((ln for ln in lines if ln.strip()), "")
    counts = {sep: first.count(sep) for sep in (",", ";", "\t")}
    sep = max(counts, key=counts.__getitem__) if max(counts.values()) else r"\s+"
    fields = [v.strip().strip("\"'").strip() for v in (first.split() if sep == r"\s+" else first.split(sep))]

    def number(v: str) -> bool:
        try:
            float(v)
            return True
        except ValueError:
            return False

    # A header names its columns: no field is a number. A row of some numbers and some words is data with bad
    # values (refused with its row), never a header that would silently drop a sample.
    return enc, sep, not any(number(v) for v in fields), fields


_READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zipfile.BadZipFile)
"""What a truncated or corrupt compressed file raises while it is read (gzip's BadGzipFile is an OSError)."""


def _short(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_csv_rows(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """All data rows of a numeric CSV as float64 (n, columns) and the header's names (None: no header).

    Compression (gzip, bz2, xz, zip), byte-order marks, CRLF line ends and a header are handled; a value that is
    not a number becomes NaN (reported by the caller with its row).
    """
    import pandas as pd

    enc, sep, header, fields = _sniff_csv(path)
    fh, _ = _open_csv_bytes(path)
    try:
        with fh:
            chunks = []
            for c in pd.read_csv(fh, header=0 if header else None, sep=sep, encoding=enc, encoding_errors="replace",
                                 chunksize=200_000, skipinitialspace=True):
                if not all(pd.api.types.is_numeric_dtype(t) for t in c.dtypes):
                    c = c.apply(pd.to_numeric, errors="coerce")
                chunks.append(c.to_numpy(np.float64))
                names = [str(k).strip() for k in c.columns] if header else None
    except _READ_ERRORS as e:
        raise UserError(f"cannot read '{path}' ({_short(e)}); the file may be truncated or corrupt: copy it again",
                        key="data.path") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad file
        raise UserError(f"cannot parse '{path}' as CSV ({(str(e).splitlines() or [type(e).__name__])[0]}); check that "
                        "it is a comma-separated text file of numbers (set data.format if it is another format)",
                        key="data.path") from None
    if not chunks:
        return np.zeros((0, len(fields))), (fields if header else None)
    return np.concatenate(chunks), names


def csv_cache(cfg: SearchSpace, *, generate: bool = True) -> SearchSpace | None:
    """A HIGGS-style CSV (a class label and >= 21 low-level features per row) -> objects HDF5 cache.

    The label is the first column, unless a header row names ``data.label_key`` (then that column). Every
    check (columns, values, labels, the split) runs before anything is written; with ``generate=False``
    (``validate``, ``--dry-run``) nothing is written at all.
    """
    d = cfg.data
    path = Path(d.path)
    _check_csv_file(d.path, path)
    label, which = label_source(cfg)
    target = target_source(cfg) if cfg.task.type == "joint" else None
    ident = identity(path, "csv", d, "objects") | {"image_key": d.image_key, "label_key": label,
                                                    "target_key": target[0] if target else ""}
    cache = cache_path(ident)
    if cache_ok(cache, ident):
        return cached_cfg(cfg, cache)
    rows, names = read_csv_rows(path)
    li, cols = _csv_columns(cfg, rows, names, label, target)
    y, t = _csv_labels(cfg, path, rows, names, li, cols, label, which, target)
    split_checked(cfg, len(rows), y, t)
    if not generate:
        return None
    _write_csv_cache(cfg, cache, ident, rows, cols, label, y, target, t)
    return cached_cfg(cfg, cache)


def _check_csv_file(name: str, path: Path) -> None:
    """Refuse a ``data.path`` (``name``, as given) that is a directory, missing or empty."""
    if path.is_dir():
        raise UserError(f"'{name}' is a directory; give the path of a CSV file", key="data.path")
    if not path.is_file():
        raise UserError(f"file '{name}' not found; fix the path (e.g. --set data.path=FILE.csv)", key="data.path")
    if path.stat().st_size == 0:
        raise UserError(f"'{name}' is empty (0 bytes); give a CSV with a label and 21+ feature columns", key="data.path")


def _csv_columns(cfg: SearchSpace, rows: np.ndarray, names: list[str] | None, label: str,
                 target: tuple[str, str] | None) -> tuple[int, list[int]]:
    """(index of the label column, [it and the joint target's column]) of the CSV's ``rows``, after checking that
    there are rows, the target column, enough feature columns and only finite values."""
    d = cfg.data
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise UserError(f"'{d.path}' has no data rows; give a CSV with a label and {HIGGS_LOW_LEVEL}+ feature "
                        "columns per row", key="data.path")
    header = names is not None
    li = names.index(label) if names is not None and label in names else 0
    cols = [li]
    if target:
        if names is None or target[0] not in names:
            raise UserError(f"a joint task needs a target column named '{target[0]}' in the CSV's header (it has "
                            f"{'no header' if names is None else ', '.join(names[:30])}); add it, or set task.type: "
                            "classification", key=target[1])
        cols.append(names.index(target[0]))
    if rows.shape[1] - len(cols) < HIGGS_LOW_LEVEL:
        raise UserError(f"'{d.path}' has {rows.shape[1]} columns; a HIGGS-style CSV needs the label and at least "
                        f"{HIGGS_LOW_LEVEL} features: give such a file (set data.format if it is not a CSV)",
                        key="data.path")
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise UserError(f"'{d.path}' data row {bad[0] + 1} (line {bad[0] + 1 + header}) has NaN, Inf or non-numeric "
                        "values; clean the file or drop that row", key="data.path")
    return li, cols


def _csv_labels(cfg: SearchSpace, path: Path, rows: np.ndarray, names: list[str] | None, li: int, cols: list[int],
                label: str, which: str, target: tuple[str, str] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(checked class labels of column ``li``, checked joint targets of ``cols[1]`` or None) of the CSV's ``rows``."""
    col_name = f"column {li + 1}" + (f" ('{names[li]}')" if names is not None else "")
    try:
        y = check_labels(cfg, rows[:, li], col_name, which, path.name)
    except UserError as e:
        if e.key != which or (names is not None and label in names) or not cfg.task.classifies:
            raise
        raise _first_column_error(cfg, path, rows, label, which) from None
    t = check_labels(cfg, rows[:, cols[1]], target[0], target[1], path.name, target=True) if target else None
    return y, t


def _first_column_error(cfg: SearchSpace, path: Path, rows: np.ndarray, label: str, which: str) -> UserError:
    """The refusal of labels taken by position (column 1) that are not class indices."""
    # The label was taken by position: say so, and where the labels seem to be.
    C = cfg.task.num_classes
    assert C is not None  # TaskConfig sets num_classes for a task that classifies
    first, last = rows[:, 0], rows[:, -1]
    frac = np.flatnonzero(first != np.round(first))
    reason = (f"holds non-integer values (e.g. {first[frac[0]]:g} in data row {frac[0] + 1})" if len(frac)
              else f"holds {int(first.min())}..{int(first.max())}, not class indices 0..{C - 1}")
    looks = bool(np.all(last == np.round(last)) and last.min() >= 0 and last.max() < C and len(np.unique(last)) > 1)
    fix = (f"the last column looks like the class labels: add a header line whose last name is '{label}' "
           "(or move that column first)" if looks else
           f"put the class index (0..{C - 1}) in the first column, or add a header line naming the label "
           f"column '{label}'")
    return UserError(f"column 1 of {path.name} {reason}, but a HIGGS-style CSV holds the class label there unless "
                     f"a header row names data.label_key ('{label}'); {fix}", key=which)


def _write_csv_cache(cfg: SearchSpace, cache: Path, ident: dict, rows: np.ndarray, cols: list[int], label: str,
                     y: np.ndarray, target: tuple[str, str] | None, t: np.ndarray | None) -> None:
    """Write the objects HDF5 ``cache`` of the checked CSV ``rows`` (tmp file + rename: a failure leaves nothing)."""
    import os

    import h5py

    d = cfg.data
    features = np.delete(rows, cols, axis=1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f[d.image_key] = higgs_objects(features)
            f[d.mask_key] = np.ones((len(rows), 6), np.uint8)
            f[label] = y
            if target:
                f[target[0]] = t
            f["X_features"] = features.astype(np.float32)
            f.attrs.update(ident)
            f.attrs.update(complete=True, n=len(rows))
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            tmp.unlink()
