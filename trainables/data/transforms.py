"""Image preprocessing: the one place where the ``data`` transforms are defined.

Used by :func:`e2e_search.data.inspect.inspect` (per-channel statistics are computed on
the transformed images), by :class:`e2e_search.data.inspect.H5ImageDataset` (training,
validation, the in-memory cache) and by anything that later feeds a trained
model (the checkpoint's ``data`` dict holds the same settings).

Order: channel selection -> zero_suppress -> clip -> log1p -> resize ->
normalization -> (training only) random flips.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _get(s: Any, name: str, default: Any = None) -> Any:
    """A setting of a DataSetup or of its dict form (e.g. a checkpoint's ``data``)."""
    if isinstance(s, Mapping):
        return s.get(name, default)
    return getattr(s, name, default)


def to_chw(x: np.ndarray, layout: str) -> np.ndarray:
    """(..., H, W, C) -> (..., C, H, W) for channels_last; unchanged otherwise."""
    return np.moveaxis(x, -1, -3) if layout == "channels_last" else x


def _crop_or_pad(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop or zero-pad the last two axes to ``size`` (the extra pixel goes right/bottom)."""
    out = x
    for axis, target in ((-2, size[0]), (-1, size[1])):
        n = out.shape[axis]
        if target < n:
            start = (n - target) // 2
            out = np.take(out, np.arange(start, start + target), axis=axis)
        elif target > n:
            pad = [(0, 0)] * out.ndim
            before = (target - n) // 2
            pad[axis] = (before, target - n - before)
            out = np.pad(out, pad)
    return out


def resize(x: np.ndarray, size: tuple[int, int] | list[int], mode: str) -> np.ndarray:
    """Resize a batch (n, C, H, W) to ``size`` = (h, w) with ``crop``, ``pad_crop`` or ``avgpool``."""
    h, w = int(size[0]), int(size[1])
    H, W = x.shape[-2:]
    if (h, w) == (H, W):
        return x
    if mode in ("crop", "pad_crop"):
        if mode == "crop" and (h > H or w > W):
            raise ValueError(f"crop to {h}x{w} is larger than the image ({H}x{W})")
        return _crop_or_pad(x, (h, w))
    if mode == "avgpool":
        if h > H or w > W:
            raise ValueError(f"avgpool to {h}x{w} is larger than the image ({H}x{W}); it only downsamples")
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return F.adaptive_avg_pool2d(t, (h, w)).numpy()
    raise ValueError(f"unknown resize mode '{mode}'")


def output_size(setup: Any, in_size: tuple[int, int]) -> tuple[int, int]:
    """Image size after the transforms of ``setup`` for an input of ``in_size``."""
    r = _get(setup, "resize")
    return (int(r[0]), int(r[1])) if r else (int(in_size[0]), int(in_size[1]))


def preprocess(x: np.ndarray, setup: Any, *, normalize: bool = True, select: bool = True) -> np.ndarray:
    """The deterministic transforms of ``setup`` on a batch (n, C_file, H, W) -> float32 (n, C, h, w).

    ``select``: pick ``setup.channels`` first (False when ``x`` holds only those already).
    ``normalize``: apply the per-channel mean/std (off to compute those statistics).
    """
    x = np.asarray(x)
    if select:
        x = x[:, list(_get(setup, "channels"))]
    x = np.array(x, dtype=np.float32, order="C")  # one copy, (n, C, H, W) contiguous; changed in place below
    zs = float(_get(setup, "zero_suppress", 0.0) or 0.0)
    if zs > 0:
        x[np.abs(x) < zs] = 0.0
    clip = _get(setup, "clip")
    if clip is not None:
        np.clip(x, clip[0], clip[1], out=x)
    if _get(setup, "log1p", False):
        np.maximum(x, 0.0, out=x)
        np.log1p(x, out=x)
    size = _get(setup, "resize")
    if size:
        x = resize(x, size, _get(setup, "resize_mode", "crop") or "crop")
    mean, std = _get(setup, "mean"), _get(setup, "std")
    if normalize and mean is not None and std is not None:
        C = x.shape[1]
        x -= np.asarray(mean, np.float32).reshape(1, C, 1, 1)
        x /= np.asarray(std, np.float32).reshape(1, C, 1, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def random_flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip one image (C, H, W) along eta (H) and along phi (W), each with probability 0.5."""
    flip_h, flip_w = rng.random(2) < 0.5
    if flip_h:
        x = x[..., ::-1, :]
    if flip_w:
        x = x[..., :, ::-1]
    return x
