"""A trained model fed as the user's file holds the data, with the answer in physical units.

:class:`RawInputModel` wraps a trial's model with the data's preprocessing in front and the task's output
transform behind, all in torch (so one module serves the MLflow model of a champion and the default ONNX export):

* images: input (batch, H, W, C_file) for a ``channels_last`` file or (batch, C_file, H, W) for ``channels_first``,
  every channel of the file in its units; inside: channel selection in ``data.channels`` order, zero_suppress,
  clip, log1p, resize (crop / pad_crop / avgpool) and the per-channel (x - mean) / std of training
  (trainables/data/transforms.py is the numpy original; the two agree to float32 rounding);
* object lists: ``objects`` (batch, N, F) raw features and ``mask`` (batch, N) bool; inside: the per-feature
  standardization, padding rows zeroed;
* output: classification, class probabilities (batch, C); regression, the target in its physical units (batch,);
  joint, (batch, C + 1): the probabilities, then the physical target.

Hit-list families (``hit_transformer``) select the K most energetic pixels outside the model; they take no raw
image here (:class:`RawInputError`).

The sparse form of ``vit`` with ``token_keep: nonempty`` (:class:`PatchListModel`) takes the non-empty patches of
the preprocessed image, chosen outside the graph (:func:`patch_list`): its cost follows the hits, not the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.data.setup import DataSetup


class RawInputError(ValueError):
    """The model cannot be fed raw file rows (a hit-list family, or a preprocessing torch cannot replay)."""


@dataclass
class Rebuilt:
    """A trial's model rebuilt from its checkpoint, in eval mode, with what it was trained on."""

    model: nn.Module
    family: str
    params: dict[str, Any]
    setup: DataSetup
    inputs: str
    """``image``, ``objects`` or ``hits``."""
    epoch: int | None
    metrics: dict[str, Any]
    data: dict[str, Any]
    """The checkpoint's ``data`` (the DataSetup's settings as saved)."""


def rebuild(path: str | Path) -> Rebuilt:
    """The model of checkpoint ``path`` (a ``checkpoint.pt``) as the worker loop built it, weights loaded, eval mode.

    Raises:
        trainables.core.checkpoint.CheckpointError: not a readable trial checkpoint.
        RuntimeError: the weights do not fit the model rebuilt from its parameters.
    """
    from trainables.core.checkpoint import TrialCheckpoint
    from trainables.core.model import build_model
    from trainables.registry import get_family

    ckpt = TrialCheckpoint.load(Path(path))
    setup, params = ckpt.setup(), dict(ckpt.params)
    family = str(params.get("family", ckpt.family))
    model = build_model(ckpt.family, params, setup)
    model.load_state_dict(ckpt.model_state())
    model.eval()
    caps = get_family(family).capabilities
    inputs = "objects" if caps.inputs == "objects" else "hits" if caps.hits else "image"
    return Rebuilt(model, family, params, setup, inputs, ckpt.epoch, dict(ckpt.metrics), dict(ckpt.data))


class ImagePreprocess(nn.Module):
    """Raw file rows -> the model's input (batch, C, h, w): trainables.data.transforms.preprocess in torch."""

    channels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, s: DataSetup):
        super().__init__()
        self.layout = s.layout
        self.register_buffer("channels", torch.tensor(list(s.channels), dtype=torch.long), persistent=False)
        self.zero_suppress = float(s.zero_suppress or 0.0)
        self.clip = (float(s.clip[0]), float(s.clip[1])) if s.clip is not None else None
        self.log1p = bool(s.log1p)
        src = tuple(int(v) for v in (s.src_size or s.img_size))
        self.src, self.size = src, (int(s.img_size[0]), int(s.img_size[1]))
        self.resize_mode = s.resize_mode or "crop"
        if self.size != self.src and self.resize_mode == "avgpool" and (src[0] % self.size[0] or src[1] % self.size[1]):
            raise RawInputError(f"avgpool {src[0]}x{src[1]} -> {self.size[0]}x{self.size[1]} is not a whole factor "
                                "and has no fixed-shape torch form; export with --inputs preprocessed")
        C = len(s.channels)
        mean = s.mean if s.mean is not None else [0.0] * C
        std = s.std if s.std is not None else [1.0] * C
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, C, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, C, 1, 1), persistent=False)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.float()
        if self.layout == "channels_last":
            x = x.permute(0, 3, 1, 2)
        x = torch.index_select(x, 1, self.channels)
        if self.zero_suppress > 0:
            x = torch.where(x.abs() < self.zero_suppress, torch.zeros_like(x), x)
        if self.clip is not None:
            x = torch.clamp(x, self.clip[0], self.clip[1])
        if self.log1p:
            x = torch.log1p(torch.relu(x))
        if self.size != self.src:
            x = self._resize(x)
        return (x - self.mean) / self.std

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        (H, W), (h, w) = self.src, self.size
        if self.resize_mode == "avgpool":
            return F.avg_pool2d(x, (H // h, W // w))
        for axis, n, target in ((2, H, h), (3, W, w)):  # centre crop or zero pad; the extra pixel right/bottom
            if target < n:
                start = (n - target) // 2
                x = x.narrow(axis, start, target)
            elif target > n:
                before = (target - n) // 2
                pad = [0, 0, before, target - n - before] if axis == 2 else [before, target - n - before, 0, 0]
                x = F.pad(x, pad)
        return x


class TaskOutput(nn.Module):
    """The model's output (batch, outputs) -> probabilities, the physical target, or both (see the module text)."""

    def __init__(self, s: DataSetup):
        super().__init__()
        self.task, self.classes = s.task, int(s.num_classes)
        self.target_mean, self.target_std = float(s.target_mean), float(s.target_std)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return torch.softmax(out.float(), dim=-1)
        target = out[:, self.classes if self.task == "joint" else 0].float() * self.target_std + self.target_mean
        if self.task == "regression":
            return target
        return torch.cat([torch.softmax(out[:, : self.classes].float(), dim=-1), target[:, None]], dim=1)


class RawInputModel(nn.Module):
    """Preprocessing, the trained model, the task's output: ``forward(image)`` or ``forward(objects, mask)``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, r: Rebuilt):
        super().__init__()
        if r.inputs == "hits":
            raise RawInputError(f"family '{r.family}' reads a hit list (the K most energetic pixels), built outside "
                                "the model; it takes no raw image: use its hit-list form (--inputs preprocessed)")
        self.objects = r.inputs == "objects"
        s = r.setup
        self.pre = None if self.objects else ImagePreprocess(s)
        F_ = int(s.img_size[1]) if self.objects else 1
        mean = s.mean if (self.objects and s.mean is not None) else [0.0] * F_
        std = s.std if (self.objects and s.std is not None) else [1.0] * F_
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self.model, self.post = r.model, TaskOutput(s)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.objects:
            assert mask is not None  # objects families always take their mask
            z = (x.float() - self.mean) / self.std
            z = torch.where(mask[..., None], z, torch.zeros_like(z))
            return self.post(self.model(z, mask))
        assert self.pre is not None
        return self.post(self.model(self.pre(x)))


def raw_rows(s: DataSetup, rows: list[int] | np.ndarray) -> list[np.ndarray]:
    """Rows of the data file as the user holds them: [images] (n, H, W, C_file) / (n, C_file, H, W), or
    [objects (n, N, F) float32, mask (n, N) bool]."""
    import h5py

    idx = np.sort(np.asarray(rows, dtype=np.int64))
    with h5py.File(s.path, "r") as f:
        idx = idx[idx < len(f[s.image_key])]  # a file shorter than the rows asked for: what it has
        x = np.asarray(f[s.image_key][idx], dtype=np.float32)
        if s.kind != "objects":
            return [x]
        mask = np.asarray(f[s.mask_key][idx], dtype=bool) if s.mask_key else np.ones(x.shape[:2], bool)
    return [x, mask]


def predict(model: RawInputModel, arrays: list[np.ndarray]) -> np.ndarray:
    """``model`` on numpy inputs (raw rows) -> numpy float32."""
    with torch.inference_mode():
        return model(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)).float().numpy()


def predict_raw(r: Rebuilt, arrays: list[np.ndarray], model: RawInputModel | None = None) -> np.ndarray:
    """Raw file rows (see :func:`raw_rows`) -> probabilities / physical target, for every family: images and object
    lists through :class:`RawInputModel` (``model``, built once by the caller, or here); a hit-list family through
    the numpy preprocessing and ``hit_list`` (what its ONNX users do outside the graph)."""
    if r.inputs != "hits":
        return predict(model or RawInputModel(r), arrays)
    from trainables.core.model import empty_pixel
    from trainables.data.transforms import preprocess, to_chw
    from trainables.families.hit_transformer import hit_list, input_hits

    s = r.setup
    x = preprocess(to_chw(np.asarray(arrays[0], np.float32), s.layout), s)
    hits, mask = hit_list(x, empty_pixel(s), s.std, input_hits(r.model))
    post = TaskOutput(s)
    with torch.inference_mode():
        return post(r.model(torch.from_numpy(hits), torch.from_numpy(mask))).float().numpy()


def kept_patches_vit(model: nn.Module):
    """The ``Vit`` of a ``vit`` model with ``token_keep: nonempty`` (nn.Sequential(FitToPatches, Vit)), or None."""
    from trainables.layers.vit_model import Vit

    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[1], Vit) and model[1].keep is not None:
        return model[1]
    return None


class PatchListModel(nn.Module):
    """``vit`` with ``token_keep: nonempty`` fed its kept patches: ``forward(patches (B, K, C*p*p), index (B, K)
    long grid positions, valid (B, K) bool)`` -> the model's output (B, outputs); K varies (the most non-empty
    patches of the batch)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        vit = kept_patches_vit(model)
        if vit is None:
            raise RawInputError("only vit with token_keep: nonempty has a patch-list form")
        self.vit = vit

    def forward(self, patches: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_patches(patches, index, valid)


def patch_list(model: nn.Module, images: np.ndarray) -> list[np.ndarray]:
    """Preprocessed images (n, C, H, W) -> the patch-list input of ``model`` (a ``vit`` with ``token_keep:
    nonempty``): [patches (n, K, C*p*p) float32, index (n, K) int64, valid (n, K) bool], K the most non-empty
    patches of one image, each image's non-empty patches first in grid order (what a CMSSW producer builds from an
    image: pad to the patch grid, cut p x p patches, keep those holding a hit)."""
    vit = kept_patches_vit(model)
    assert vit is not None and vit.keep is not None and isinstance(model, nn.Sequential)
    with torch.inference_mode():
        patches, index, valid = vit.keep(model[0](torch.from_numpy(np.ascontiguousarray(images, np.float32))))
    return [patches.numpy().astype(np.float32), index.numpy().astype(np.int64), valid.numpy().astype(bool)]


def file_row_shape(s: DataSetup) -> tuple[int, ...]:
    """One row of the data file's ``image_key`` (every channel, the file's layout); from the checkpoint's settings
    when the file is not readable here."""
    try:
        import h5py

        with h5py.File(s.path, "r") as f:
            return tuple(int(v) for v in f[s.image_key].shape[1:])
    except (OSError, KeyError):
        if s.kind == "objects":
            return tuple(int(v) for v in s.img_size)
        H, W = (int(v) for v in (s.src_size or s.img_size))
        C = max(s.channels) + 1
        return (H, W, C) if s.layout == "channels_last" else (C, H, W)
