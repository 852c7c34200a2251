"""E2E HDF5 images read in a trial: chunked reads of many rows, preprocessing, the map-style dataset.

Layout of an E2E file (keys configurable in the YAML ``data`` section)::

    X_jets  (N, H, W, C) float   channels_last   (or (N, C, H, W) channels_first)
    y       (N,)         int     class label
    m0, pt  (N,)         float   truth (regression targets)
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from trainables.data import h5file  # noqa: F401 - registers hdf5plugin's filters where installed
from trainables.data.setup import DataSetup
from trainables.data.targets import encode_labels
from trainables.data.transforms import output_size, preprocess, random_flip, to_chw
from trainables.errors import UserError

READ_CHUNK = 256
"""Images read per h5py call when a whole split (or the statistics sample) is read."""



def check_finite(arr: np.ndarray, key: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise UserError("contains NaN or Inf values; clean the file or drop those samples", key=key)



def available_memory() -> int:
    """Bytes of memory available to new allocations on this machine."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))



def check_cache_fits(n_images: int, setup: DataSetup) -> None:
    """Raise a UserError naming data.cache if ``n_images`` transformed images exceed half the free memory."""
    need = n_images * setup.in_chans * setup.img_size[0] * setup.img_size[1] * 4
    avail = available_memory()
    if need > avail / 2:
        raise UserError(
            f"cache: memory needs {need / 2**30:.2f} GiB for {n_images} images of {setup.in_chans}x"
            f"{setup.img_size[0]}x{setup.img_size[1]} float32 but only {avail / 2**30:.2f} GiB is available "
            "(the cache may take at most half); set data.cache: none, or shrink the data with data.limit or data.resize",
            key="data.cache",
        )



def read_rows(X: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of ``X`` in few h5py reads.

    Contiguous storage: one fancy-indexed read. Chunked (e.g. compressed) storage:
    one slice per run of neighbouring HDF5 chunks that hold a wanted row, so no
    chunk is decompressed for nothing (h5py's fancy indexing is slow there).
    """
    if X.chunks is None:
        return X[rows]
    ids = rows // X.chunks[0]
    parts = []
    for run in np.split(rows, np.flatnonzero(np.diff(ids) > 1) + 1):
        lo, hi = int(run[0]), int(run[-1]) + 1
        block = X[lo:hi]
        parts.append(block if hi - lo == len(run) else block[run - lo])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)



def read_images(X: h5py.Dataset, indices, setup: DataSetup, *, normalize: bool = True,
                check_key: str | None = None, chunk: int = READ_CHUNK) -> np.ndarray:
    """Images ``indices`` of ``X``, read in sorted chunks and preprocessed: float32 (n, C, h, w), in the order given."""
    idx = np.asarray(indices, dtype=np.int64)
    uniq, inverse = np.unique(idx, return_inverse=True)
    H, W = X.shape[1:3] if setup.layout == "channels_last" else X.shape[2:4]
    h, w = output_size(setup, (H, W))
    out = np.empty((len(uniq), len(setup.channels), h, w), np.float32)
    for a in range(0, len(uniq), chunk):
        part = uniq[a : a + chunk]
        raw = to_chw(read_rows(X, part), setup.layout)[:, setup.channels]
        if check_key:
            check_finite(raw, check_key)
        out[a : a + len(part)] = preprocess(raw, setup, normalize=normalize, select=False)
    return out if len(uniq) == len(idx) and np.array_equal(uniq, idx) else out[inverse]



class H5ImageDataset:
    """Map-style dataset over some indices of an E2E HDF5 file.

    Images go through :func:`trainables.data.transforms.preprocess` (the settings in
    the DataSetup); with ``train=True`` and ``flip_augment`` they are also
    flipped at random, from a generator seeded per process (``seed``, or
    torch's seed of the Ray worker / DataLoader worker).

    ``cache: none``: the file is opened lazily, once per process (DataLoader
    workers and Ray workers each get their own handle; h5py handles do not
    survive fork) and each item is read on its own. ``cache: memory``: the
    whole split is read here, once, in sorted chunks, into one array.
    Items: (image float32 (C, H, W), label int64 | normalized target float32).
    """

    def __init__(self, setup: DataSetup | dict, indices: list[int], *, train: bool = False, seed: int | None = None):
        self.s = setup if isinstance(setup, DataSetup) else DataSetup(**setup)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.train = train
        self.flip = bool(train and self.s.flip_augment)
        self._seed = seed
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1
        self._file: h5py.File | None = None
        self._pid = -1
        self._images: np.ndarray | None = None
        with h5py.File(self.s.path, "r") as f:
            targets = np.asarray(f[self.s.target_key][...])[self.indices] if self.s.target_key else None
            self._labels = encode_labels(self.s, np.asarray(f[self.s.label_key][...])[self.indices], targets)
            if self.s.cache in ("memory", "device"):
                check_cache_fits(len(self.indices), self.s)
                self._images = read_images(f[self.s.image_key], self.indices, self.s)

    def _open(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.s.path, "r")
            self._pid = os.getpid()
        return self._file

    def _flip_rng(self) -> np.random.Generator:
        if self._rng is None or self._rng_pid != os.getpid():
            import torch.utils.data

            info = torch.utils.data.get_worker_info()
            if self._seed is None:  # torch seeds each Ray worker (per rank) and each DataLoader worker
                self._rng = np.random.default_rng(torch.initial_seed())
            else:
                self._rng = np.random.default_rng([self._seed, info.id if info else 0])
            self._rng_pid = os.getpid()
        return self._rng

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch

        if self._images is not None:
            x = self._images[i]
        else:
            raw = np.asarray(self._open()[self.s.image_key][int(self.indices[i])])
            x = preprocess(to_chw(raw, self.s.layout)[None], self.s)[0]
        if self.flip:
            x = random_flip(x, self._flip_rng())
        label = torch.as_tensor(self._labels[i])
        return torch.from_numpy(np.array(x, dtype=np.float32)), label  # a copy: the cache stays intact

    @property
    def labels(self) -> np.ndarray:
        """Encoded labels of the split, in order (see ``encode_labels``)."""
        return self._labels

    def tensors(self):
        """The cached split as tensors: images (n, C, H, W) float32 and labels (targets standardized)."""
        import torch

        if self._images is None:
            raise RuntimeError("tensors() needs data.cache: memory or device")
        return torch.from_numpy(self._images), torch.as_tensor(self._labels)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        return state


def channel_stats(imgs: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images (n, C, H, W) (a std of 0 becomes 1): the ``per_channel`` normalization."""
    mean = imgs.mean(axis=(0, 2, 3), dtype=np.float64).tolist()
    std = [float(s) if s > 0 else 1.0 for s in imgs.std(axis=(0, 2, 3), dtype=np.float64)]
    return mean, std


def setup_for_file(path: str | os.PathLike, *, image_key: str = "X_jets", label_key: str = "y",
                   task: str = "classification", layout: str = "channels_last", val_fraction: float = 0.2,
                   test_fraction: float = 0.1, seed: int = 0, stats_samples: int = 512) -> DataSetup:
    """A :class:`DataSetup` for training on an E2E HDF5 image file without a search (trainables.train_one):
    every channel, random train/val/test splits of the given fractions, per-channel mean/std of up to
    ``stats_samples`` training images; a regression target standardized on the training split.
    ``e2e_search.data.inspect`` is the checked path a search takes (preprocessing, stratified splits, caches).

    Raises:
        UserError: labels that are not class indices (classification) or not finite numbers (regression).
    """
    from trainables.data.targets import class_indices, target_stats, target_values

    with h5py.File(path, "r") as f:
        X, y = f[image_key], np.asarray(f[label_key][...])
        if X.ndim != 4:
            raise UserError(f"'{image_key}' has shape {X.shape}; image files hold (N, H, W, C) or (N, C, H, W)",
                            key="data.image_key")
        H, W, C = X.shape[1:] if layout == "channels_last" else (*X.shape[2:], X.shape[1])
        perm = np.random.default_rng(seed).permutation(len(X))
        n_val, n_test = int(len(X) * val_fraction), int(len(X) * test_fraction)
        val, test, train = (sorted(perm[:n_val].tolist()), sorted(perm[n_val:n_val + n_test].tolist()),
                            sorted(perm[n_val + n_test:].tolist()))
        classes = class_indices(y, label_key, "data.label_key") if task == "classification" else None
        setup = DataSetup(path=str(Path(path).resolve()), image_key=image_key, label_key=label_key, layout=layout,
                          channels=list(range(C)), in_chans=C, img_size=(H, W), src_size=(H, W), task=task,
                          num_classes=int(classes.max()) + 1 if classes is not None else 0,
                          train=train, val=val, test=test, mean=None, std=None)
        if classes is None:
            setup.target_mean, setup.target_std = target_stats(target_values(y, label_key, "task.target"), train)
        sample = sorted(np.random.default_rng(seed + 1).choice(train, min(len(train), stats_samples),
                                                                replace=False).tolist())
        setup.mean, setup.std = channel_stats(read_images(X, sample, setup, normalize=False,
                                                          check_key="data.image_key"))
    return setup
