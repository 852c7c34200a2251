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


# --------------------------------------------------------------------------- sparse rows (data.cache: sparse)
def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's stride of the epoch's order of ``n`` items: what ``DeviceBatches`` iterates (the same
    seeded permutation per epoch on every rank)."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    return order[rank::world]


class SparseRows:
    """The CSR rows of a sparse cache (trainables/data/sparse_cache.py) on one device, and how to make dense,
    normalized images of some of them.

    ``offsets`` int64 (n + 1,), ``index`` int32 (nnz,) flat pixel index into (C, H, W), ``values`` float32
    (nnz,), already through the per-pixel transforms and resize. On the CPU the tensors are the cache's
    memory maps themselves (no copy: every process on the node shares the page cache); on a GPU one copy.
    """

    def __init__(self, offsets, index, values, shape: tuple[int, int, int], background: float, device,
                 mean: list[float] | None = None, std: list[float] | None = None):
        import warnings

        device = torch.device(device)
        with warnings.catch_warnings():  # read-only memory maps: never written to
            warnings.simplefilter("ignore", UserWarning)
            as_t = lambda a: a if isinstance(a, torch.Tensor) else torch.from_numpy(a)  # noqa: E731
            self.offsets = as_t(offsets).to(device)
            self.index = as_t(index).to(device)
            self.values = as_t(values).to(device)
        self.shape = tuple(int(v) for v in shape)
        self.device = device
        C = self.shape[0]
        bg = torch.full((C,), float(background), dtype=torch.float32, device=device)
        self.mean: torch.Tensor | None
        self.std: torch.Tensor | None
        if mean is not None and std is not None:  # float32 ops in the dense path's order: x -= mean; x /= std
            self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
            self.std = torch.tensor(std, dtype=torch.float32, device=device)
            bg = (bg - self.mean) / self.std
        else:
            self.mean = self.std = None
        self.bg = bg  # (C,) the value of an empty pixel of each channel, normalized
        self.background = float(background)  # an empty pixel after the per-pixel transforms, not normalized

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _entries(self, pos: torch.Tensor):
        """The stored pixels of cache positions ``pos`` (B,): (B, lens (B,), row (T,) image in the batch, slot (T,)
        entry within its image, flat (T,) int64 pixel index, values (T,) float32 not normalized), T = total."""
        pos = pos.to(self.device)
        start = self.offsets[pos]
        lens = self.offsets[pos + 1] - start
        total = int(lens.sum())
        row = torch.repeat_interleave(torch.arange(len(pos), device=self.device), lens, output_size=total)
        first = torch.cumsum(lens, 0) - lens  # where each image's entries begin in this batch
        slot = torch.arange(total, device=self.device) - first[row]
        at = start[row] + slot
        return len(pos), lens, row, slot, self.index[at].long(), self.values[at]

    def _flipped(self, flat: torch.Tensor, row: torch.Tensor, flip_h: torch.Tensor | None,
                 flip_w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat (C, H, W) pixel indices (T,) of images ``row`` -> channel, row (H) and column (W), mirrored along H
        where ``flip_h[row]`` and along W where ``flip_w[row]``."""
        _, H, W = self.shape
        ch = torch.div(flat, H * W, rounding_mode="floor")
        rest = flat - ch * H * W
        h, w = torch.div(rest, W, rounding_mode="floor"), torch.remainder(rest, W)
        if flip_h is not None:
            h = torch.where(flip_h.to(self.device)[row], H - 1 - h, h)
        if flip_w is not None:
            w = torch.where(flip_w.to(self.device)[row], W - 1 - w, w)
        return ch, h, w

    def dense(self, pos: torch.Tensor, flip_h: torch.Tensor | None = None,
              flip_w: torch.Tensor | None = None) -> torch.Tensor:
        """Images of cache positions ``pos`` (B,) as float32 (B, C, H, W) on the device, normalized; image b
        flipped along H where ``flip_h[b]`` and along W where ``flip_w[b]`` (bool (B,)). The stored pixels are
        normalized one by one (the same two float32 roundings as the dense path's in-place ops) and scattered
        into a batch filled with each channel's normalized empty pixel; flips move indices, not values."""
        C, H, W = self.shape
        HW, CHW = H * W, C * H * W
        B, lens, row, _, flat, vals = self._entries(pos)
        out = torch.empty((B, C, HW), dtype=torch.float32, device=self.device)
        out.copy_(self.bg.view(1, C, 1).expand(B, C, HW))
        if len(flat):
            ch = torch.div(flat, HW, rounding_mode="floor")
            if self.mean is not None and self.std is not None:  # both or neither
                vals = (vals - self.mean[ch]) / self.std[ch]
            if flip_h is not None or flip_w is not None:
                ch, h, w = self._flipped(flat, row, flip_h, flip_w)
                flat = ch * HW + h * W + w
            out.view(-1)[row * CHW + flat] = vals
        return out.view(B, C, H, W)

    def hits(self, pos: torch.Tensor, flip_h: torch.Tensor | None = None,
             flip_w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hit lists of cache positions ``pos`` (B,), never a dense image: ``hits`` float32 (B, K, 4) = (channel,
        row, column, energy above the empty pixel, not normalized), in the cache's (ascending pixel) order, and
        ``mask`` bool (B, K), K the most stored pixels of an image in the batch (at least 1); padding is zero.
        Flips mirror rows (H) and columns (W) as :meth:`dense` does."""
        B, lens, row, slot, flat, vals = self._entries(pos)
        k = max(1, int(lens.max())) if B else 1
        hits = torch.zeros((B, k, 4), dtype=torch.float32, device=self.device)
        mask = torch.zeros((B, k), dtype=torch.bool, device=self.device)
        if len(flat):
            ch, h, w = self._flipped(flat, row, flip_h, flip_w)
            hits[row, slot] = torch.stack([ch.float(), h.float(), w.float(), vals - self.background], dim=1)
            mask[row, slot] = True
        return hits, mask


class SparseBatches:
    """``DeviceBatches`` for ``data.cache: sparse``: the same iteration (``set_epoch``, ``__len__``, batches of
    (x float32 (B, C, H, W) on the device, y)), the same seeded order per epoch and rank stride and the same
    flips (drawn with the same ``torch.rand`` calls), so both give the same batches bit for bit; each batch
    is built dense on the device from ``rows`` (only the batch is ever dense). With ``hits`` (families that
    declare ``hits``) a batch is a hit list ``[hits (B, K, 4), mask (B, K)]`` instead (:meth:`SparseRows.hits`):
    nothing dense is built."""

    def __init__(self, rows: SparseRows, positions, labels: torch.Tensor, batch_size: int, *, shuffle: bool,
                 rank: int = 0, world: int = 1, flip: bool = False, seed: int = 0, drop_last: bool = False,
                 hits: bool = False):
        self.rows = rows
        self.as_hits = hits
        self.device = rows.device
        self.pos = torch.as_tensor(positions, dtype=torch.int64).to(self.device)  # (n,) cache position per item
        self.y = labels.to(self.device)  # (n,)
        self.bs, self.shuffle, self.flip, self.drop_last = batch_size, shuffle, flip, drop_last
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        return epoch_order(len(self.pos), shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world=self.world)

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.bs if self.drop_last else -(-n // self.bs)

    def __iter__(self):
        order = self._order().to(self.device)
        stop = len(order) - (len(order) % self.bs if self.drop_last else 0)
        for i in range(0, stop, self.bs):
            idx = order[i : i + self.bs]
            fh = fw = None
            if self.flip:  # eta (H) and phi (W) flips, each with p = 0.5 per sample (DeviceBatches' draws)
                fh = torch.rand(len(idx), device=self.device) < 0.5
                fw = torch.rand(len(idx), device=self.device) < 0.5
            if self.as_hits:
                yield list(self.rows.hits(self.pos[idx], fh, fw)), self.y[idx]
            else:
                yield self.rows.dense(self.pos[idx], fh, fw), self.y[idx]
