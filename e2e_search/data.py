"""E2E HDF5 image datasets: inspection before Ray starts, lazy reading in each worker.

Layout of an E2E file (keys configurable in the YAML ``data`` section)::

    X_jets  (N, H, W, C) float   channels_last   (or (N, C, H, W) channels_first)
    y       (N,)         int     class label
    m0, pt  (N,)         float   truth (regression targets)
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .config import SearchSpace
from .errors import UserError


@dataclass
class DataSetup:
    """Everything a worker needs to read the data; plain values, shipped to Ray."""

    path: str
    image_key: str
    label_key: str
    layout: str
    channels: list[int]
    in_chans: int
    img_size: tuple[int, int]
    task: str
    num_classes: int
    train: list[int]
    val: list[int]
    test: list[int]
    mean: list[float] | None
    std: list[float] | None
    target_mean: float = 0.0
    target_std: float = 1.0
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        kind = f"{self.num_classes} classes" if self.task == "classification" else f"target '{self.label_key}'"
        return (
            f"{self.path}: {len(self.train)}/{len(self.val)}/{len(self.test)} train/val/test, "
            f"{self.in_chans}x{self.img_size[0]}x{self.img_size[1]} images, {kind}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int, limit: int | None = None):
    """Deterministic train/val/test split of ``range(n)`` (sorted index lists)."""
    perm = np.random.default_rng(seed).permutation(n)
    if limit is not None:
        perm = perm[:limit]
    m = len(perm)
    n_test = int(round(m * test_fraction))
    n_val = max(1, int(round(m * val_fraction)))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())


def _check_finite(arr: np.ndarray, key: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise UserError(f"contains NaN or Inf values; clean the file or drop those samples", key=key)


def inspect(cfg: SearchSpace) -> DataSetup:
    """Validate the data file against the config and compute splits and statistics.

    Reads only labels and a sample of images; raises :class:`UserError` naming
    ``data.*`` keys. Writes nothing.
    """
    d = cfg.data
    path = Path(d.path)
    if path.is_dir():
        raise UserError(f"'{d.path}' is a directory; give the path of an HDF5 file", key="data.path")
    if not path.is_file():
        hint = " or add a data.generate recipe" if d.generate is None else ""
        raise UserError(f"file '{d.path}' not found; fix the path (e.g. --set data.path=FILE.h5){hint}", key="data.path")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"'{d.path}' is not a readable HDF5 file ({str(e).split('(')[0].strip()}); check the file", key="data.path") from None
    with f:
        keys = list(f.keys())

        def need(key: str, which: str) -> h5py.Dataset:
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise UserError(
                    f"no dataset '{key}' in {d.path} (it has: {', '.join(keys) or 'nothing'}); set {which} to one of those",
                    key=which,
                )
            return f[key]

        X = need(d.image_key, "data.image_key")
        label_key = d.label_key if cfg.task.type == "classification" else cfg.target_key
        label_which = "data.label_key" if cfg.task.type == "classification" else ("data.target_key" if d.target_key else "task.target")
        Y = need(label_key, label_which)
        if X.ndim != 4:
            raise UserError(
                f"'{d.image_key}' has shape {X.shape}: each sample must be an image of rank 3 (H, W, C or C, H, W)",
                key="data.image_key",
            )
        if len(X) != len(Y):
            raise UserError(
                f"'{d.image_key}' has {len(X)} samples but '{label_key}' has {len(Y)}; they must match",
                key=label_which,
            )
        if len(X) < 10:
            raise UserError(f"'{d.image_key}' has only {len(X)} samples; need at least 10", key="data.image_key")
        if d.layout == "channels_last":
            _, H, W, C = X.shape
        else:
            _, C, H, W = X.shape
        channels = d.channels if d.channels is not None else list(range(C))
        bad = [c for c in channels if not 0 <= c < C]
        if bad or not channels:
            raise UserError(
                f"channel {bad[0] if bad else '[]'} does not exist: the file has {C} channels (0..{C - 1}) in layout {d.layout}",
                key="data.channels",
            )
        if len(d.mean or channels) != len(channels):
            raise UserError(f"mean/std need {len(channels)} values (one per channel)", key="data.mean")
        y = Y[...]
        if y.ndim != 1:
            raise UserError(f"'{label_key}' must be one value per sample, got shape {y.shape}", key=label_which)
        _check_finite(y, label_which)
        train, val, test = split_indices(len(X), d.val_fraction, d.test_fraction, d.seed, d.limit)
        setup = DataSetup(
            path=str(path.resolve()),
            image_key=d.image_key,
            label_key=label_key,
            layout=d.layout,
            channels=list(channels),
            in_chans=len(channels),
            img_size=(int(H), int(W)),
            task=cfg.task.type,
            num_classes=cfg.task.num_classes or 0,
            train=train,
            val=val,
            test=test,
            mean=d.mean,
            std=d.std,
        )
        if cfg.task.type == "classification":
            if y.dtype.kind == "f" and not np.all(y == np.round(y)):
                raise UserError(f"'{label_key}' holds non-integer labels; classification needs class indices", key=label_which)
            yi = y.astype(np.int64)
            if yi.min() < 0 or yi.max() >= setup.num_classes:
                raise UserError(
                    f"labels range {yi.min()}..{yi.max()} but task.num_classes is {setup.num_classes}; fix task.num_classes",
                    key="task.num_classes",
                )
        else:
            t = y[train].astype(np.float64)
            setup.target_mean, setup.target_std = float(t.mean()), float(t.std() or 1.0)
        sample = sorted(np.random.default_rng(d.seed + 1).choice(train, min(len(train), d.stats_samples), replace=False).tolist())
        imgs = to_chw(X[sample], d.layout)[:, channels].astype(np.float64)
        _check_finite(imgs, "data.image_key")
        if d.normalize == "per_channel" and d.mean is None:
            setup.mean = imgs.mean(axis=(0, 2, 3)).tolist()
            setup.std = [float(s) if s > 0 else 1.0 for s in imgs.std(axis=(0, 2, 3))]
        elif d.normalize == "none":
            setup.mean = setup.std = None
    return setup


def to_chw(x: np.ndarray, layout: str) -> np.ndarray:
    """(..., H, W, C) -> (..., C, H, W) for channels_last; unchanged otherwise."""
    return np.moveaxis(x, -1, -3) if layout == "channels_last" else x


class H5ImageDataset:
    """Map-style dataset over some indices of an E2E HDF5 file.

    The file is opened lazily, once per process (DataLoader workers and Ray
    workers each get their own handle; h5py handles do not survive fork).
    Items: (image float32 (C, H, W), label int64 | normalized target float32).
    """

    def __init__(self, setup: DataSetup | dict, indices: list[int]):
        self.s = setup if isinstance(setup, DataSetup) else DataSetup(**setup)
        self.indices = np.asarray(indices, dtype=np.int64)
        self._file: h5py.File | None = None
        self._pid = -1
        C = self.s.in_chans
        self._mean = np.asarray(self.s.mean, np.float32).reshape(C, 1, 1) if self.s.mean else None
        self._std = np.asarray(self.s.std, np.float32).reshape(C, 1, 1) if self.s.std else None

    def _open(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.s.path, "r")
            self._pid = os.getpid()
        return self._file

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch

        f = self._open()
        j = int(self.indices[i])
        x = to_chw(np.asarray(f[self.s.image_key][j], dtype=np.float32), self.s.layout)[self.s.channels]
        if self._mean is not None:
            x = (x - self._mean) / self._std
        y = f[self.s.label_key][j]
        if self.s.task == "classification":
            label = torch.tensor(int(y), dtype=torch.long)
        else:
            label = torch.tensor((float(y) - self.s.target_mean) / self.s.target_std, dtype=torch.float32)
        return torch.from_numpy(np.ascontiguousarray(x)), label

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        return state
