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
from .transforms import output_size, preprocess, random_flip, to_chw

READ_CHUNK = 256
"""Images read per h5py call when a whole split (or the statistics sample) is read."""


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
    # Preprocessing (see e2e_search/transforms.py); img_size above is the size after resize.
    src_size: tuple[int, int] | None = None
    """(H, W) of the file's images, before resize."""
    zero_suppress: float = 0.0
    clip: list[float] | None = None
    log1p: bool = False
    resize: list[int] | None = None
    resize_mode: str = "crop"
    flip_augment: bool = False
    cache: str = "none"
    kind: str = "images"
    """``images`` or ``objects`` (padded object lists: image_key (N, n_objects, n_features) and mask_key)."""
    mask_key: str | None = None
    target_key: str | None = None
    """Joint task: the regression target's key (label_key then holds the class label)."""

    def transform_steps(self) -> list[str]:
        """The deterministic per-image transforms, in order (e2e_search/transforms.py), before normalization."""
        steps = []
        if self.zero_suppress > 0:
            steps.append(f"zero_suppress |x| < {self.zero_suppress:g}")
        if self.clip is not None:
            steps.append(f"clip [{self.clip[0]:g}, {self.clip[1]:g}]")
        if self.log1p:
            steps.append("log1p (negatives to 0 first)")
        if self.resize and self.src_size and tuple(self.src_size) != tuple(self.img_size):
            steps.append(f"{self.resize_mode} {self.src_size[0]}x{self.src_size[1]}->{self.img_size[0]}x{self.img_size[1]}")
        return steps

    def preprocessing(self) -> str:
        steps = self.transform_steps()
        if self.flip_augment:
            steps.append("training flips")
        if self.cache != "none":
            steps.append(f"cache in {self.cache}")
        return ", ".join(steps)

    def summary(self) -> str:
        kind = {"classification": f"{self.num_classes} classes", "regression": f"target '{self.label_key}'",
                "joint": f"{self.num_classes} classes + target '{self.target_key}'"}[self.task]
        return (
            f"{self.path}: {len(self.train)}/{len(self.val)}/{len(self.test)} train/val/test, "
            + (f"events of {self.img_size[0]} objects x {self.img_size[1]} features, {kind}" if self.kind == "objects"
               else f"{self.in_chans}x{self.img_size[0]}x{self.img_size[1]} images, {kind}")
            + (f", preprocessing: {self.preprocessing()}" if self.preprocessing() else "")
        )

    def to_dict(self) -> dict:
        return asdict(self)


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int, limit: int | None = None,
                  labels: np.ndarray | None = None):
    """Deterministic train/val/test split of ``range(n)`` (sorted index lists), the same for the same ``seed``.

    ``limit``: only that many samples, a random subset drawn with ``seed``. ``labels`` (class indices, one per
    sample): a stratified split, each class divided in the same fractions, so a rare class lands in every split
    whenever it can: a class of at least 3 samples (2 when ``test_fraction`` is 0) has one or more in each.
    """
    perm = np.random.default_rng(seed).permutation(n)
    if limit is not None:
        perm = perm[:limit]
    if labels is not None:
        return _stratified(perm, np.asarray(labels)[perm], val_fraction, test_fraction)
    m = len(perm)
    n_test = int(round(m * test_fraction))
    n_val = max(1, int(round(m * val_fraction)))
    test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    return sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())


def _stratified(perm: np.ndarray, labels: np.ndarray, val_fraction: float, test_fraction: float):
    train, val, test = [], [], []
    for c in np.unique(labels):
        members = perm[labels == c]  # in the seeded random order
        m = len(members)
        k_test = int(round(m * test_fraction))
        k_val = int(round(m * val_fraction))
        if m >= 2 + (test_fraction > 0):  # room for one in each split: take it
            k_val = max(1, k_val)
            k_test = max(1, k_test) if test_fraction > 0 else 0
            while k_val + k_test >= m:  # training keeps one at least
                if k_val >= k_test:
                    k_val -= 1
                else:
                    k_test -= 1
        else:  # too few for every split: training first, then validation (check_split says what is missing)
            k_val, k_test = (1 if m == 2 else 0), 0
        test += members[:k_test].tolist()
        val += members[k_test : k_test + k_val].tolist()
        train += members[k_test + k_val :].tolist()
    return sorted(train), sorted(val), sorted(test)


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
        raise UserError(f"'{d.path}' is not a readable HDF5 file ({str(e).split('(')[0].strip()}); check the file", key="data.path") from None


def need_dataset(f: h5py.File, key: str, which: str, path: str) -> h5py.Dataset:
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise UserError(
            f"no dataset '{key}' in {path} (it has: {', '.join(f.keys()) or 'nothing'}); set {which} to one of those",
            key=which,
        )
    return f[key]


def label_source(cfg: SearchSpace) -> tuple[str, str]:
    """(HDF5 key of the label (classification, joint) or target (regression), the config key that names it)."""
    d = cfg.data
    if cfg.task.classifies:
        return d.label_key, "data.label_key"
    return target_source(cfg)


def target_source(cfg: SearchSpace) -> tuple[str, str]:
    """(HDF5 key of the regression target, the config key that names it)."""
    return cfg.target_key, "data.target_key" if cfg.data.target_key else "task.target"


def _dtype_name(y: np.ndarray) -> str:
    """The stored type of a label array, in words a user can match to their file."""
    if y.dtype.kind == "O":
        first = next((v for v in y.ravel()[:1000] if v is not None), None)
        if isinstance(first, (bytes, str)):
            return "variable-length strings"
        if isinstance(first, np.ndarray) or hasattr(first, "__len__"):
            return "variable-length arrays"
        return f"Python objects ({type(first).__name__})"
    if y.dtype.names:
        return f"compound records ({', '.join(y.dtype.names)})"
    if y.dtype.kind in "SU":
        return f"fixed-length strings ({y.dtype.str.lstrip('<>|=')})"
    return str(y.dtype)


def _examples(values: np.ndarray, most: int = 3) -> str:
    out = []
    for v in values.ravel():
        v = v.item() if isinstance(v, np.generic) else v
        if v not in out:
            out.append(v)
        if len(out) == most:
            break
    return ", ".join(repr(v) for v in out)


def class_indices(y: np.ndarray, name: str, which: str, where: str = "") -> np.ndarray:
    """Class labels as stored -> int64 class indices (n,), or a UserError naming ``which``, the dtype and the fix.

    Accepted: integers; booleans (False 0, True 1); floats holding whole numbers (0.0, 1.0); one value per row
    as (n, 1); one-hot rows (n, C) (exactly one 1 per row, the rest 0) -> the index of the 1. Refused: floats
    that are not whole numbers, NaN/Inf, strings and bytes (which class is signal cannot be guessed), other
    objects, soft (not one-hot) rows, higher ranks.
    """
    y = np.asarray(y)
    what = f"'{name}'{where} ({_dtype_name(y)}"
    fix_int = "store the class index of each sample as an integer 0..num_classes-1 (e.g. 0 background, 1 signal)"
    if y.dtype.kind in "OSUV" or y.dtype.names:
        if y.dtype.kind == "O" and _dtype_name(y) == "variable-length arrays":
            raise UserError(f"{what}) holds a variable-length array per sample: classification needs one class index "
                            f"per sample; {fix_int}, or set {which} to such a dataset", key=which)
        raise UserError(f"{what}, e.g. {_examples(y)}) does not hold class indices: {fix_int}, or set {which} to the "
                        "dataset that holds them", key=which)
    if y.dtype.kind not in "biuf":
        raise UserError(f"{what}) does not hold class indices: {fix_int}, or set {which} to the dataset that holds them",
                        key=which)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        C = y.shape[1]
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            bad = int(np.flatnonzero(~np.isfinite(y).all(axis=1))[0])
            raise UserError(f"{what}, one-hot (n, {C})) contains NaN or Inf values (first at row {bad}); clean the file "
                            "or drop those samples", key=which)
        onehot = np.isin(y, (0, 1)).all(axis=1) & (y.sum(axis=1) == 1)
        if not onehot.all():
            bad = int(np.flatnonzero(~onehot)[0])
            raise UserError(f"{what}, shape {y.shape}) is not one-hot: row {bad} is {np.asarray(y[bad]).tolist()[:8]}; "
                            f"store one class index per sample, or one-hot rows (a single 1), in {which}", key=which)
        return np.argmax(y, axis=1).astype(np.int64)
    if y.ndim != 1:
        raise UserError(f"{what}, shape {y.shape}) must hold one class index per sample (or one-hot rows (n, C)); "
                        f"set {which} to the dataset of the labels", key=which)
    if y.dtype.kind == "b":
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            bad = int(np.flatnonzero(~np.isfinite(y))[0])
            raise UserError(f"{what}) contains NaN or Inf values (first at row {bad}): every sample needs a class; "
                            "drop those samples or give them a class index in the file", key=which)
        frac = np.flatnonzero(y != np.round(y))
        if len(frac):
            raise UserError(f"{what}) holds non-integer values (e.g. {y[frac[0]]:g} at row {int(frac[0])}): "
                            f"classification needs class indices; {fix_int}, set {which} to the label dataset, or "
                            "set task.type: regression to fit it as a number", key=which)
    return y.astype(np.int64)


def target_values(t: np.ndarray, name: str, which: str, where: str = "") -> np.ndarray:
    """A regression target as stored -> float64 (n,): numbers, one per sample ((n, 1) squeezed), all finite."""
    t = np.asarray(t)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dtype.kind not in "iuf" or t.dtype.names:
        raise UserError(f"'{name}'{where} ({_dtype_name(t)}) is not a number per sample: a regression target needs "
                        f"numbers; set {which} to a numeric dataset", key=which)
    if t.ndim != 1:
        raise UserError(f"'{name}'{where} ({t.dtype}, shape {t.shape}) must be one value per sample; set {which} to a "
                        "dataset of one number per sample", key=which)
    if t.dtype.kind == "f" and not np.isfinite(t).all():
        bad = int(np.flatnonzero(~np.isfinite(t))[0])
        raise UserError(f"'{name}'{where} contains NaN or Inf values (first at row {bad}); clean the file or drop "
                        "those samples", key=which)
    return t.astype(np.float64)


def check_labels(cfg: SearchSpace, y: np.ndarray, label_key: str, which: str, path: str | Path | None = None,
                 *, target: bool | None = None) -> np.ndarray:
    """Labels (classification) or targets (regression, or ``target=True``), checked and converted: class indices
    (int64, each in 0..num_classes-1; see :func:`class_indices`) or float64 targets (see :func:`target_values`)."""
    where = f" in {path}" if path else ""
    if target is None:
        target = not cfg.task.classifies
    if target:
        return target_values(y, label_key, which, where)
    C = cfg.task.num_classes
    yi = class_indices(y, label_key, which, where)
    if np.asarray(y).ndim == 2 and np.asarray(y).shape[1] > 1 and np.asarray(y).shape[1] != C:
        raise UserError(f"'{label_key}'{where} is one-hot with {np.asarray(y).shape[1]} classes but task.num_classes is "
                        f"{C}; set task.num_classes: {np.asarray(y).shape[1]}", key="task.num_classes")
    if len(yi) and yi.min() < 0:
        raise UserError(f"'{label_key}'{where} ({np.asarray(y).dtype}) holds negative labels (range {yi.min()}..{yi.max()}): "
                        f"class indices run 0..{C - 1}; relabel them (e.g. -1 -> 0) or set {which} to the class "
                        "index dataset", key=which)
    if len(yi) and yi.max() >= C and yi.min() >= 1 and len(np.unique(yi)) == yi.max():  # labels 1..K, no 0
        raise UserError(f"'{label_key}'{where} holds labels {yi.min()}..{yi.max()} but class indices start at 0; "
                        f"relabel them 0..{yi.max() - 1} (e.g. y - 1) in {which}", key=which)
    if len(yi) and yi.max() >= C:
        raise UserError(f"'{label_key}'{where} holds labels {yi.min()}..{yi.max()} but task.num_classes is {C}; set "
                        f"task.num_classes: {yi.max() + 1} (or {which} to the class index dataset)", key="task.num_classes")
    return yi


def read_labels(cfg: SearchSpace, need) -> tuple[np.ndarray, np.ndarray | None, str, str | None]:
    """Checked and converted (class indices or targets, joint targets or None, label key, joint target key or None).

    ``need(key, which)`` returns the file's dataset ``key`` (or raises naming ``which``).
    """
    label_key, which = label_source(cfg)
    y = check_labels(cfg, need(label_key, which)[...], label_key, which)
    if cfg.task.type != "joint":
        return y, None, label_key, None
    tkey, twhich = target_source(cfg)
    t = check_labels(cfg, need(tkey, twhich)[...], tkey, twhich, target=True)
    if len(t) != len(y):
        raise UserError(f"'{tkey}' has {len(t)} values but '{label_key}' has {len(y)}; they must match: set {twhich} "
                        "to the target of the same samples", key=twhich)
    return y, t, label_key, tkey


def _counts(y: np.ndarray, parts: list, C: int) -> str:
    return ", ".join(f"{name} {np.bincount(y[idx], minlength=C).tolist()}" for name, idx in parts)


def split_checked(cfg: SearchSpace, n: int, y: np.ndarray, t: np.ndarray | None = None):
    """The train/val/test split of ``n`` samples (stratified by class for classification), checked against the
    labels before Ray starts: every class in every split (else val_auc is NaN in every epoch), and a regression
    target that varies within every split. ``y``: converted labels (see :func:`check_labels`)."""
    d = cfg.data
    classes = y if cfg.task.classifies else None
    train, val, test = split_indices(n, d.val_fraction, d.test_fraction, d.seed, d.limit, labels=classes)
    parts = [("train", train), ("val", val)] + ([("test", test)] if d.test_fraction > 0 else [])
    by = (f"data.val_fraction={d.val_fraction:g}, data.test_fraction={d.test_fraction:g}, data.seed={d.seed}"
          + (f", data.limit={d.limit}" if d.limit else ""))
    if cfg.task.classifies:
        C = cfg.task.num_classes
        used = np.concatenate([np.asarray(idx, np.int64) for _, idx in parts])
        in_use = np.bincount(y[used], minlength=C)
        label_key, which = label_source(cfg)
        for c in range(C):
            if in_use[c] == 0:
                if d.limit and np.any(y == c):
                    raise UserError(f"class {c} has no sample among the {len(used)} drawn by data.limit={d.limit} "
                                    f"(the file has {int(np.sum(y == c))}); raise or remove data.limit", key="data.limit")
                raise UserError(f"class {c} has no sample in '{label_key}' (class counts "
                                f"{np.bincount(y, minlength=C).tolist()}) but task.num_classes is {C}: every class "
                                f"needs samples; set task.num_classes to the number of classes, or relabel them "
                                f"0..K-1 in {which}", key="task.num_classes")
            for name, idx in parts:
                if not np.any(y[idx] == c):
                    key = {"train": "data.val_fraction", "val": "data.val_fraction", "test": "data.test_fraction"}[name]
                    need = len(parts)
                    fix = (f"add samples of class {c}" + (", or set data.test_fraction: 0 (then 2 suffice)"
                                                          if d.test_fraction > 0 else ""))
                    raise UserError(f"the {name} split has no sample of class {c} (per-split class counts "
                                    f"{_counts(y, parts, C)}; split by {by}): val_auc and the other metrics need "
                                    f"every class in every split, and the split (stratified by class) needs {need} "
                                    f"samples of a class for that but class {c} has {int(in_use[c])}; {fix}", key=key)
    if cfg.task.regresses:
        tv, (tkey, twhich) = (y, label_source(cfg)) if t is None else (t, target_source(cfg))
        distinct = {name: len(np.unique(tv[idx])) for name, idx in parts}
        if len(np.unique(tv[np.concatenate([np.asarray(i, np.int64) for _, i in parts])])) < 2:
            raise UserError(f"'{tkey}' takes a single value ({tv[0]:g}) in every sample: nothing to regress; set "
                            f"{twhich} to a quantity that varies", key=twhich)
        for name, idx in parts:
            if distinct[name] < 2:
                key = "data.test_fraction" if name == "test" else "data.val_fraction"
                raise UserError(f"the {name} split holds {len(idx)} sample(s) with {distinct[name]} distinct value of "
                                f"'{tkey}' (distinct values: {', '.join(f'{k} {v}' for k, v in distinct.items())}; "
                                f"split by {by}): a regression needs at least 2 in each; raise {key} or give more "
                                "samples", key=key)
    return train, val, test


def encode_labels(s: "DataSetup", labels: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
    """What the loss sees: class indices (int64), the standardized target (float32), or for a joint
    task (n, 2) float32 of [class index, standardized target]. ``labels``/``targets`` as stored in the file
    (any layout :func:`check_labels` accepts: bool, whole floats, (n, 1), one-hot)."""
    if s.task == "classification":
        return class_indices(labels, s.label_key, "data.label_key")
    if s.task == "regression":
        t = target_values(labels, s.label_key, "task.target")
        return ((t - s.target_mean) / s.target_std).astype(np.float32)
    t = (target_values(targets, s.target_key, "task.target") - s.target_mean) / s.target_std
    return np.stack([class_indices(labels, s.label_key, "data.label_key").astype(np.float32), t.astype(np.float32)],
                    axis=-1)


def target_stats(y: np.ndarray, train: list[int]) -> tuple[float, float]:
    """Mean and std of a regression target on the training split (targets are standardized with them)."""
    t = y[train].astype(np.float64)
    return float(t.mean()), float(t.std() or 1.0)


def inspect(cfg: SearchSpace) -> DataSetup:
    """Validate the data file against the config and compute splits and statistics.

    Reads only labels and a sample of images; raises :class:`UserError` naming
    ``data.*`` keys. Writes nothing.
    """
    d = cfg.data
    from .registry import get_family

    if get_family(cfg.families[0]).inputs == "objects":
        from .objects import inspect_objects

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
        if d.cache in ("memory", "device"):  # a worker holds the training split and its stride of validation
            check_cache_fits(len(train) + len(val), setup)
    return setup


class H5ImageDataset:
    """Map-style dataset over some indices of an E2E HDF5 file.

    Images go through :func:`e2e_search.transforms.preprocess` (the settings in
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
