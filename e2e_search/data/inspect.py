"""E2E HDF5 image datasets: inspection before Ray starts, lazy reading in each worker.

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

# The layers below, importable from here as before: datasetup, h5file <- labels <- splits <- objects <- data.
from trainables.data.setup import DataSetup
from trainables.errors import UserError
from trainables.data.h5file import need_dataset, open_h5
from e2e_search.data.labels import check_labels, class_indices, encode_labels, label_source, read_labels, target_source, target_stats, target_values
from e2e_search.data.objects import inspect_objects
from e2e_search.spec.schema import SearchSpace
from trainables.data.sparse_cache import MAX_FILL, background, cache_rows, check_sparse_fits, device_memory, fill_fraction, planned_folder, refuse_dense
from e2e_search.data.splits import split_checked, split_indices
from trainables.data.transforms import output_size, preprocess, random_flip, to_chw

__all__ = ["READ_CHUNK", "available_memory", "check_cache_fits", "choose_cache", "read_images", "check_layout", "inspect",
           "H5ImageDataset",
           # re-exported from datasetup, h5file, labels and splits
           "DataSetup", "open_h5", "need_dataset", "label_source", "target_source", "class_indices", "target_values",
           "check_labels", "read_labels", "encode_labels", "target_stats", "split_indices", "split_checked"]

READ_CHUNK = 256
"""Images read per h5py call when a whole split (or the statistics sample) is read."""


def _check_finite(arr: np.ndarray, key: str) -> None:
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


def _read_rows(X: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
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
        raw = to_chw(_read_rows(X, part), setup.layout)[:, setup.channels]
        if check_key:
            _check_finite(raw, check_key)
        out[a : a + len(part)] = preprocess(raw, setup, normalize=normalize, select=False)
    return out if len(uniq) == len(idx) and np.array_equal(uniq, idx) else out[inverse]


def check_layout(shape: tuple, layout: str, image_key: str) -> None:
    """Refuse a layout that reads non-square images out of a file that is square in the other layout
    (a (N, 3, 32, 32) file declared channels_last would train on 3x32 images with 32 channels).

    Raises:
        UserError: naming ``data.layout`` and the layout the shape points to."""
    if len(shape) != 4:
        return
    a, b, c = shape[1:]
    (h, w, ch), (oh, ow, och), other = (((a, b, c), (b, c, a), "channels_first") if layout == "channels_last"
                                         else ((b, c, a), (a, b, c), "channels_last"))
    if h != w and oh == ow:
        raise UserError(f"'{image_key}' has shape {tuple(shape)}: as {layout} that is {h}x{w} images with {ch} "
                        f"channels, but it looks like {oh}x{ow} images with {och} channels stored {other}; "
                        f"set data.layout: {other} (--set data.layout={other})", key="data.layout")


def inspect(cfg: SearchSpace) -> DataSetup:
    """Validate the data file against the config and compute splits and statistics.

    Reads only labels and a sample of images; raises :class:`UserError` naming
    ``data.*`` keys. Writes nothing.
    """
    d = cfg.data
    from trainables.registry import get_family

    if get_family(cfg.families[0]).inputs == "objects":
        return inspect_objects(cfg)
    f = open_h5(d)
    with f:

        def need(key: str, which: str) -> h5py.Dataset:
            return need_dataset(f, key, which, d.path)

        X = need(d.image_key, "data.image_key")
        label_key, label_which = label_source(cfg)
        y, t, _, tkey = read_labels(cfg, need)
        if X.ndim != 4:
            hint = " (object lists? use an objects family such as deepsets)" if X.ndim == 3 else ""
            raise UserError(
                f"'{d.image_key}' has shape {X.shape}: each sample must be an image of rank 3 (H, W, C or C, H, W){hint}",
                key="data.image_key",
            )
        if len(X) != len(y):
            raise UserError(
                f"'{d.image_key}' has {len(X)} samples but '{label_key}' has {len(y)}; they must match",
                key=label_which,
            )
        if len(X) < 10:
            raise UserError(f"'{d.image_key}' has only {len(X)} samples; need at least 10", key="data.image_key")
        if d.layout == "channels_last":
            _, H, W, C = X.shape
        else:
            _, C, H, W = X.shape
        check_layout(X.shape, d.layout, d.image_key)
        channels = d.channels if d.channels is not None else list(range(C))
        bad = [c for c in channels if not 0 <= c < C]
        if bad or not channels:
            raise UserError(
                f"channel {bad[0] if bad else '[]'} does not exist: the file has {C} channels (0..{C - 1}) in layout {d.layout}",
                key="data.channels",
            )
        if len(d.mean or channels) != len(channels):
            raise UserError(f"mean/std need {len(channels)} values (one per channel)", key="data.mean")
        if d.resize is not None and d.resize_mode in ("crop", "avgpool") and (d.resize[0] > H or d.resize[1] > W):
            raise UserError(
                f"resize {list(d.resize)} is larger than the images ({H}x{W}); resize_mode {d.resize_mode} only "
                "shrinks: give a size up to the image size, or use resize_mode: pad_crop to pad",
                key="data.resize",
            )
        train, val, test = split_checked(cfg, len(X), y, t)
        setup = DataSetup(
            path=str(Path(d.path).resolve()),
            image_key=d.image_key,
            label_key=label_key,
            layout=d.layout,
            channels=list(channels),
            in_chans=len(channels),
            img_size=(int(d.resize[0]), int(d.resize[1])) if d.resize else (int(H), int(W)),
            task=cfg.task.type,
            num_classes=cfg.task.num_classes or 0,
            train=train,
            val=val,
            test=test,
            mean=d.mean,
            std=d.std,
            src_size=(int(H), int(W)),
            zero_suppress=d.zero_suppress,
            clip=list(d.clip) if d.clip is not None else None,
            log1p=d.log1p,
            resize=list(d.resize) if d.resize is not None else None,
            resize_mode=d.resize_mode,
            flip_augment=d.flip_augment,
            cache=d.cache,
            target_key=tkey,
        )
        if cfg.task.regresses:
            setup.target_mean, setup.target_std = target_stats(y if t is None else t, train)
        sample = sorted(np.random.default_rng(d.seed + 1).choice(train, min(len(train), d.stats_samples), replace=False).tolist())
        # Statistics of what the model sees: after the deterministic transforms, before normalization.
        imgs = read_images(X, sample, setup, normalize=False, check_key="data.image_key")
        if d.normalize == "per_channel" and d.mean is None:
            setup.mean = imgs.mean(axis=(0, 2, 3), dtype=np.float64).tolist()
            setup.std = [float(s) if s > 0 else 1.0 for s in imgs.std(axis=(0, 2, 3), dtype=np.float64)]
        elif d.normalize == "none":
            setup.mean = setup.std = None
        setup.fill = fill_fraction(imgs, background(setup))
        setup.cache = choose_cache(cfg, setup, len(sample))
        if setup.cache == "sparse":
            setup.sparse_dir = str(planned_folder(setup))
    return setup


def choose_cache(cfg: SearchSpace, setup: DataSetup, n_sample: int) -> str:
    """The image cache a search uses: ``data.cache``, with ``auto`` resolved on ``setup.fill`` (measured on
    ``n_sample`` training images): sparse under MAX_FILL non-zero when it fits, else device when the dense split
    fits, else none. An explicit cache that cannot work is a UserError naming data.cache (a dense file with
    ``sparse``, a cache larger than half the memory)."""
    asked, gpu = cfg.data.cache, cfg.resources.gpus_per_worker
    n_worker = len(setup.train) + len(setup.val)  # a worker holds the training split and its stride of validation
    n_cached = len(cache_rows(setup))
    device_total = device_memory() if gpu > 0 else None
    copies = max(1, int(1 / gpu)) if 0 < gpu < 1 else 1  # trials sharing one GPU, each with its own copy

    def sparse_fits() -> None:
        check_sparse_fits(n_cached, setup, setup.fill, available_memory(), device_total, copies)

    if asked == "sparse":
        refuse_dense(setup.fill, n_sample)
        sparse_fits()
        return "sparse"
    if asked in ("memory", "device"):
        check_cache_fits(n_worker, setup)
        return asked
    if asked != "auto":
        return asked
    if setup.fill < MAX_FILL:
        try:
            sparse_fits()
            return "sparse"
        except UserError:
            pass
    try:
        check_cache_fits(n_worker, setup)
    except UserError:
        return "none"
    dense = n_worker * setup.in_chans * setup.img_size[0] * setup.img_size[1] * 4
    if device_total is not None and dense * copies > device_total / 2:
        return "none"
    return "device"


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
