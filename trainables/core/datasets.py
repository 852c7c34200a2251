"""A trial's datasets and batch sources; a process that runs several trials (a warm Tune trial process)
reads and caches the same split once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainables.core.batches import DeviceBatches, SparseBatches, SparseRows
from trainables.data.images import H5ImageDataset
from trainables.data.object_lists import ObjectDataset
from trainables.data.setup import DataSetup
from trainables.data.targets import encode_labels

_KEPT: dict[str, Any] = {}
"""The last datasets this process opened, by key: a trial after it on the same data reuses them."""


def _key(data: DataSetup, part: str, indices: list[int], train: bool) -> str:
    # the fields themselves, not to_dict(): asdict deep-copies the split lists (4 s for 10^6 rows)
    settings = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)
                if f.name not in ("train", "val", "test", "label_order")}
    try:  # a file rewritten in place is read again
        st = os.stat(data.path)
        settings["_file"] = (st.st_size, st.st_mtime_ns)
    except OSError:
        pass
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    return f"{part}:{int(train)}:{h.hexdigest()}"


def open_split(data: DataSetup, part: str, indices: list[int], *, train: bool = False):
    """The dataset of ``indices`` (images: H5ImageDataset, or SparseSplit for ``cache: sparse``; object lists:
    ObjectDataset). With a memory, device or sparse cache, the process keeps it for the next trial on the same
    data and split (one per ``part``)."""
    cls = ObjectDataset if data.kind == "objects" else SparseSplit if data.cache == "sparse" else H5ImageDataset
    if data.cache == "none" and data.kind != "objects":
        return cls(data, indices, train=train)
    key = _key(data, part, indices, train)
    old = _KEPT.get(part)
    if old is not None and old[0] == key:
        return old[1]
    _KEPT.pop(part, None)  # free the previous trial's copy before reading this one
    ds = cls(data, indices, train=train)
    _KEPT[part] = (key, ds)
    return ds


def forget() -> None:
    """Drop the kept datasets (their memory is freed when no trial uses them)."""
    _KEPT.clear()
    _ROWS.clear()


_ROWS: dict[tuple, SparseRows] = {}
"""The sparse cache's rows on a device, by (folder, device, normalization): shared by the training and
validation splits of a trial and by the next trial of the process."""


class SparseSplit:
    """Some rows of the sparse cache of ``data`` (``data.cache: sparse``; trainables/data/sparse_cache.py).

    Opening it finds the cache of the source as it is now (built here, without Ray, when this node has none:
    ``e2e-search run`` builds it before the trials start) and memory-maps it read-only; nothing is copied.
    ``rows(device)`` puts the cache on the training device (the memory maps themselves on the CPU, one copy
    on a GPU), once per process. Items (for rollout examples and latency, not training batches): (image
    float32 (C, H, W) normalized, not flipped, label) as H5ImageDataset gives them.
    """

    def __init__(self, setup: DataSetup | dict, indices: list[int], *, train: bool = False, **_):
        import h5py

        from trainables.data.sparse_cache import open_cache
        from trainables.data.sparse_ingest import ensure

        self.s = setup if isinstance(setup, DataSetup) else DataSetup(**setup)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.train = train
        self.cache = open_cache(ensure(self.s, log=lambda line: print(f"[e2e-search] {line}", flush=True)))
        self.positions = self.cache.positions(self.indices)  # (n,) int64 cache position of each item
        with h5py.File(self.s.path, "r") as f:
            targets = np.asarray(f[self.s.target_key][...])[self.indices] if self.s.target_key else None
            self._labels = encode_labels(self.s, np.asarray(f[self.s.label_key][...])[self.indices], targets)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        """Encoded labels of the split, in order (see ``encode_labels``)."""
        return self._labels

    def rows(self, device) -> SparseRows:
        key = (str(self.cache.folder), str(torch.device(device)), json.dumps([self.s.mean, self.s.std]))
        if key not in _ROWS:
            _ROWS.clear()  # another cache or device: free the previous copy first
            c = self.cache
            _ROWS[key] = SparseRows(c.offsets, c.index, c.values, c.shape, float(c.background), device,
                                    self.s.mean, self.s.std)
        return _ROWS[key]

    def __getitem__(self, i: int):
        x = self.rows("cpu").dense(torch.as_tensor(self.positions[i : i + 1]))[0]
        return x, torch.as_tensor(self._labels[i])


def loaders(data: DataSetup, train_ds, val_ds, *, batch_size: int, device: torch.device, rank: int, world: int,
            seed: int, loader_workers: int, session, hits: bool = False) -> tuple[Any, Any]:
    """(train batches, validation batches). Cached images: batches cut from tensors on the device, no
    DataLoader (on the CPU a memory cache is already on the device; on a GPU it stays in host memory and a
    pinned DataLoader with ``loader_workers`` feeds it). Each rank takes its stride of the training order.
    ``hits``: the family takes hit lists; from a sparse cache its batches are hit lists, not images."""
    drop_last = len(train_ds) > batch_size * world
    if data.cache == "sparse" and data.kind == "images":  # dense batches built on the device from the CSR rows
        labels = lambda ds: torch.as_tensor(ds.labels)  # noqa: E731
        train = SparseBatches(train_ds.rows(device), train_ds.positions, labels(train_ds), batch_size, shuffle=True,
                              rank=rank, world=world, flip=data.flip_augment, seed=seed, drop_last=drop_last,
                              hits=hits)
        val = SparseBatches(val_ds.rows(device), val_ds.positions, labels(val_ds), max(batch_size, 128),
                            shuffle=False, hits=hits)
        return train, val
    on_device = data.cache == "device" or (data.cache == "memory" and device.type == "cpu")
    if on_device and data.kind == "images":
        images, targets = train_ds.tensors()
        train_dev = DeviceBatches(images, targets, batch_size, device, shuffle=True, rank=rank, world=world,
                                  flip=data.flip_augment, seed=seed, drop_last=drop_last)
        images, targets = val_ds.tensors()
        val_dev = DeviceBatches(images, targets, max(batch_size, 128), device, shuffle=False)
        return train_dev, val_dev
    pin = device.type == "cuda"  # page-locked batches: asynchronous host->GPU copies
    train_dl = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                          num_workers=loader_workers, persistent_workers=loader_workers > 0, pin_memory=pin)
    val_dl = DataLoader(val_ds, batch_size=max(batch_size, 128), shuffle=False, num_workers=loader_workers,
                        pin_memory=pin)
    return session.prepare_loader(train_dl), val_dl
