"""A family's model built for the data, its output blocks, losses and cost measurements."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainables.data.setup import DataSetup
from trainables.params import split_params, trial_family
from trainables.registry import get_family


def task_outputs(data: DataSetup) -> dict[str, int]:
    """The model's output blocks, in column order: classes, the regression target, or both (joint)."""
    if data.task == "classification":
        return {"classification": data.num_classes}
    if data.task == "regression":
        return {"regression": 1}
    return {"classification": data.num_classes, "regression": 1}


def empty_pixel(data: DataSetup) -> list[float]:
    """Per channel, what an empty detector cell (0 in the file) becomes through the data's deterministic
    transforms (trainables/data/transforms.py: zero_suppress, clip, log1p, normalization; resizing keeps zeros)."""
    from trainables.data.transforms import preprocess

    steps = {k: getattr(data, k, None) for k in ("zero_suppress", "clip", "log1p", "mean", "std")}
    zeros = np.zeros((1, int(data.in_chans), 1, 1), np.float32)
    return [float(v) for v in preprocess(zeros, {**steps, "resize": None}, select=False)[0, :, 0, 0]]


def build_model(family: str | None, params: dict[str, Any], data: DataSetup) -> torch.nn.Module:
    """The trial's model (CPU, float32). ``family`` None: the family is ``params["family"]`` (a search over
    families). Families declaring ``task_heads`` get the output blocks (one head per task), those declaring
    ``empty_pixel`` the value of an empty cell per channel (:func:`empty_pixel`), those declaring ``pixel_std`` the
    normalization std per channel (None without normalization).
    Raises UserError for an unknown family, pydantic's ValidationError or ValueError for params that do not fit."""
    fam = get_family(trial_family(family, params))
    _, fp = split_params(family, params)
    tasks = task_outputs(data)
    kw: dict[str, Any] = {"num_outputs": sum(tasks.values())}
    if fam.capabilities.task_heads:
        kw["tasks"] = tasks
    if fam.capabilities.empty_pixel and fam.inputs == "image":
        kw["empty_pixel"] = empty_pixel(data)
    if fam.capabilities.pixel_std and fam.inputs == "image":
        std = getattr(data, "std", None)
        kw["pixel_std"] = list(std) if std is not None else None
    if fam.inputs == "objects":
        import inspect

        takes = inspect.signature(fam.build).parameters
        if "feature_stats" in takes:  # per-feature pretraining losses
            kw["feature_stats"] = (data.mean, data.std)
        if "slot_types" in takes:  # the file's object type of each slot
            kw["slot_types"] = data.slot_types
        return fam.build(fp, n_objects=data.img_size[0], n_features=data.img_size[1], **kw)
    return fam.build(fp, in_chans=data.in_chans, img_size=tuple(data.img_size), **kw)


def load_pretrained(model: torch.nn.Module, path: str) -> int:
    """Copy the entries of a checkpoint.pt whose names and shapes match; returns how many tensors were copied.
    Raises ValueError when none match."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    src = state.get("model", state) if isinstance(state, dict) else {}
    own = model.state_dict()
    match = {k: v for k, v in src.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    if not match:
        raise ValueError(f"no weights of {path} match this model (different family or sizes?)")
    model.load_state_dict(match, strict=False)
    return len(match)


def forward(model: Callable[..., Any], x, **kw) -> torch.Tensor:
    """Images (B, C, H, W): ``model(x)``; object lists [objects (B, N, F), mask (B, N)]: ``model(objects, mask)``."""
    return model(*x, **kw) if isinstance(x, (list, tuple)) else model(x, **kw)


def first_item(x):
    """One dataset item -> a batch of 1 (images (C, H, W), or object lists [objects, mask])."""
    return [t[None] for t in x] if isinstance(x, (list, tuple)) else x[None]


def to_device(x, device):
    return [t.to(device) for t in x] if isinstance(x, (list, tuple)) else x.to(device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) \
        else model


def is_convnet(model: torch.nn.Module) -> bool:
    """True when ``model`` has a convolution that is more than a patch embedding (kernel != stride)."""
    return any(isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) != tuple(m.stride) for m in model.modules())


def use_channels_last(setting: str | bool, model: torch.nn.Module, device) -> bool:
    """channels_last: auto = on a GPU for convolutional networks (cuDNN's NHWC kernels); ViTs gain nothing."""
    if setting == "auto":
        return torch.device(device).type == "cuda" and is_convnet(model)
    return bool(setting)


def channels_last(x, on: bool):
    """Image batches (4-D) in channels-last memory format when ``on``; anything else as is."""
    if on and isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _regression_loss(name: str, data: DataSetup):
    """out (B,), y (B,) standardized -> loss."""
    if name in ("auto", "mse"):
        return F.mse_loss
    if name == "huber":
        return F.huber_loss
    if name == "relative":  # relative error on the physical scale
        m, s = data.target_mean, data.target_std
        return lambda out, y: (((out - y) * s) / (y * s + m).abs().clamp_min(1e-6)).abs().mean()
    raise ValueError(f"loss '{name}' does not fit a regression task")


def task_loss(data: DataSetup, name: str, loss_weight: float = 1.0):
    """(out (B, outputs), y as made by data.encode_labels) -> scalar loss for the task.
    Raises ValueError for a loss that does not fit the task."""
    if data.task == "classification":
        if name not in ("auto", "cross_entropy"):
            raise ValueError(f"loss '{name}' does not fit a classification task")
        return F.cross_entropy
    reg = _regression_loss(name, data)
    if data.task == "regression":
        return lambda out, y: reg(out.squeeze(-1), y)
    k = data.num_classes  # joint: y (B, 2) = [class, standardized target]
    return lambda out, y: F.cross_entropy(out[:, :k], y[:, 0].long()) + loss_weight * reg(out[:, k], y[:, 1])


@torch.no_grad()
def inference_latency_ms(model: torch.nn.Module, example, runs: int = 20) -> float:
    """Median wall time (ms) of one forward pass at batch 1 on the trial's device (eval mode)."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if any(p.is_cuda for p in model.parameters()) else (lambda: None)
    times = []
    for i in range(runs + 2):  # two warm-up passes
        t0 = time.perf_counter()
        forward(model, example)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    model.train(was_training)
    return 1e3 * float(np.median(times))
