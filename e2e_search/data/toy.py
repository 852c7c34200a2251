"""A fast toy generator of E2E-like jet images (for the quickstart and tests).

Not physics simulation (that is Pythia + FastJet): jets are clouds of
"particles" around one prong (QCD-like, y=0) or three prongs (top-like, y=1)
whose opening angle scales like 2 m / pT. Energy is split into channels the
E2E way: ECAL (photons, fine), HCAL (hadrons, 5x5 towers), Tracks (charged);
extra channels, when asked for, are noisy copies of the first three. Images are
sparse, like real ones. Written in the E2E layout: ``X_jets`` (N, S, S, C)
channels-last float32, ``y``, ``m0``, ``pt``, chunked per jet, gzip.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from trainables.errors import UserError


def _jet(rng: np.random.Generator, signal: bool, size: int, channels: int) -> tuple[np.ndarray, float, float]:
    pt = rng.uniform(400, 600)
    if signal:
        m = rng.normal(173.0, 12.0)
        n_prongs = 3
    else:
        m = 20.0 + rng.exponential(45.0)
        n_prongs = 1 + int(rng.random() < 0.35)  # a hard splitting sometimes
    # Opening angle ~ 2m/pT in units of pixels (0.0174 rad each).
    radius = np.clip(2 * m / pt / 0.0174 * size / 125 * 0.55, 1.0, size / 3)
    angles = rng.uniform(0, 2 * np.pi) + np.arange(n_prongs) * 2 * np.pi / n_prongs + rng.normal(0, 0.4, n_prongs)
    dist = radius * rng.uniform(0.5, 1.0, n_prongs)
    if n_prongs == 1:
        dist[:] = 0
    centres = np.stack([np.cos(angles) * dist, np.sin(angles) * dist], 1) + size / 2
    frac = rng.dirichlet(np.ones(n_prongs) * 2)
    img = np.zeros((size, size, channels), np.float32)
    for c, f in zip(centres, frac):
        n = rng.poisson(12 + 20 * f) + 1
        pos = c + rng.normal(0, 1.0 + 1.5 * rng.random(), (n, 2))
        e = rng.exponential(1.0, n)
        e *= pt * f / e.sum()
        kind = rng.choice(3, n, p=[0.25, 0.15, 0.60])  # photon, neutral hadron, charged
        ij = np.clip(np.round(pos).astype(int), 0, size - 1)
        ecal = kind == 0
        np.add.at(img[:, :, 0], (ij[ecal, 0], ij[ecal, 1]), e[ecal] * rng.normal(1, 0.03, ecal.sum()))
        if channels > 1:
            had = kind > 0
            tow = np.clip((ij[had] // 5) * 5 + 2, 0, size - 1)
            np.add.at(img[:, :, 1], (tow[:, 0], tow[:, 1]), e[had] * rng.normal(1, 0.3, had.sum()).clip(0.1))
        if channels > 2:
            ch = kind == 2
            np.add.at(img[:, :, 2], (ij[ch, 0], ij[ch, 1]), e[ch])
    for k in range(3, channels):
        img[:, :, k] = img[:, :, k % 3] * rng.normal(1, 0.1, (size, size)).astype(np.float32)
    img[img < 0.5] = 0  # zero suppression
    return img, float(m), float(pt)


BATCH = 256
"""Jets built in memory before each write."""
BUFFERS = 2
"""Copies of a batch of images held at once (the batch, HDF5's write)."""
EXAMPLE_BYTES = 1024
COMPRESSED_FRACTION = 0.01
"""Compressed bytes per jet <= EXAMPLE_BYTES + this fraction of the raw image (measured: ~540 B + 0.1%)."""


def check_toy(out: Path, *, n: int, image_size: int, channels: int, seed: int) -> None:
    """The recipe's values, then the memory and disk the file needs (UserError naming ``data.generate.*``)."""
    from e2e_search.data.capacity import SAFETY, available_memory, check_disk, human

    if n < 2:
        raise UserError(f"must be >= 2 to hold both classes (got {n}); set data.generate.n: 2000", key="data.generate.n")
    if image_size < 8:
        raise UserError(f"must be >= 8 pixels (got {image_size}); set data.generate.image_size: 32",
                        key="data.generate.image_size")
    if channels < 1:
        raise UserError(f"must be >= 1 (got {channels}); set data.generate.channels: 3", key="data.generate.channels")
    if seed < 0:
        raise UserError(f"must be >= 0 (got {seed}); set data.generate.seed: 1", key="data.generate.seed")
    image = image_size * image_size * channels * 4
    memory, avail = BUFFERS * min(n, BATCH) * image, available_memory()
    if memory * SAFETY > avail:
        raise UserError(f"{min(n, BATCH)} toy jets of {image_size}x{image_size}x{channels} float32 held while writing "
                        f"need about {human(memory)} of memory, {human(avail)} is available on this machine; "
                        "set a smaller data.generate.image_size", key="data.generate.image_size")
    disk = n * (EXAMPLE_BYTES + COMPRESSED_FRACTION * image) + (1 << 20)
    check_disk(out, disk, what=f"{n} toy jets of {image_size}x{image_size}x{channels} float32 (compressed)",
               key="data.generate.n", fix="set a smaller data.generate.n or data.generate.image_size, or put "
               "data.path on a disk with more space")


def generate_toy_jets(out: str | Path, *, n: int, image_size: int = 32, channels: int = 3, seed: int = 1,
                      progress: bool = True) -> Path:
    """Write ``n`` toy jets (half top-like) to ``out`` atomically (tmp file + rename)."""
    out = Path(out)
    check_toy(out, n=n, image_size=image_size, channels=channels, seed=seed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create '{out.parent}' ({e.strerror}); choose a writable data.path", key="data.path") from None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    rng = np.random.default_rng(seed)
    t0 = time.time()
    try:
        with h5py.File(tmp, "w") as f:
            X = f.create_dataset("X_jets", (n, image_size, image_size, channels), np.float32,
                                 chunks=(1, image_size, image_size, channels), compression="gzip",
                                 compression_opts=4, shuffle=True)
            y = rng.permutation(np.arange(n) % 2)
            m0 = np.zeros(n, np.float32)
            pt = np.zeros(n, np.float32)
            batch = BATCH
            for start in range(0, n, batch):
                stop = min(n, start + batch)
                imgs = np.zeros((stop - start, image_size, image_size, channels), np.float32)
                for i in range(start, stop):
                    imgs[i - start], m0[i], pt[i] = _jet(rng, bool(y[i]), image_size, channels)
                X[start:stop] = imgs
                if progress and sys.stderr.isatty():
                    print(f"\r  generating toy jets: {stop}/{n}", end="", file=sys.stderr, flush=True)
            f["y"] = y.astype(np.int64)
            f["m0"] = m0
            f["pt"] = pt
            f.attrs.update(recipe="toy_jets", n=n, image_size=image_size, channels=channels, seed=seed,
                           channel_names=",".join(["ECAL", "HCAL", "Tracks"][:channels]
                                                  + [f"extra{k}" for k in range(3, channels)]))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    if progress:
        print(f"\r  generated {n} toy jets in {time.time() - t0:.1f}s -> {out}", file=sys.stderr)
    return out
