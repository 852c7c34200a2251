"""The four image caches side by side: one-off ingest, a trial's data set-up, host memory of two concurrent
trials, and the rate at which batches reach the model.

    .venv/bin/python bench/sparse_cache.py --rows 10000,100000          # 2 CPU cores
    .venv/bin/python bench/sparse_cache.py --rows 10000 --tasks 1,2,16  # a GPU machine
    .venv/bin/python bench/sparse_cache.py --rows 1000000 --tasks 2 --caches none,sparse   # 10^6 rows (~15 min)

For each ``--rows`` it writes synthetic sparse jets (125x125x3 float32, gzip-4 + shuffle, one jet per chunk:
what ``e2e-search data generate`` writes) at the measured occupancy of generated top/QCD jets (0.29% of the
pixels non-zero, a mean of 136 per jet: ``--fill`` of random pixels plus class 1's bright centre), then for
each ``data.cache``:

* ``ingest``: the one-off build before the trials (``sparse`` only: ``trainables.data.sparse_ingest.ensure`` with
  Ray tasks over row blocks, ``--tasks`` of them at a time; each count builds its own copy);
* ``setup``: what a trial spends on its data before the first step, in a fresh process: both splits opened
  (``trainables.core.datasets.open_split``) and the batch sources made (``loaders``), i.e. the split read and
  preprocessed for ``memory``/``device``, the cache memory-mapped and put on the device for ``sparse``;
* ``2 trials``: two such processes alive at once, each after set-up and ``--touch`` batches: the data memory
  of both, i.e. the PSS of the cache files they map (a page both map counts half in each: the node holds it
  once) plus the growth of each one's anonymous (private) memory since before its set-up (each process
  first returns its allocator's free heap: ``malloc_trim``), against one copy of the data (the dense split
  for memory/device, the cache files for sparse);
* ``img/s``: training batches of ``--batch`` from ``loaders`` (the trial's own code) on the training device
  (the GPU when there is one), after one warm-up batch, for ``--seconds`` or ``--max-batches``.

``memory`` and ``device`` take the same path on the CPU (batches cut from the cached tensors); ``none`` reads
every image from the file through a DataLoader in the trial process (``loader_workers: 0``). A dense cache
that would not fit twice in the available memory is skipped with its size. Run it alone on the machine (the
project's heavy lock): memory and rates are shared resources.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CACHES = ("none", "memory", "device", "sparse")


# --------------------------------------------------------------------------- one trial's process
def trial_process(setup_json: str, batch: int, touch: int, seconds: float, max_batches: int, rate: bool) -> None:
    """A trial's data path in this process: set-up, then (``rate``) the batch rate, then ``touch`` batches;
    prints one JSON line, then waits for a line on stdin (the parent measures its memory meanwhile)."""
    import psutil
    import torch

    from trainables.core.datasets import loaders, open_split
    from trainables.data.setup import DataSetup

    torch.set_num_threads(1)
    s = DataSetup(**json.loads(Path(setup_json).read_text()))
    trim()
    base_anon = anonymous(psutil.Process())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    train_ds = open_split(s, "train", s.train, train=True)
    val_ds = open_split(s, "val", s.val)
    train, _ = loaders(s, train_ds, val_ds, batch_size=batch, device=device, rank=0, world=1, seed=0,
                       loader_workers=0, session=_NoSession())
    setup_s = time.perf_counter() - t0
    out = {"setup_s": setup_s, "base_anon": base_anon}
    if rate:
        out["img_s"] = batch_rate(train, device, seconds, max_batches)
    it = cycle(train)
    for _ in range(touch):
        next(it)
    trim()
    print(json.dumps(out), flush=True)
    sys.stdin.readline()


def trim() -> None:
    """Give the C allocator's free heap back to the system (glibc), so that what is measured is what is held."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cycle(batches):
    """The batches of epoch after epoch (a small split at batch 1024 has one or two per epoch)."""
    while True:
        yield from batches


class _NoSession:
    def prepare_loader(self, loader):
        return loader


def batch_rate(batches, device, seconds: float, max_batches: int) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    it = cycle(batches)
    next(it)  # warm-up
    sync()
    n, t0 = 0, time.perf_counter()
    for i, (x, _y) in enumerate(it):
        x = x.to(device, non_blocking=True)
        n += len(x)
        if i + 1 >= max_batches or time.perf_counter() - t0 > seconds:
            break
    sync()
    return n / (time.perf_counter() - t0)


def anonymous(proc) -> int:
    """Bytes of anonymous memory of ``proc`` (heap, private allocations: never shared between the trials)."""
    return sum(m.anonymous for m in proc.memory_maps(grouped=True))


def data_memory(proc, base_anon: int, folder: str | None) -> tuple[int, int]:
    """(PSS of the cache files ``proc`` maps (a page shared by k processes counts 1/k), growth of its anonymous
    memory since ``base_anon``): what a trial's data costs the node."""
    maps = proc.memory_maps(grouped=True)
    files = sum(m.pss for m in maps if folder and m.path.startswith(folder))
    return files, sum(m.anonymous for m in maps) - base_anon


def two_trials(setup_json: str, args) -> dict:
    """Two trial processes alive at once: set-up time and batch rate of the first, memory of both."""
    import psutil

    cmd = [sys.executable, __file__, "--child", setup_json, "--batch", str(args.batch), "--touch", str(args.touch),
           "--seconds", str(args.seconds), "--max-batches", str(args.max_batches)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    procs, outs = [], []
    try:
        for k in range(2):
            p = subprocess.Popen(cmd + (["--rate"] if k == 0 else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
            procs.append(p)
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"trial process {k} died (exit {p.wait()})")
            outs.append(json.loads(line))
        folder = json.loads(Path(setup_json).read_text()).get("sparse_dir")
        mem = [data_memory(psutil.Process(p.pid), o["base_anon"], folder) for p, o in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.stdin.write("\n")
                p.stdin.flush()
        for p in procs:
            p.wait(timeout=120)
    return {"setup_s": outs[0]["setup_s"], "setup2_s": outs[1]["setup_s"], "img_s": outs[0]["img_s"],
            "mapped": sum(f for f, _ in mem), "private": sum(a for _, a in mem)}


# --------------------------------------------------------------------------- the table
def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="10000,100000")
    ap.add_argument("--fill", type=float, default=0.00175,
                    help="fraction of random non-zero pixels; class 1's bright centre adds 0.23%%: 0.29%% in all")
    ap.add_argument("--tasks", default="1,2", help="Ray tasks for the ingest rate (one build each)")
    ap.add_argument("--caches", default=",".join(CACHES))
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--touch", type=int, default=3, help="batches each of the two trials takes before measuring")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--max-batches", type=int, default=30)
    ap.add_argument("--templates", type=int, default=100_000,
                    help="above this many rows, jets repeat: only this many are drawn and compressed, the other "
                         "chunks are copies (write_direct_chunk); every chunk is still read and decompressed")
    ap.add_argument("--dir", help="where the files go (default: a temporary folder)")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        trial_process(args.child, args.batch, args.touch, args.seconds, args.max_batches, args.rate)
        return 0

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from _common import data_setup, machine, write_jets, write_result

    from e2e_search.data.ingest import ray_blocks
    from e2e_search.search.ray_env import init_ray
    from trainables.data.images import available_memory
    from trainables.data.sparse_cache import open_cache
    from trainables.data.sparse_ingest import ensure

    print(machine(), flush=True)
    tasks = [int(v) for v in args.tasks.split(",")]
    caches = args.caches.split(",")
    rows_out, table = [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        os.chdir(tmp)
        t0 = time.perf_counter()
        init_ray(None, verbose=False)
        print(f"ray.init: {time.perf_counter() - t0:.1f} s", flush=True)
        for n in (int(v) for v in args.rows.split(",")):
            path = tmp / f"jets_{n}.h5"
            t0 = time.perf_counter()
            write_jets(path, n, fill=args.fill, templates=args.templates if n > args.templates else None)
            print(f"\n{n:,} jets written in {time.perf_counter() - t0:.0f} s ({path.stat().st_size / n / 1024:.1f} "
                  "KiB/jet on disk)", flush=True)
            ingest = {}
            for k in tasks:  # each count builds its own copy of the cache (its own cache root)
                _, s = data_setup(path, cache="sparse", val_fraction=0.1)
                root = tmp / f"cache_{n}_{k}"
                t0 = time.perf_counter()
                folder = ensure(s, parallel=k, run_blocks=ray_blocks(k), root=root)
                ingest[k] = time.perf_counter() - t0
                c = open_cache(folder)
                print(f"ingest with {k} Ray task(s): {ingest[k]:.1f} s, {n / ingest[k]:,.0f} jets/s; cache "
                      f"{gib(c.nbytes)}, {c.meta['fill']:.3%} of pixels non-zero", flush=True)
            sparse_folder = folder
            for cache in caches:
                # inspected without a cache (a dense one too big for this machine would be refused), then set
                _, s = data_setup(path, cache="none", val_fraction=0.1)
                s = dataclasses.replace(s, cache=cache)
                n_split = len(s.train) + len(s.val)
                dense = n_split * 3 * 125 * 125 * 4
                copy = open_cache(sparse_folder).nbytes if cache == "sparse" else dense if cache != "none" else 0
                if cache == "sparse":
                    s = dataclasses.replace(s, sparse_dir=str(sparse_folder))
                row = {"rows": n, "cache": cache, "copy_bytes": copy,
                       "ingest_s": {str(k): v for k, v in ingest.items()} if cache == "sparse" else None}
                if cache in ("memory", "device") and 2 * dense > 0.8 * available_memory():
                    row["skipped"] = f"needs {gib(dense)} per trial, {gib(available_memory())} available"
                    print(f"{cache:7} skipped: {row['skipped']}", flush=True)
                else:
                    sj = tmp / f"setup_{n}_{cache}.json"
                    sj.write_text(json.dumps(s.to_dict()))
                    row.update(two_trials(str(sj), args))
                    row["total"] = row["mapped"] + row["private"]
                    print(f"{cache:7} setup {row['setup_s']:.2f} s (2nd trial {row['setup2_s']:.2f} s), "
                          f"{row['img_s']:,.0f} img/s, 2 trials: {gib(row['total'])} (cache files {gib(row['mapped'])}"
                          f", private {gib(row['private'])})"
                          + (f", {row['total'] / copy:.2f}x one copy of {gib(copy)}" if copy else ""), flush=True)
                rows_out.append(row)
                table.append(row)
    print("\n| rows | cache | ingest (" + " / ".join(f"{k}" for k in tasks) + " Ray tasks) | trial set-up | "
          "2 trials' data memory (mapped cache files + private) | one copy | batches img/s |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        ing = " / ".join(f"{v:.1f} s" for v in r["ingest_s"].values()) if r["ingest_s"] else "—"
        if "skipped" in r:
            print(f"| {r['rows']:,} | {r['cache']} | {ing} | — | skipped: {r['skipped']} | {gib(r['copy_bytes'])} | — |")
            continue
        ratio = f" = {r['total'] / r['copy_bytes']:.2f}x one copy" if r["copy_bytes"] else ""
        print(f"| {r['rows']:,} | {r['cache']} | {ing} | {r['setup_s']:.2f} s | {gib(r['total'])} ({gib(r['mapped'])}"
              f" + {gib(r['private'])}){ratio} | {gib(r['copy_bytes']) if r['copy_bytes'] else '—'} | "
              f"{r['img_s']:,.0f} |")
    write_result(args.out, rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
