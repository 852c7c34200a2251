"""One trial's data, model, optimizer and schedule, trained and evaluated one epoch at a time.

Training speed options (``TrainParams``): ``precision`` (autocast), ``compile`` (torch.compile of the step
model), ``grad_accum_steps`` (several batches per optimizer step; DDP all-reduces on the last only),
``channels_last`` (NHWC images for convolutional networks on a GPU).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainables.core.checkpoint import TrialCheckpoint, model_data
from trainables.core.contract import TrialConfig
from trainables.core.datasets import loaders, open_split
from trainables.core.model import (
    build_model,
    channels_last,
    forward,
    load_pretrained,
    task_loss,
    to_device,
    unwrap,
    use_channels_last,
)
from trainables.params import split_params
from trainables.registry import get_family


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/Inf: the trial stops at once (and is not retried)."""


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


def make_optimizer(params, lr: float, weight_decay: float, device) -> torch.optim.Optimizer:
    """AdamW; the fused CUDA kernel on a GPU (one launch for all parameters), PyTorch's default on the CPU."""
    kw: dict[str, Any] = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)


def accumulation_groups(n_batches: int, accum: int) -> list[int]:
    """Sizes of the consecutive groups of batches that make one optimizer step each (the last may be smaller)."""
    accum = max(1, int(accum))
    return [min(accum, n_batches - i) for i in range(0, n_batches, accum)]


def warmup_cosine(steps_per_epoch: int, max_epochs: int, warmup_epochs: int):
    """step -> learning-rate factor: linear warm-up over ``warmup_epochs``, then cosine decay to 0."""
    total, warm = steps_per_epoch * max_epochs, steps_per_epoch * warmup_epochs

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


def gather(arr: np.ndarray) -> np.ndarray:
    """Rank-ordered concatenation of every rank's ``arr`` (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arr
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arr)
    return np.concatenate(parts)


def mean_across_ranks(total: float, count: int, device) -> float:
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / max(float(t[1]), 1.0))


@dataclass
class EpochResult:
    loss: float
    """Mean loss over the samples of every rank."""
    samples: int
    """Samples this rank saw."""
    seconds: float
    outputs: np.ndarray | None = None
    """Validation only: model outputs (n, outputs) float32 of this rank's share (None while pretraining)."""
    targets: np.ndarray | None = None


class Engine:
    """Everything one trial trains with, built from its :class:`TrialConfig` on ``session``'s device."""

    def __init__(self, cfg: TrialConfig, session):
        self.cfg, self.session = cfg, session
        self.device = session.device
        rank, world = session.rank, session.world
        self.data = data = cfg.setup()
        self.family = cfg.family
        self.tp, self.fp = split_params(cfg.family, cfg.params)
        self.caps = caps = get_family(cfg.family).capabilities
        self.pretrain_epochs = int(getattr(self.fp, "pretrain_epochs", 0)) if caps.pretraining else 0
        torch.manual_seed(self.tp.seed + rank)
        np.random.seed(self.tp.seed + rank)

        self.train_ds = open_split(data, "train", data.train, train=True)
        if getattr(self.train_ds, "_rng", None) is not None:  # a split kept from an earlier trial of this
            self.train_ds._rng = None  # process: its flips restart from this trial's seed (torch.initial_seed())
        # Validation: each rank scores its own stride of the split, predictions are gathered.
        self.val_ds = open_split(data, "val", data.val[rank::world])
        self.train_loader, self.val_loader = loaders(
            data, self.train_ds, self.val_ds, batch_size=self.tp.batch_size, device=self.device, rank=rank,
            world=world, seed=self.tp.seed, loader_workers=cfg.loader_workers, session=session, hits=caps.hits)

        self.labelled_loader = self._labelled_loader(data, rank, world)
        model = build_model(cfg.family, cfg.params, data)
        if self.tp.pretrained:
            load_pretrained(model, self.tp.pretrained)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.nhwc = data.kind == "images" and use_channels_last(self.tp.channels_last, model, self.device)
        if self.nhwc:
            model = model.to(memory_format=torch.channels_last)
        unused = caps.unused_parameters or getattr(self.fp, "finetune", "full") != "full"
        self.model = session.prepare_model(model, find_unused=unused)
        # ``model`` (plain or DDP) stays the uncompiled module: checkpoints, attention maps and latency use it;
        # ``step_model`` (compiled when asked, sharing its parameters) runs the training and validation passes.
        self.step_model = torch.compile(self.model) if self.tp.compile else self.model
        self.amp_dtype = autocast_dtype(self.tp.precision, self.device)
        self.opt = make_optimizer(self.model.parameters(), self.tp.lr, self.tp.weight_decay, self.device)
        self.groups = accumulation_groups(len(self.train_loader), self.tp.grad_accum_steps)  # batches per step
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, warmup_cosine(max(1, len(self.groups)), cfg.max_epochs, self.tp.warmup_epochs))
        self.loss_fn = task_loss(data, self.tp.loss, self.tp.loss_weight)
        # A GPU runs ahead of Python: checking the loss for NaN/Inf every step would wait for it each time.
        self.check_every = 1 if self.device.type != "cuda" else 50

    def _labelled_loader(self, data, rank: int, world: int):
        """``label_fraction`` < 1: the task epochs' batches, the labelled training events cycled to the length
        of the training split (trainables/data/labelled.py); None when every label is used."""
        if self.tp.label_fraction >= 1:
            return None
        from trainables.data.labelled import cycled, label_order, labelled_events

        order = data.label_order if data.label_order is not None else label_order(data.train, None, 0)
        events = cycled(labelled_events(order, self.tp.label_fraction), len(data.train), seed=0)
        ds = open_split(data, "train_labelled", events, train=True)
        return loaders(data, ds, self.val_ds, batch_size=self.tp.batch_size, device=self.device, rank=rank,
                       world=world, seed=self.tp.seed, loader_workers=self.cfg.loader_workers, session=self.session,
                       hits=self.caps.hits)[0]

    # ------------------------------------------------------------------ state
    def checkpoint(self, epoch: int, metrics: dict[str, Any]) -> TrialCheckpoint:
        return TrialCheckpoint(model=unwrap(self.model).state_dict(), epoch=epoch, family=self.family,
                               params=self.cfg.params, data=model_data(self.cfg.data), metrics=metrics,
                               optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                               trial_id=self.cfg.trial_id)

    def restore(self, ckpt: TrialCheckpoint) -> None:
        """Weights, optimizer moments and schedule position from ``ckpt``; the learning rate and weight decay
        are this trial's own (``cfg.params``), not the checkpoint's: after a PBT exploit they are the mutated
        values (drop_path already is: the model was built from ``cfg.params``)."""
        unwrap(self.model).load_state_dict(ckpt.model)
        if ckpt.optimizer is not None:
            self.opt.load_state_dict(ckpt.optimizer)
        if ckpt.scheduler is not None:
            self.sched.load_state_dict(ckpt.scheduler)
        self.apply_training_params()

    def apply_training_params(self) -> None:
        """Set the optimizer's base learning rate and weight decay to ``self.tp``'s, at the schedule's current
        position (LambdaLR: lr = base lr x factor(step))."""
        self.sched.base_lrs = [self.tp.lr for _ in self.opt.param_groups]
        for group, factor in zip(self.opt.param_groups, self.sched.lr_lambdas):
            group["initial_lr"] = self.tp.lr
            group["lr"] = self.tp.lr * factor(self.sched.last_epoch)
            group["weight_decay"] = self.tp.weight_decay
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, epoch: int, pretraining: bool) -> EpochResult:
        """One pass over this rank's training batches. Raises NonFiniteLoss on a NaN/Inf loss."""
        t0 = time.time()
        # task epochs with label_fraction < 1 read the labelled events (as many batches: the same groups)
        loader = self.train_loader if pretraining or self.labelled_loader is None else self.labelled_loader
        for epoch_aware in (loader, getattr(loader, "sampler", None)):
            if epoch_aware is not None and hasattr(epoch_aware, "set_epoch"):
                epoch_aware.set_epoch(epoch)
        model, device = self.model, self.device
        model.train()
        # Summed on the device in float64 (no host sync per step; the same sums as Python floats on the CPU).
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_seen, group, in_group = 0, 0, 0
        n_batches = len(loader)
        self.opt.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(loader):
            x, y = channels_last(to_device(x, device), self.nhwc), y.to(device)
            size = self.groups[group] if group < len(self.groups) else 1
            in_group += 1
            last = in_group >= size
            # DDP: all-reduce gradients only on the group's last backward pass.
            no_sync = model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with no_sync:
                with autocast(self.amp_dtype, device):
                    if pretraining:
                        loss = forward(self.step_model, x, pretrain=True)
                    else:
                        loss = self.loss_fn(forward(self.step_model, x), y)
                loss_sum += loss.detach().double() * len(y)
                n_seen += len(y)
                if ((i + 1) % self.check_every == 0 or i + 1 == n_batches) and not torch.isfinite(loss_sum):
                    raise NonFiniteLoss(f"non-finite {'pretraining' if pretraining else 'training'} loss "
                                        f"({loss.item()}) at epoch {epoch}")
                (loss / size if size > 1 else loss).backward()
            if last:
                if self.tp.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.tp.grad_clip)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                group, in_group = group + 1, 0
        return EpochResult(mean_across_ranks(float(loss_sum), n_seen, device), n_seen, time.time() - t0)

    @torch.no_grad()
    def evaluate(self, epoch: int, pretraining: bool) -> EpochResult:
        """This rank's validation share: mean loss over every rank, and (task epochs) the rank's outputs and
        targets. Raises NonFiniteLoss on a NaN/Inf loss."""
        t0 = time.time()
        self.model.eval()
        outs, ys, n = [], [], 0
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with autocast(self.amp_dtype, self.device):
            for x, y in self.val_loader:
                x, y = channels_last(to_device(x, self.device), self.nhwc), y.to(self.device)
                if pretraining:
                    total += forward(self.step_model, x, pretrain=True).double() * len(y)
                else:
                    out = forward(self.step_model, x)
                    total += self.loss_fn(out, y).double() * len(y)
                    outs.append(out.float())
                    ys.append(y)
                n += len(y)
        loss = mean_across_ranks(float(total), n, self.device)
        if not math.isfinite(loss):  # before any metric: a NaN model stops here, with this reason
            raise NonFiniteLoss(f"non-finite validation loss ({loss}) at epoch {epoch}")
        if pretraining:
            return EpochResult(loss, n, time.time() - t0)
        outputs = torch.cat(outs).cpu().numpy() if outs else np.zeros((0, 1), np.float32)  # one device->host copy
        y = torch.cat(ys).cpu().numpy() if ys else np.zeros((0,), np.float32)
        return EpochResult(loss, n, time.time() - t0, outputs, y)
