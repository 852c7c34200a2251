"""Images/s the data path delivers from HDF5, by storage layout, reader count and cache, vs what a model eats.

    .venv/bin/python bench/data_loading.py                              # defaults: 8192 jets, readers 0..16
    .venv/bin/python bench/data_loading.py --n 1024 --readers 0,1,2     # 2 CPU cores

One run writes the same ``--n`` sparse 3x125x125 jets (float32, ~1.5% of pixels non-zero) in several HDF5
layouts (compression x chunking x dtype), then measures with the trainable's own classes
(``e2e_search.data.inspect.H5ImageDataset``, ``trainables.core.batches.DeviceBatches``):

* ``readers=K``: ``data.cache: none``, a shuffled ``DataLoader`` of batch 256 with K worker processes
  (``data.loader_workers``; 0 = in the training process), one item read and preprocessed at a time
  (persistent workers: the first epoch warms up, the second is timed);
* ``fill``: ``data.cache: memory|device``: the whole split read once in sorted chunks (what a trial does
  at its start);
* ``memory``: batches from the in-memory cache through the DataLoader (readers 0), moved to the GPU when there is one;
* ``device``: batches cut on the device from the cached tensors (``data.cache: device``).

Each rate is printed beside what the model consumes: the issue's H100 figures for ViT-S/5 (2,591 img/s
compiled) and ViT-S/25 (43,596 img/s compiled), or ``--consume NAME=IMG_S,...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from _common import data_setup, fmt, machine, write_jets, write_result
from torch.utils.data import DataLoader

LAYOUTS = {
    # name: write_jets keywords
    "gzip4+shuffle, chunk 1 jet": {"compression": "gzip", "level": 4, "chunk_rows": 1},
    "gzip1+shuffle, chunk 1 jet": {"compression": "gzip", "level": 1, "chunk_rows": 1},
    "lzf+shuffle, chunk 1 jet": {"compression": "lzf", "chunk_rows": 1},
    "gzip4+shuffle, chunk 64 jets": {"compression": "gzip", "level": 4, "chunk_rows": 64},
    "gzip4+shuffle, chunk 1 jet, float16": {"compression": "gzip", "level": 4, "chunk_rows": 1, "dtype": np.float16},
    "uncompressed, chunk 1 jet": {"compression": None, "chunk_rows": 1},
    "uncompressed, contiguous": {"compression": None, "chunk_rows": None},
}


def loader_rate(ds, readers: int, batch: int, device, max_batches: int, max_seconds: float = 5.0) -> float:
    """img/s of the second epoch of a shuffled DataLoader over ``ds`` (batches moved to ``device``), each
    epoch cut after ``max_batches`` batches or ``max_seconds`` (slow layouts)."""
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=readers, persistent_workers=readers > 0,
                    pin_memory=torch.device(device).type == "cuda", drop_last=True)
    rate = 0.0
    for _epoch in range(2):
        t0, n = time.perf_counter(), 0
        for i, (x, _) in enumerate(dl):
            x = x.to(device, non_blocking=True)
            n += len(x)
            if i + 1 >= max_batches or time.perf_counter() - t0 > max_seconds:
                break
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
    del dl
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--readers", default="0,1,2,4,8,16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-batches", type=int, default=64, help="batches timed per loader epoch")
    ap.add_argument("--max-seconds", type=float, default=5.0, help="time limit of one loader epoch")
    ap.add_argument("--layouts", default=",".join(str(i) for i in range(len(LAYOUTS))),
                    help="indices into the layout list (0 = what `e2e-search data generate` writes)")
    ap.add_argument("--consume", default="ViT-S/5=2591,ViT-S/25=43596")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cores = os.cpu_count() or 1
    readers = [r for r in (int(v) for v in args.readers.split(",")) if r <= cores]
    consume = {k: float(v) for k, v in (p.split("=") for p in args.consume.split(","))}
    print(machine(), flush=True)
    names = list(LAYOUTS)
    rows = []

    def show(layout: str, what: str, rate: float, extra: dict | None = None) -> None:
        vs = "  ".join(f"{rate / c:6.2f}x {k}" for k, c in consume.items())
        print(f"{layout:38} {what:14} {fmt(rate):>10} img/s   {vs}", flush=True)
        rows.append({"layout": layout, "what": what, "img_s": rate, **(extra or {})})

    with tempfile.TemporaryDirectory() as tmp:
        cached = None
        for li in (int(i) for i in args.layouts.split(",")):
            name = names[li]
            path = os.path.join(tmp, f"l{li}.h5")
            t0 = time.perf_counter()
            write_jets(path, args.n, **LAYOUTS[name])
            wrote = time.perf_counter() - t0
            size = os.path.getsize(path) / args.n / 1024
            print(f"-- {name}: {size:.1f} KiB/jet, written at {fmt(args.n / wrote)} jets/s", flush=True)
            _, setup = data_setup(path, cache="none", val_fraction=0.05)
            for k in readers:
                from trainables.data.images import H5ImageDataset

                ds = H5ImageDataset(setup, setup.train, train=True)
                show(name, f"readers={k}", loader_rate(ds, k, args.batch, device, args.max_batches, args.max_seconds),
                     {"kib_per_jet": size, "readers": k})
            setup.cache = "memory"
            t0 = time.perf_counter()
            ds = H5ImageDataset(setup, setup.train, train=True)
            show(name, "fill", len(setup.train) / (time.perf_counter() - t0), {"kib_per_jet": size})
            if cached is None:  # the first layout's cache serves the cached-path figures
                cached = ds
            else:
                del ds
        if cached is not None:
            from trainables.core.batches import DeviceBatches

            show("in-memory cache", "memory", loader_rate(cached, 0, args.batch, device, args.max_batches))
            xs, ys = cached.tensors()
            for bs in sorted({args.batch, 1024}):
                db = DeviceBatches(xs, ys, bs, device, shuffle=True, drop_last=True)
                for epoch in range(2):
                    db.set_epoch(epoch)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0, n = time.perf_counter(), 0
                    for x, _ in db:
                        n += len(x)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    rate = n / (time.perf_counter() - t0)
                show(f"on-{device} cache (DeviceBatches)", f"device b={bs}", rate)
    print(f"\n{machine()}; {args.n} jets of 3x125x125, batch {args.batch}")
    write_result(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
