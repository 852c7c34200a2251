"""The HDF5 data file opened for reading, and its datasets, with a UserError naming the ``data.*`` key at fault."""

from __future__ import annotations

from pathlib import Path

import h5py

from trainables.errors import UserError


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
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise UserError(
            f"no dataset '{key}' in {path} (it has: {', '.join(f.keys()) or 'nothing'}); set {which} to one of those",
            key=which,
        )
    return f[key]
