"""Batches cut from tensors already on the training device (``data.cache: device``).

No DataLoader, no per-item Python: each step is one index gather on the device.
Training order is a seeded permutation per epoch, the same on every rank, of
which each rank takes its stride (what DistributedSampler does); flips (when
``flip_augment``) are drawn per sample on the device.
"""

from __future__ import annotations

import torch


class DeviceBatches:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device, *, shuffle: bool,
                 rank: int = 0, world: int = 1, flip: bool = False, seed: int = 0, drop_last: bool = False):
        self.x = images.to(device)          # (n, C, H, W)
        self.y = labels.to(device)          # (n,)
        self.bs, self.shuffle, self.flip, self.drop_last = batch_size, shuffle, flip, drop_last
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.device = device

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        return order[self.rank :: self.world]

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.bs if self.drop_last else -(-n // self.bs)

    def __iter__(self):
        order = self._order().to(self.device)
        stop = len(order) - (len(order) % self.bs if self.drop_last else 0)
        for i in range(0, stop, self.bs):
            idx = order[i : i + self.bs]
            xb, yb = self.x[idx], self.y[idx]
            if self.flip:  # eta (H) and phi (W) flips, each with p = 0.5 per sample
                fh = (torch.rand(len(idx), device=xb.device) < 0.5).view(-1, 1, 1, 1)
                fw = (torch.rand(len(idx), device=xb.device) < 0.5).view(-1, 1, 1, 1)
                xb = torch.where(fh, xb.flip(-2), xb)
                xb = torch.where(fw, xb.flip(-1), xb)
            yield xb, yb
