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

from pathlib import Path

import numpy as np

from .config import SearchSpace
from .data import DataSetup, encode_labels, label_source, need_dataset, read_labels, open_h5, split_indices, target_stats
from .errors import UserError


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
        train, val, test = split_indices(n, d.val_fraction, d.test_fraction, d.seed, d.limit)
        sample = sorted(np.random.default_rng(d.seed + 1).choice(train, min(len(train), d.stats_samples * 8),
                                                                 replace=False).tolist())
        xs = X[sample].astype(np.float64)
        if not np.isfinite(xs).all():
            raise UserError(f"'{d.image_key}' contains NaN or Inf values; clean the file", key="data.image_key")
        ms = f[mask_key][sample].astype(bool) if mask_key else np.ones(xs.shape[:2], bool)
    setup = DataSetup(path=str(Path(d.path).resolve()), image_key=d.image_key, label_key=label_key, layout="objects",
                      channels=list(range(n_feat)), in_chans=n_feat, img_size=(n_obj, n_feat), task=cfg.task.type,
                      num_classes=cfg.task.num_classes or 0, train=train, val=val, test=test, mean=d.mean, std=d.std,
                      kind="objects", mask_key=mask_key, target_key=tkey)
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


class ObjectDataset:
    """Items: ((objects float32 (n_objects, n_features), mask bool (n_objects,)), label)."""

    def __init__(self, setup: DataSetup | dict, indices: list[int], **_):
        import h5py

        s = setup if isinstance(setup, DataSetup) else DataSetup(**setup)
        idx = np.asarray(indices, dtype=np.int64)
        with h5py.File(s.path, "r") as f:
            x = f[s.image_key][...][idx].astype(np.float32)
            mask = f[s.mask_key][...][idx].astype(bool) if s.mask_key else np.ones(x.shape[:2], bool)
            y = f[s.label_key][...][idx]
            t = f[s.target_key][...][idx] if s.target_key else None
        if s.mean is not None:
            x = (x - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
        self.x = np.where(mask[..., None], x, 0).astype(np.float32)
        self.mask = mask
        self.y = encode_labels(s, y, t)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        import torch

        return (torch.from_numpy(self.x[i]), torch.from_numpy(self.mask[i:i + 1][0])), torch.tensor(self.y[i])


# --------------------------------------------------------------------------- HIGGS-style CSV
HIGGS_LOW_LEVEL = 21
"""Columns after the label: lepton pT, eta, phi; missing-energy magnitude, phi; 4 jets x (pT, eta, phi, b-tag)."""


def higgs_objects(features: np.ndarray) -> np.ndarray:
    """(n, >= 21) HIGGS low-level features -> (n, 6, 4) objects in the generator's layout."""
    f = features
    n = len(f)
    obj = np.zeros((n, 6, 4), np.float32)
    obj[:, 0, :3] = f[:, 0:3]                          # lepton pt, eta, phi
    obj[:, 1, 0], obj[:, 1, 2] = f[:, 3], f[:, 4]      # MET magnitude, phi
    obj[:, 2:] = f[:, 5:21].reshape(n, 4, 4)           # jets: pt, eta, phi, b-tag
    return obj


def csv_cache(cfg: SearchSpace, *, generate: bool = True) -> SearchSpace | None:
    """A HIGGS-style CSV (label, then >= 21 low-level features per row; header optional) -> objects HDF5 cache."""
    import os

    import h5py
    import pandas as pd

    from .formats import _cache_ok, _cached_cfg, _identity, cache_path

    d = cfg.data
    path = Path(d.path)
    if not path.is_file():
        raise UserError(f"file '{d.path}' not found; fix the path (e.g. --set data.path=FILE.csv)", key="data.path")
    if path.stat().st_size == 0:
        raise UserError(f"'{d.path}' is empty (0 bytes); give a CSV with a label and 21+ feature columns", key="data.path")
    ident = _identity(path, "csv", d, "objects") | {"image_key": d.image_key}
    cache = cache_path(ident)
    if _cache_ok(cache, ident):
        return _cached_cfg(cfg, cache)
    first = path.open().readline().split(",")
    try:
        [float(v) for v in first]
        header = None
    except ValueError:
        header = 0
    try:
        chunks = [c.to_numpy(np.float64) for c in pd.read_csv(path, header=header, chunksize=100_000)]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot parse '{d.path}' as CSV ({str(e).splitlines()[0]}); check the file", key="data.path") from None
    rows = np.concatenate(chunks) if chunks else np.zeros((0, 0))
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise UserError(f"'{d.path}' has no data rows", key="data.path")
    if rows.shape[1] < 1 + HIGGS_LOW_LEVEL:
        raise UserError(f"'{d.path}' has {rows.shape[1]} columns; a HIGGS-style CSV needs the label and at least "
                        f"{HIGGS_LOW_LEVEL} features", key="data.path")
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise UserError(f"'{d.path}' row {bad[0] + 1} has NaN, Inf or non-numeric values; clean the file", key="data.path")
    if not generate:
        return None
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f[d.image_key] = higgs_objects(rows[:, 1:])
            f[d.mask_key] = np.ones((len(rows), 6), np.uint8)
            f[d.label_key] = rows[:, 0].astype(np.int64)
            f["X_features"] = rows[:, 1:].astype(np.float32)
            f.attrs.update(ident)
            f.attrs.update(complete=True, n=len(rows))
        os.replace(tmp, cache)
    finally:
        if tmp.exists():
            tmp.unlink()
    return _cached_cfg(cfg, cache)
