"""E2E HDF5 image datasets: inspection before Ray starts, lazy reading in each worker.

Layout of an E2E file (keys configurable in the YAML ``data`` section)::

    X_jets  (N, H, W, C) float   channels_last   (or (N, C, H, W) channels_first)
    y       (N,)         int     class label
    m0, pt  (N,)         float   truth (regression targets)
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from e2e_search.data.labels import label_source, read_labels
from e2e_search.data.objects import inspect_objects
from e2e_search.data.splits import label_order_checked, split_checked
from e2e_search.spec.schema import SearchSpace
from trainables.data import images  # its memory checks are the trial's own (one place to change, or patch)
from trainables.data.h5file import need_dataset, open_h5
from trainables.data.images import read_images
from trainables.data.setup import DataSetup
from trainables.data.sparse_cache import (
    MAX_FILL,
    background,
    cache_rows,
    check_sparse_fits,
    device_memory,
    fill_fraction,
    planned_folder,
    refuse_dense,
)
from trainables.data.targets import target_stats
from trainables.errors import UserError

LAYOUTS = ("channels_last", "channels_first")


def file_layout(f: h5py.File, key: str) -> str | None:
    """The layout a file says its images are stored in: the ``layout`` attribute of the image dataset, else the
    file's ``channel_layout`` (the HDF5 cache of a converted Parquet/ROOT file: its ``layout`` is the source's),
    else the file's ``layout`` (``data generate`` writes it), when it names one of LAYOUTS; None otherwise."""
    for obj, name in ((f[key], "layout"), (f, "channel_layout"), (f, "layout")):
        if name not in obj.attrs:
            continue
        v = obj.attrs.get(name)
        v = v.decode() if isinstance(v, bytes) else v
        return v if isinstance(v, str) and v in LAYOUTS else None
    return None


def check_layout(shape: tuple, layout: str, image_key: str, stated: str | None = None, confirmed: bool = False) -> None:
    """Refuse a layout that reads non-square images out of a file that is square in the other layout
    (a (N, 3, 32, 32) file declared channels_last would train on 3x32 images with 32 channels), or more channels
    than image rows where the other layout reads a few channels of larger images ((N, 3, 24, 32)), or that
    disagrees with the layout the file states (``stated``: its ``layout`` attribute). ``confirmed``
    (``data.layout_confirmed``) skips the check.

    Raises:
        UserError: naming ``data.layout``, the layout the shape or the file points to, and the confirming key."""
    if len(shape) != 4 or confirmed:
        return
    a, b, c = shape[1:]
    (h, w, ch), (oh, ow, och), other = (((a, b, c), (b, c, a), "channels_first") if layout == "channels_last"
                                         else ((b, c, a), (a, b, c), "channels_last"))
    keep = f"or, if {h}x{w} images with {ch} channels is right, data.layout_confirmed: true"
    if stated is not None and stated != layout:
        raise UserError(f"'{image_key}' has shape {tuple(shape)} and the file says its images are stored {stated} "
                        f"(attribute 'layout'), but data.layout is {layout} ({h}x{w} images with {ch} channels); set "
                        f"data.layout: {stated} (--set data.layout={stated}), {keep}", key="data.layout")
    # Square in the other layout, or (non-square images, issue 30 kind 2) more channels than the shorter side of
    # the images here while the other layout has fewer channels than either side: a (N, 3, 24, 32) channels-first
    # file read channels-last would be 3x24 images with 32 channels.
    if (h != w and oh == ow) or (ch > min(h, w) and och < min(oh, ow)):
        raise UserError(f"'{image_key}' has shape {tuple(shape)}: as {layout} that is {h}x{w} images with {ch} "
                        f"channels, but it looks like {oh}x{ow} images with {och} channels stored {other}; "
                        f"set data.layout: {other} (--set data.layout={other}), {keep}", key="data.layout")


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
        H, W, channels = _check_images(cfg, X, len(y), label_key, label_which)
        train, val, test = split_checked(cfg, len(X), y, t)
        setup = _new_setup(cfg, label_key, tkey, channels, (int(H), int(W)), (train, val, test))
        setup.label_order = label_order_checked(cfg, train, y)
        if cfg.task.regresses:
            setup.target_mean, setup.target_std = target_stats(y if t is None else t, train)
        _measure(cfg, X, setup)
    return setup


def _check_images(cfg: SearchSpace, X: h5py.Dataset, n_labels: int, label_key: str,
                  label_which: str) -> tuple[int, int, list[int]]:
    """(H, W, the channels used) of the image dataset ``X``, after checking its rank, its number of samples against
    the ``n_labels`` labels, the layout, ``data.channels``, ``data.mean`` and ``data.resize``."""
    d = cfg.data
    if X.ndim != 4:
        hint = " (object lists? use an objects family such as deepsets)" if X.ndim == 3 else ""
        raise UserError(
            f"'{d.image_key}' has shape {X.shape}: each sample must be an image of rank 3 (H, W, C or C, H, W){hint}",
            key="data.image_key",
        )
    if len(X) != n_labels:
        raise UserError(
            f"'{d.image_key}' has {len(X)} samples but '{label_key}' has {n_labels}; they must match",
            key=label_which,
        )
    if len(X) < 10:
        raise UserError(f"'{d.image_key}' has only {len(X)} samples; need at least 10", key="data.image_key")
    if d.layout == "channels_last":
        _, H, W, C = X.shape
    else:
        _, C, H, W = X.shape
    check_layout(X.shape, d.layout, d.image_key, file_layout(X.file, d.image_key), d.layout_confirmed)
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
    return H, W, channels


def _new_setup(cfg: SearchSpace, label_key: str, tkey: str | None, channels: list[int], src_size: tuple[int, int],
               splits: tuple[list[int], list[int], list[int]]) -> DataSetup:
    """The DataSetup of an image file as configured, before its statistics are measured (``src_size``: the images'
    (H, W) in the file; ``splits``: train, val, test)."""
    d = cfg.data
    train, val, test = splits
    return DataSetup(
        path=str(Path(d.path).resolve()),
        image_key=d.image_key,
        label_key=label_key,
        layout=d.layout,
        channels=list(channels),
        in_chans=len(channels),
        img_size=(int(d.resize[0]), int(d.resize[1])) if d.resize else src_size,
        task=cfg.task.type,
        num_classes=cfg.task.num_classes or 0,
        train=train,
        val=val,
        test=test,
        mean=d.mean,
        std=d.std,
        src_size=src_size,
        zero_suppress=d.zero_suppress,
        clip=list(d.clip) if d.clip is not None else None,
        log1p=d.log1p,
        resize=list(d.resize) if d.resize is not None else None,
        resize_mode=d.resize_mode,
        flip_augment=d.flip_augment,
        cache=d.cache,
        target_key=tkey,
    )


def _measure(cfg: SearchSpace, X: h5py.Dataset, setup: DataSetup) -> None:
    """Fill in ``setup``'s normalization, fill fraction and cache from a sample of its training images."""
    d = cfg.data
    train = setup.train
    sample = sorted(np.random.default_rng(d.seed + 1).choice(train, min(len(train), d.stats_samples), replace=False).tolist())
    # Statistics of what the model sees: after the deterministic transforms, before normalization.
    imgs = read_images(X, sample, setup, normalize=False, check_key="data.image_key")
    if d.normalize == "per_channel" and d.mean is None:
        setup.mean, setup.std = images.channel_stats(imgs)
    elif d.normalize == "none":
        setup.mean = setup.std = None
    setup.fill = fill_fraction(imgs, background(setup))
    setup.cache = choose_cache(cfg, setup, len(sample))
    if setup.cache == "sparse":
        setup.sparse_dir = str(planned_folder(setup))
    elif setup.cache in ("memory", "device"):
        _check_cached_rows(X, sorted(set(setup.train) | set(setup.val)))


def _check_cached_rows(X: h5py.Dataset, rows: list[int]) -> None:
    """Every image a memory or device cache will hold is finite, checked here once (each trial reads them all
    anyway): NaN/Inf outside the statistics sample used to fail each trial with a non-finite loss after training
    started (issue 30, kind 10); the sparse cache's ingest refuses them before Ray the same way.

    Raises:
        UserError: naming data.image_key."""
    idx = np.asarray(rows, dtype=np.int64)
    for a in range(0, len(idx), images.READ_CHUNK):
        images.check_finite(images.read_rows(X, idx[a : a + images.READ_CHUNK]), "data.image_key")


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
    fill = setup.fill
    assert fill is not None  # inspect() measures it before it calls this

    def sparse_fits() -> None:
        check_sparse_fits(n_cached, setup, fill, images.available_memory(), device_total, copies)

    if asked == "sparse":
        refuse_dense(fill, n_sample)
        sparse_fits()
        return "sparse"
    if asked in ("memory", "device"):
        images.check_cache_fits(n_worker, setup)
        return asked
    if asked != "auto":
        return asked
    if fill < MAX_FILL:
        try:
            sparse_fits()
            return "sparse"
        except UserError:
            pass
    try:
        images.check_cache_fits(n_worker, setup)
    except UserError:
        return "none"
    dense = n_worker * setup.in_chans * setup.img_size[0] * setup.img_size[1] * 4
    if device_total is not None and dense * copies > device_total / 2:
        return "none"
    return "device"


