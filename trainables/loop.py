"""The worker loop Ray Train runs on every DDP rank (supervised image tasks).

Layer 1 of three: worker loop (here) -> trial driver building a ``TorchTrainer``
(``e2e_search.trial``) -> ``Tuner`` (``e2e_search.search``).

Every epoch each rank reports the same metrics (rank 0's reach Tune) and rank 0
attaches a checkpoint: model, optimizer, scheduler, absolute epoch, and what is
needed to rebuild the model. A restarted trial resumes from the latest one.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from e2e_search.data import DataSetup, H5ImageDataset
from e2e_search.objects import ObjectDataset
from trainables.batches import DeviceBatches
from e2e_search.metrics import task_metrics
from e2e_search.params import split_params, trial_family
from e2e_search.plots import ATTENTION_FILE, PREDICTIONS_FILE, save_predictions
from e2e_search.registry import get_family

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
"""The epoch's reported metrics beside its checkpoint: a resumed search logs the epochs the killed driver
had not yet passed to MLflow (e2e_search/tracking.py)."""


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/Inf: the trial stops at once."""


def task_outputs(data: DataSetup) -> dict[str, int]:
    """The model's output blocks, in column order: classes, the regression target, or both (joint)."""
    if data.task == "classification":
        return {"classification": data.num_classes}
    if data.task == "regression":
        return {"regression": 1}
    return {"classification": data.num_classes, "regression": 1}


def build_model(family: str, params: dict[str, Any], data: DataSetup) -> torch.nn.Module:
    """The trial's model; families whose build takes ``tasks`` get the output blocks (task-specific heads)."""
    fam = get_family(trial_family(family, params))
    _, fp = split_params(family, params)
    tasks = task_outputs(data)
    kw: dict[str, Any] = {"num_outputs": sum(tasks.values())}
    if "tasks" in inspect.signature(fam.build).parameters:
        kw["tasks"] = tasks
    if fam.inputs == "objects":
        return fam.build(fp, n_objects=data.img_size[0], n_features=data.img_size[1], **kw)
    return fam.build(fp, in_chans=data.in_chans, img_size=tuple(data.img_size), **kw)


def load_pretrained(model: torch.nn.Module, path: str) -> int:
    """Copy the entries of a checkpoint.pt whose names and shapes match; returns how many tensors were copied."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    src = state.get("model", state) if isinstance(state, dict) else {}
    own = model.state_dict()
    match = {k: v for k, v in src.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    if not match:
        raise ValueError(f"no weights of {path} match this model (different family or sizes?)")
    model.load_state_dict(match, strict=False)
    return len(match)


def _forward(model: torch.nn.Module, x, **kw) -> torch.Tensor:
    """Images: model(x); object lists: model(objects, mask)."""
    return model(*x, **kw) if isinstance(x, (list, tuple)) else model(x, **kw)


def _first(x):
    """One dataset item -> a batch of 1 (images (C, H, W), or object lists [objects, mask])."""
    return [t[None] for t in x] if isinstance(x, (list, tuple)) else x[None]


def _to(x, device):
    return [t.to(device) for t in x] if isinstance(x, (list, tuple)) else x.to(device)


# --- training speed options (TrainParams.precision, compile, grad_accum_steps, channels_last) ---

def autocast_dtype(precision: str, device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: auto = bf16 on a GPU, none (fp32) on the CPU."""
    if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def autocast(dtype: torch.dtype | None, device):
    """A fresh autocast context (or a no-op one for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def is_convnet(model: torch.nn.Module) -> bool:
    """True when ``model`` has a convolution that is more than a patch embedding (kernel != stride)."""
    return any(isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) != tuple(m.stride) for m in model.modules())


def use_channels_last(setting: str | bool, model: torch.nn.Module, device) -> bool:
    """channels_last: auto = on a GPU for convolutional networks (cuDNN's NHWC kernels); ViTs gain nothing."""
    if setting == "auto":
        return torch.device(device).type == "cuda" and is_convnet(model)
    return bool(setting)


def _channels_last(x, on: bool):
    """Image batches (4-D) in channels-last memory format when ``on``; anything else as is."""
    if on and isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def make_optimizer(params, lr: float, weight_decay: float, device) -> torch.optim.Optimizer:
    """AdamW; the fused CUDA kernel on a GPU (one launch for all parameters), PyTorch's default on the CPU."""
    kw = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)


def accumulation_groups(n_batches: int, accum: int) -> list[int]:
    """Sizes of the consecutive groups of batches that make one optimizer step each (the last may be smaller)."""
    accum = max(1, int(accum))
    return [min(accum, n_batches - i) for i in range(0, n_batches, accum)]


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
    """(out (B, outputs), y as made by data.encode_labels) -> scalar loss for the task."""
    if data.task == "classification":
        if name not in ("auto", "cross_entropy"):
            raise ValueError(f"loss '{name}' does not fit a classification task")
        return F.cross_entropy
    reg = _regression_loss(name, data)
    if data.task == "regression":
        return lambda out, y: reg(out.squeeze(-1), y)
    k = data.num_classes  # joint: y (B, 2) = [class, standardized target]
    return lambda out, y: F.cross_entropy(out[:, :k], y[:, 0].long()) + loss_weight * reg(out[:, k], y[:, 1])


def _gather(arr: np.ndarray) -> np.ndarray:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arr
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arr)
    return np.concatenate(parts)


def _mean_across_ranks(total: float, count: int, device) -> float:
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / max(t[1], 1.0))


def checkpoint_score(metrics: dict[str, Any], metric: str, mode: str) -> float:
    """Higher is better; pretraining epochs (no task metric yet) and NaN rank below every real epoch.
    Of equal values the earlier epoch scores higher (1e-9 per epoch), as the trial's best epoch in MLflow is
    the first one reaching the best value: Ray then keeps that epoch's checkpoint."""
    v = metrics.get(metric)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return -1e30
    return (float(v) if mode == "max" else -float(v)) - 1e-9 * int(metrics.get("epoch", 0))


@torch.no_grad()
def inference_latency_ms(model: torch.nn.Module, example, runs: int = 20) -> float:
    """Median wall time (ms) of one forward pass at batch 1 on the trial's device (eval mode)."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if any(p.is_cuda for p in model.parameters()) else (lambda: None)
    times = []
    for i in range(runs + 2):  # two warm-up passes
        t0 = time.perf_counter()
        _forward(model, example)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    model.train(was_training)
    return 1e3 * float(np.median(times))


def _rollout_examples(val_ds, data: DataSetup, k: int = 4) -> tuple[torch.Tensor, list[str]] | None:
    """A few validation images (the classes in turn) for the attention-rollout plots; None for object lists."""
    if data.kind != "images" or len(val_ds) == 0:
        return None
    from trainables.rollout import pick_examples  # timm: imported by the workers only, not every Ray process

    labels = np.asarray(val_ds.labels)
    classes = None if data.task == "regression" else (labels if labels.ndim == 1 else labels[:, 0]).astype(int)
    idx = pick_examples(None if classes is None else list(classes[:256]), len(val_ds), k)
    if classes is not None:
        titles = [f"class {classes[i]}" for i in idx]
    else:
        titles = [f"true {float(labels[i]) * data.target_std + data.target_mean:.4g}" for i in idx]
    return torch.stack([val_ds[i][0] for i in idx]), titles


def _save_attention(path: str, model: torch.nn.Module, shown, device) -> None:
    """attention.npz beside the checkpoint (transformer families); a failure here never stops training."""
    from trainables.rollout import save_attention

    images, titles = shown
    try:
        save_attention(path, model, images.to(device), titles)
    except Exception as e:  # noqa: BLE001 - the map is a diagnostic, the trial goes on
        print(f"[e2e-search] attention rollout skipped: {type(e).__name__}: {e}", flush=True)


def worker_loop(config: dict[str, Any]) -> None:
    """``config``: {"family", "params", "data" (DataSetup dict), "max_epochs", "metric", "mode", "metrics",
    "cpus_per_worker", "loader_workers", "nonfinite_flag"}.

    Families with ``pretrain_epochs`` first train that many epochs on their self-supervised loss
    (``model(x, pretrain=True)``), then on the task; epochs count across both phases.

    A NaN/Inf loss ends the trial for good: the reason goes to ``nonfinite_flag`` (a file beside the
    trial's checkpoints), and a retry (``resources.max_failures``) that finds it stops at once instead of
    computing the same numbers again from the last checkpoint.
    """
    flag = config.get("nonfinite_flag")
    if flag and os.path.exists(flag):
        with open(flag) as f:
            raise NonFiniteLoss(f"{f.read().strip()} (not retried)")
    try:
        _train(config)
    except NonFiniteLoss as e:
        if flag:
            os.makedirs(os.path.dirname(flag), exist_ok=True)
            with open(flag, "w") as f:
                f.write(str(e))
        raise


def _train(config: dict[str, Any]) -> None:
    entered = time.time()
    # Where a trial's time goes, reported with the first epoch this worker group trains (bench/orchestration.py):
    # startup_s: the trial function's start -> this worker running (placement, worker processes, process group);
    # setup_s: -> the first step (data opened and cached, model built, checkpoint restored).
    startup = {"startup_s": entered - config["launched_at"]} if config.get("launched_at") else {}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    data = DataSetup(**config["data"])
    params = config["params"]
    family = trial_family(config["family"], params)
    tp, fp = split_params(family, params)
    pretrain_epochs = int(getattr(fp, "pretrain_epochs", 0))
    metric, mode = config.get("metric", "val_loss"), config.get("mode", "min")
    torch.manual_seed(tp.seed + rank)
    np.random.seed(tp.seed + rank)

    dataset_cls = ObjectDataset if data.kind == "objects" else H5ImageDataset
    train_ds = dataset_cls(data, data.train, train=True)
    # Validation: each rank scores its own stride of the split, predictions are gathered.
    val_ds = dataset_cls(data, data.val[rank::world])
    drop_last = len(train_ds) > tp.batch_size * world
    device = ray.train.torch.get_device()
    # Cached images: batches cut from tensors on the device, no DataLoader. On the CPU a memory cache is
    # already on the device; on a GPU it stays in host memory and a DataLoader (pinned, loader_workers) feeds it.
    on_device = data.cache == "device" or (data.cache == "memory" and torch.device(device).type == "cpu")
    if on_device and data.kind == "images":
        train_loader = DeviceBatches(*train_ds.tensors(), tp.batch_size, device, shuffle=True, rank=rank, world=world,
                                     flip=data.flip_augment, seed=tp.seed, drop_last=drop_last)
        val_loader = DeviceBatches(*val_ds.tensors(), max(tp.batch_size, 128), device, shuffle=False)
    else:
        loader_workers = int(config.get("loader_workers", 0))
        pin = torch.device(device).type == "cuda"  # page-locked batches: asynchronous host->GPU copies
        train_loader = DataLoader(train_ds, batch_size=tp.batch_size, shuffle=True, drop_last=drop_last,
                                  num_workers=loader_workers, persistent_workers=loader_workers > 0, pin_memory=pin)
        train_loader = ray.train.torch.prepare_data_loader(train_loader)  # DistributedSampler + device
        val_loader = DataLoader(val_ds, batch_size=max(tp.batch_size, 128), shuffle=False, num_workers=loader_workers,
                                pin_memory=pin)

    model = build_model(family, params, data)
    shown = _rollout_examples(val_ds, data) if rank == 0 else None  # images for the attention maps
    if tp.pretrained:
        load_pretrained(model, tp.pretrained)
    n_params = sum(p.numel() for p in model.parameters())
    # Pretraining heads / probed encoders leave parameters without gradients in one phase.
    two_phase = hasattr(fp, "pretrain_epochs") or getattr(fp, "finetune", "full") != "full"
    nhwc = data.kind == "images" and use_channels_last(tp.channels_last, model, device)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True} if two_phase else None)
    # ``model`` (plain or DDP) stays the uncompiled module: checkpoints, attention maps and latency use it;
    # ``step_model`` (compiled when asked, sharing its parameters) runs the training and validation passes.
    step_model = torch.compile(model) if tp.compile else model
    amp_dtype = autocast_dtype(tp.precision, device)
    opt = make_optimizer(model.parameters(), tp.lr, tp.weight_decay, device)
    max_epochs = int(config["max_epochs"])
    groups = accumulation_groups(len(train_loader), tp.grad_accum_steps)  # batches per optimizer step
    # A GPU runs ahead of Python: checking the loss for NaN/Inf every step would wait for it each time.
    check_every = 1 if torch.device(device).type != "cuda" else 50
    steps_per_epoch = max(1, len(groups))
    total = steps_per_epoch * max_epochs
    warm = steps_per_epoch * tp.warmup_epochs

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    loss_fn = task_loss(data, tp.loss, tp.loss_weight)

    # What export/inference need to rebuild the model (the split lists stay out).
    model_data = {k: v for k, v in config["data"].items() if k not in ("train", "val", "test")}
    start_epoch = 1
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=True)
        unwrapped = model.module if hasattr(model, "module") else model
        unwrapped.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        if start_epoch > max_epochs:  # restarted after its last epoch (the driver died before recording the end):
            ray.train.report(dict(state["metrics"]))  # Tune still needs the trial's final result
            return

    latency_ms: float | None = None
    startup["setup_s"] = time.time() - entered
    report_s: float | None = None  # the previous epoch's ray.train.report (persisting its checkpoint)
    for epoch in range(start_epoch, max_epochs + 1):
        pretraining = epoch <= pretrain_epochs
        t0 = time.time()
        for epoch_aware in (train_loader, getattr(train_loader, "sampler", None)):
            if hasattr(epoch_aware, "set_epoch"):
                epoch_aware.set_epoch(epoch)
        model.train()
        # Summed on the device in float64 (no host sync per step; the same sums as Python floats on the CPU).
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_seen, group, in_group = 0, 0, 0
        n_batches = len(train_loader)
        opt.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(train_loader):
            x = _channels_last(x, nhwc)
            size = groups[group] if group < len(groups) else 1
            in_group += 1
            last = in_group >= size
            # DDP: all-reduce gradients only on the group's last backward pass.
            no_sync = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with no_sync:
                with autocast(amp_dtype, device):
                    if pretraining:
                        loss = _forward(step_model, x, pretrain=True)
                    else:
                        loss = loss_fn(_forward(step_model, x), y)
                loss_sum += loss.detach().double() * len(y)
                n_seen += len(y)
                if (i + 1) % check_every == 0 or i + 1 == n_batches:
                    if not torch.isfinite(loss_sum):
                        raise NonFiniteLoss(f"non-finite {'pretraining' if pretraining else 'training'} loss "
                                            f"({loss.item()}) at epoch {epoch}")
                (loss / size if size > 1 else loss).backward()
            if last:
                if tp.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                group, in_group = group + 1, 0
        train_loss = _mean_across_ranks(float(loss_sum), n_seen, device)
        train_time = time.time() - t0

        model.eval()
        outs, ys, vn = [], [], 0
        vloss = torch.zeros((), dtype=torch.float64, device=device)
        with torch.no_grad(), autocast(amp_dtype, device):
            for x, y in val_loader:
                x, y = _channels_last(_to(x, device), nhwc), y.to(device)
                if pretraining:
                    vloss += _forward(step_model, x, pretrain=True).double() * len(y)
                else:
                    out = _forward(step_model, x)
                    vloss += loss_fn(out, y).double() * len(y)
                    outs.append(out.float())
                    ys.append(y)
                vn += len(y)
        outs = [torch.cat(outs).cpu().numpy()] if outs else []  # one device->host copy per epoch
        ys = [torch.cat(ys).cpu().numpy()] if ys else []
        val_loss = _mean_across_ranks(float(vloss), vn, device)
        if not math.isfinite(val_loss):  # before any metric: a NaN model stops here, with this reason
            raise NonFiniteLoss(f"non-finite validation loss ({val_loss}) at epoch {epoch}")
        metrics: dict[str, Any] = {"epoch": epoch, "lr": sched.get_last_lr()[0], "epoch_time_s": time.time() - t0,
                                   "train_samples_per_s": n_seen * world / max(train_time, 1e-9),
                                   "num_params": n_params}
        if pretraining:  # no task metric yet: NaN for the search metrics (Tune needs the keys; ASHA skips NaN)
            metrics.update({"pretrain_loss": train_loss, "val_pretrain_loss": val_loss})
            metrics.update({m: math.nan for m in config.get("metrics", [metric])})
        else:
            metrics.update({"train_loss": train_loss, "val_loss": val_loss})
            out_all = _gather(np.concatenate(outs) if outs else np.zeros((0, 1), np.float32))
            y_all = _gather(np.concatenate(ys) if ys else np.zeros((0,), np.float32))
            metrics.update(task_metrics(data.task, data.num_classes, out_all, y_all, data.target_mean, data.target_std))
            if latency_ms is None:  # a cost objective for multi-objective searches; measured once per trial
                unwrapped = model.module if hasattr(model, "module") else model
                latency_ms = inference_latency_ms(unwrapped, _to(_first(val_ds[0][0]), device))
            metrics["latency_ms"] = latency_ms
        metrics["checkpoint_score"] = checkpoint_score(metrics, metric, mode)
        if epoch == start_epoch:
            metrics.update(startup)
        if report_s is not None:
            metrics["report_s"] = report_s

        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                saving = time.time()
                unwrapped = model.module if hasattr(model, "module") else model
                torch.save({"model": unwrapped.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "epoch": epoch,
                            "family": family, "params": params, "data": model_data,
                            "metrics": metrics}, os.path.join(tmp, CHECKPOINT_FILE))
                with open(os.path.join(tmp, METRICS_FILE), "w") as f:  # read back by a resumed search
                    json.dump(metrics, f)
                if not pretraining:  # for the trial's plots (e2e_search/plots.py)
                    save_predictions(os.path.join(tmp, PREDICTIONS_FILE), out_all, y_all, task=data.task,
                                     num_classes=data.num_classes, target_mean=data.target_mean,
                                     target_std=data.target_std)
                    if shown is not None:
                        _save_attention(os.path.join(tmp, ATTENTION_FILE), unwrapped, shown, device)
                metrics["save_s"] = time.time() - saving  # written to a local folder; report_s persists it
                reporting = time.time()
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch:04d}")
        else:
            reporting = time.time()
            ray.train.report(metrics)
        report_s = time.time() - reporting
