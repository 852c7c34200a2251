"""Shared pieces of the speed benchmarks: synthetic E2E files, model presets, the bare PyTorch loop.

Not a benchmark itself; ``bench/throughput.py``, ``bench/bare_vit.py`` and ``bench/data_loading.py`` use it.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F

# ViT presets of the reference figures: (embed_dim, depth, num_heads, patch_size).
VIT = {
    "vit_ti5": (192, 12, 3, 5), "vit_ti25": (192, 12, 3, 25),
    "vit_s5": (384, 12, 6, 5), "vit_s25": (384, 12, 6, 25),
    "vit_b5": (768, 12, 12, 5), "vit_b25": (768, 12, 12, 25),
    "vit_mini25": (64, 2, 2, 25),  # a smoke-test size for 2 CPU cores
}


def vit_params(name: str) -> dict[str, Any]:
    """The ``vit`` family's parameters for a preset name (see ``VIT``)."""
    d, depth, heads, patch = VIT[name]
    return {"embed_dim": d, "depth": depth, "num_heads": heads, "patch_size": patch, "mlp_ratio": 4.0}


def machine() -> str:
    """One line naming where the figures were taken."""
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def write_jets(path: str | Path, n: int, *, size: int = 125, channels: int = 3, compression: str | None = "gzip",
               level: int = 4, shuffle: bool = True, chunk_rows: int | None = 1, dtype=np.float32,
               fill: float = 0.015, seed: int = 0, block: int = 512, templates: int | None = None) -> Path:
    """An E2E-format file of ``n`` sparse jet-like images (``X_jets`` (n, size, size, C) channels-last, ``y``).

    About ``fill`` of the pixels are non-zero (exponential energies, denser near the centre for class 1),
    like the Pythia images (~1.5% filled). ``chunk_rows=None`` with no compression: contiguous storage.

    ``templates=K`` (one jet per chunk, even K): only the first K jets are drawn and compressed; jet ``i`` is
    jet ``i % K`` again, its compressed chunk copied with ``write_direct_chunk``. The file is the same format
    (every chunk still has to be read and decompressed), written in a fraction of the time: compressing
    10^6 mostly-empty 183 KiB jets takes about half an hour on 2 cores.
    """
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    shape = (n, size, size, channels)
    kw: dict[str, Any] = {}
    if chunk_rows:
        kw["chunks"] = (chunk_rows, size, size, channels)
    if compression:
        kw["compression"] = compression
        if compression == "gzip":
            kw["compression_opts"] = level
        kw["shuffle"] = shuffle
    per = size * size * channels
    k = max(1, int(per * fill))
    c = size // 2
    if templates is not None and (chunk_rows != 1 or templates % 2 or templates < 2):
        raise ValueError("templates needs one jet per chunk (chunk_rows=1) and an even count (the labels alternate)")
    drawn = n if templates is None else min(n, templates)
    with h5py.File(path, "w") as f:
        X = f.create_dataset("X_jets", shape=shape, dtype=dtype, **kw)
        for a in range(0, drawn, block):
            m = min(block, drawn - a)
            buf = np.zeros((m, per), np.float32)
            idx = rng.integers(0, per, (m, k))
            np.put_along_axis(buf, idx, rng.exponential(1.0, (m, k)).astype(np.float32), axis=1)
            buf = buf.reshape(m, size, size, channels)
            buf[y[a : a + m] == 1, c - 3 : c + 3, c - 3 : c + 3, :] += 2.0
            X[a : a + m] = buf.astype(dtype)
        if drawn < n:
            chunks = [X.id.read_direct_chunk((i, 0, 0, 0)) for i in range(drawn)]
            for i in range(drawn, n):
                mask, data = chunks[i % drawn]
                X.id.write_direct_chunk((i, 0, 0, 0), data, mask)
        f["y"] = y
        f["m0"] = rng.normal(100, 30, n).astype(np.float32)
    return Path(path)


def data_setup(path: str | Path, *, cache: str = "none", val_fraction: float = 0.05, loader_workers: int = 0,
               batch_size: int = 256, family: str = "vit", params: dict | None = None, limit: int | None = None):
    """(SearchSpace, DataSetup) for a classification search on ``path`` (the checks ``e2e-search run`` does)."""
    from e2e_search.data.inspect import inspect
    from e2e_search.spec.loader import validate

    raw = {
        "name": "bench", "family": family, "task": {"type": "classification", "num_classes": 2},
        "data": {"path": str(path), "val_fraction": val_fraction, "test_fraction": 0.0, "cache": cache,
                 "loader_workers": loader_workers, "limit": limit},
        "params": {"batch_size": batch_size, **(params or {})},
        "search": {"num_samples": 1}, "scheduler": {"type": "none", "max_epochs": 1},
    }
    cfg = validate(raw, source="bench")
    return cfg, inspect(cfg)


def local_tracking(tmp: str | Path) -> dict[str, str]:
    """The ``tracking`` block of a bench search: MLflow in SQLite, Ray results and artifacts, all under ``tmp``."""
    return {"uri": f"sqlite:///{tmp}/mlflow.db", "storage": f"{tmp}/ray_results", "artifacts": f"{tmp}/mlartifacts"}


def start_ray() -> float:
    """A local Ray as ``e2e-search run`` starts it; the seconds it took."""
    from e2e_search.search.ray_env import init_ray

    t0 = time.perf_counter()
    init_ray(None, verbose=False)
    return time.perf_counter() - t0


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bare_loop(model: torch.nn.Module, *, batch: int, shape: tuple[int, int, int], classes: int = 2, device="cpu",
              precision: str = "auto", compile: bool = False, grad_clip: float = 0.0, steps: int = 30,
              warmup: int = 5, repeats: int = 3, channels_last: bool = False) -> dict[str, float]:
    """Images/s of a plain training loop on random tensors already on ``device``.

    bf16 autocast (precision auto on a GPU / bf16), fused AdamW on a GPU, optional torch.compile and
    gradient clipping. ``repeats`` timed windows of ``steps`` steps after ``warmup`` steps; returns the
    best and median window and the time of the first (compiling) step.
    """
    from trainables.core.engine import autocast, autocast_dtype, make_optimizer

    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    x = torch.randn(batch, *shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    opt = make_optimizer(model.parameters(), 1e-4, 0.05, device)
    fwd = torch.compile(model) if compile else model
    dtype = autocast_dtype(precision, device)

    def step():
        with autocast(dtype, device):
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(batch * steps / (time.perf_counter() - t0))
    return {"img_s": max(rates), "img_s_median": float(np.median(rates)), "first_step_s": first}


def release(*objs) -> None:
    """Drop references and give cached GPU memory back (between side-by-side runs)."""
    del objs
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if math.isfinite(v) else "n/a"


@contextlib.contextmanager
def timed(label: str):
    t0 = time.perf_counter()
    yield
    print(f"  [{label}: {time.perf_counter() - t0:.1f} s]", flush=True)


def write_result(out: str | None, rows: list) -> None:
    """The rows as JSON, with the machine and the command line, when ``--out`` was given."""
    if out:
        Path(out).write_text(json.dumps({"machine": machine(), "argv": sys.argv, "rows": rows}, indent=1))
