"""A trial's datasets and batch sources; a process that runs several trials (a warm Tune trial process)
reads and caches the same split once."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import DataSetup, H5ImageDataset
from ..objects import ObjectDataset
from .batches import DeviceBatches

_KEPT: dict[str, Any] = {}
"""The last datasets this process opened, by key: a trial after it on the same data reuses them."""


def _key(data: DataSetup, part: str, indices: list[int], train: bool) -> str:
    settings = {k: v for k, v in data.to_dict().items() if k not in ("train", "val", "test")}
    try:  # a file rewritten in place is read again
        st = os.stat(data.path)
        settings["_file"] = (st.st_size, st.st_mtime_ns)
    except OSError:
        pass
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(np.asarray(indices, dtype=np.int64).tobytes())
    return f"{part}:{int(train)}:{h.hexdigest()}"


def open_split(data: DataSetup, part: str, indices: list[int], *, train: bool = False):
    """The dataset of ``indices`` (images: H5ImageDataset, object lists: ObjectDataset). With a memory or
    device cache, the process keeps it for the next trial on the same data and split (one per ``part``)."""
    cls = ObjectDataset if data.kind == "objects" else H5ImageDataset
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


def loaders(data: DataSetup, train_ds, val_ds, *, batch_size: int, device: torch.device, rank: int, world: int,
            seed: int, loader_workers: int, session) -> tuple[Any, Any]:
    """(train batches, validation batches). Cached images: batches cut from tensors on the device, no
    DataLoader (on the CPU a memory cache is already on the device; on a GPU it stays in host memory and a
    pinned DataLoader with ``loader_workers`` feeds it). Each rank takes its stride of the training order."""
    drop_last = len(train_ds) > batch_size * world
    on_device = data.cache == "device" or (data.cache == "memory" and device.type == "cpu")
    if on_device and data.kind == "images":
        train = DeviceBatches(*train_ds.tensors(), batch_size, device, shuffle=True, rank=rank, world=world,
                              flip=data.flip_augment, seed=seed, drop_last=drop_last)
        val = DeviceBatches(*val_ds.tensors(), max(batch_size, 128), device, shuffle=False)
        return train, val
    pin = device.type == "cuda"  # page-locked batches: asynchronous host->GPU copies
    train = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                       num_workers=loader_workers, persistent_workers=loader_workers > 0, pin_memory=pin)
    val = DataLoader(val_ds, batch_size=max(batch_size, 128), shuffle=False, num_workers=loader_workers,
                     pin_memory=pin)
    return session.prepare_loader(train), val
