"""The HDF5 data file opened for reading, and its datasets, with a UserError naming the ``data.*`` key at fault."""

from __future__ import annotations

from pathlib import Path

import h5py

from trainables.errors import UserError

try:  # registers compression filters beyond gzip/lzf (blosc, lz4, zstd ...) with HDF5 when installed
    import hdf5plugin  # noqa: F401

    EXTRA_FILTERS = True
except ImportError:
    EXTRA_FILTERS = False
"""Whether hdf5plugin's filters are loaded (every module reading HDF5 imports this one first)."""


def open_h5(d) -> h5py.File:
    """The data file of ``data`` opened read-only, or a UserError naming data.path."""
    path = Path(d.path)
    if path.is_dir():
        raise UserError(f"'{d.path}' is a directory; give the path of an HDF5 file", key="data.path")
    if not path.is_file():
        hint = " or add a data.generate recipe" if d.generate is None else ""
        raise UserError(f"file '{d.path}' not found; fix the path (e.g. --set data.path=FILE.h5){hint}", key="data.path")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"'{d.path}' is not a readable HDF5 file ({str(e).split('(')[0].strip()}); check the file",
                        key="data.path") from None


def need_dataset(f: h5py.File, key: str, which: str, path: str) -> h5py.Dataset:
    """Dataset ``key`` of ``f``, readable as stored: a missing key, a link that cannot be opened (an external link to
    a missing file), a filter this h5py lacks (blosc, lz4 ...) or a virtual dataset with missing sources (read as
    fill values, silently) is a UserError naming ``which`` (issue 30, kind 1)."""
    link = _link(f, key)
    if link is None:
        raise UserError(
            f"no dataset '{key}' in {path} (it has: {', '.join(f.keys()) or 'nothing'}); set {which} to one of those",
            key=which,
        )
    try:
        obj = f[key]
    except (KeyError, OSError) as e:
        what = (f"an external link to '{link.path}' in '{link.filename}'" if isinstance(link, h5py.ExternalLink)
                else "a link")
        raise UserError(f"'{key}' in {path} is {what} that cannot be opened ({_short(e)}); copy the data into the "
                        "file (h5copy) or fix the link", key=which) from None
    if not isinstance(obj, h5py.Dataset):
        raise UserError(
            f"no dataset '{key}' in {path} (it has: {', '.join(f.keys()) or 'nothing'}); set {which} to one of those",
            key=which,
        )
    _check_readable(obj, key, which, path)
    return obj


def _link(f: h5py.File, key: str):
    """The link named ``key`` (hard, soft or external), even when its target cannot be opened; None if none."""
    try:
        return f.get(key, getlink=True)
    except (KeyError, OSError, ValueError):
        return None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text.split(" (")[0][:200] or type(e).__name__


def _check_readable(ds: h5py.Dataset, key: str, which: str, path: str) -> None:
    """The dataset's compression filters are available, and a virtual dataset's source files exist."""
    plist = ds.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code, _, _, name = plist.get_filter(i)
        if not h5py.h5z.filter_avail(code):
            label = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            raise UserError(f"'{key}' in {path} is compressed with HDF5 filter {code} ({label or 'unnamed'}), which "
                            "this h5py cannot read; pip install hdf5plugin (the search loads it when installed) or "
                            "rewrite the file with gzip", key=which)
    if ds.is_virtual:
        here = Path(path).resolve().parent
        for src in ds.virtual_sources():
            name = src.file_name
            if name != "." and not (Path(name) if Path(name).is_absolute() else here / name).is_file():
                raise UserError(f"'{key}' in {path} is a virtual dataset whose source file '{name}' is missing "
                                "(h5py would read fill values in its place); put the source files beside it or "
                                "copy the data into one file", key=which)
