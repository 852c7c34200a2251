"""``e2e-search data generate``: Pythia 8 + FastJet datasets written as E2E HDF5, in parallel Ray tasks.

One task per worker, each with its own Pythia seed, streams its share to a
shard file batch by batch (memory stays flat); the driver shows progress and
then concatenates the shards in task order into the output, atomically. The
same seed and worker count give the same bytes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import UserError
from .detector import CHANNELS

PYTHIA_SEED_MAX = 900_000_000
BATCH_EVENTS = 64


@dataclass
class GenSpec:
    process: str
    n: int
    out: str
    seed: int = 1
    workers: int = 1
    channels: list[str] = field(default_factory=lambda: list(CHANNELS))
    image_size: int = 125
    mass_range: tuple[float, float] = (50.0, 200.0)
    decay: str = "bb"
    per_mass: int = 200


def check_spec(s: GenSpec) -> None:
    from .processes import PROCESSES

    from ..errors import did_you_mean

    if s.process not in PROCESSES:
        raise UserError(f"unknown process '{s.process}'{did_you_mean(s.process, PROCESSES)}", key="PROCESS")
    if s.n <= 0:
        raise UserError(f"must be > 0 (got {s.n})", key="--n")
    if s.workers <= 0:
        raise UserError(f"must be > 0 (got {s.workers})", key="--workers")
    if not 1 <= s.seed <= PYTHIA_SEED_MAX:
        raise UserError(f"{s.seed} is outside Pythia's seed range 1..{PYTHIA_SEED_MAX}", key="--seed")
    bad = [c for c in s.channels if c not in CHANNELS]
    if bad or not s.channels or len(set(s.channels)) != len(s.channels):
        raise UserError(f"channels must be distinct names from {', '.join(CHANNELS)} (got {','.join(s.channels)})",
                        key="--channels")
    if s.image_size < 8:
        raise UserError(f"must be >= 8 (got {s.image_size})", key="--image-size")
    lo, hi = s.mass_range
    if not 0 < lo < hi:
        raise UserError(f"needs 0 < low < high (got {lo:g},{hi:g})", key="--mass-range")
    out = Path(s.out)
    if out.suffix not in (".h5", ".hdf5"):
        raise UserError(f"'{s.out}' should end in .h5", key="--out")
    probe = out.parent.resolve()
    while not probe.exists():
        probe = probe.parent
    try:
        if probe.is_file():
            raise NotADirectoryError(f"{probe} is a file")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"cannot write '{s.out}' ({e.strerror or e}); choose another --out", key="--out") from None


def task_seed(seed: int, task: int, sample: int) -> int:
    """A distinct Pythia seed per (task, sample), in Pythia's range."""
    return (seed * 1_000_003 + task * 7_919 + sample * 104_729) % (PYTHIA_SEED_MAX - 1) + 1


def _pythia(settings: list[str], seed: int):
    import pythia8mc

    p = pythia8mc.Pythia("", False)
    for line in settings + ["Random:setSeed = on", f"Random:seed = {seed}"]:
        if not p.readString(line):
            raise RuntimeError(f"Pythia rejected setting '{line}'")
    if not p.init():
        raise RuntimeError("Pythia failed to initialise")
    return p


class ShardWriter:
    """Appends batches of named arrays to an HDF5 file: images chunked one per sample, gzip-4 + shuffle."""

    def __init__(self, path: Path):
        self.f = h5py.File(path, "w", track_order=True)

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        for k, a in arrays.items():
            if k not in self.f:
                chunks = (1, *a.shape[1:]) if a.ndim > 1 else (4096,)
                self.f.create_dataset(k, shape=(0, *a.shape[1:]), maxshape=(None, *a.shape[1:]), dtype=a.dtype,
                                      chunks=chunks, compression="gzip", compression_opts=4, shuffle=True,
                                      track_times=False)
            d = self.f[k]
            d.resize(d.shape[0] + len(a), axis=0)
            d[-len(a):] = a

    def close(self) -> None:
        self.f.close()


def run_task(spec: dict, task: int, share: int, shard: str, progress=None) -> int:
    """Generate ``share`` examples into ``shard``; returns the number of events generated."""
    from .processes import samples

    s = GenSpec(**spec)
    rng = np.random.default_rng(task_seed(s.seed, task, 0))
    parts = samples(s.process, share, rng=rng, mass_range=tuple(s.mass_range), decay=s.decay, per_mass=s.per_mass)
    writer = ShardWriter(Path(shard))
    n_events = 0
    try:
        for k, smp in enumerate(parts):
            if smp.count <= 0:
                continue
            py = _pythia(smp.settings, task_seed(s.seed, task, k + 1))
            kept_per_label: dict[int, int] = {}
            got = 0
            while got < smp.count:
                events = py.nextBatch(BATCH_EVENTS)
                n_events += len(events)
                rows = _examples(s, smp, events, rng)
                if rows is None:
                    continue
                take = np.arange(len(rows["y"]))
                if smp.extra.get("balance"):  # at most half of the sample per class
                    cap = {0: smp.count // 2, 1: smp.count - smp.count // 2}
                    keep = []
                    for i in take:
                        lab = int(rows["y"][i])
                        if kept_per_label.get(lab, 0) < cap.get(lab, 0):
                            kept_per_label[lab] = kept_per_label.get(lab, 0) + 1
                            keep.append(i)
                    take = np.asarray(keep, np.int64)
                take = take[: smp.count - got]
                if len(take) == 0:
                    continue
                writer.append({k2: v[take] for k2, v in rows.items()})
                got += len(take)
                if progress is not None:
                    progress.add.remote(len(take))
    finally:
        writer.close()
    return n_events


def _examples(s: GenSpec, smp, events, rng) -> dict[str, np.ndarray] | None:
    """Selected examples of one batch of events, as arrays."""
    if s.process == "event_objects":
        from .events import event_rows

        return event_rows(smp, events, rng)
    import awkward as ak

    from .detector import jet_images
    from .processes import Batch, _jet_at

    b = Batch(events)
    sel = smp.select(b)
    keep = np.nonzero(sel["keep"])[0]
    if len(keep) == 0:
        return None
    idx = sel["jet"][keep]
    jets = _jet_at(b, sel["jet"])[keep]
    eta, phi = jets.eta.to_numpy(), jets.phi.to_numpy()
    nconst = ak.pad_none(b.nconst[keep], 1, axis=1)[np.arange(len(keep)), idx].to_numpy()
    rows = {
        "X_jets": jet_images(b.visible[keep], eta, phi, channels=s.channels, size=s.image_size, rng=rng),
        "y": sel["y"][keep].astype(np.int64),
        "m0": jets.mass.to_numpy().astype(np.float32),
        "pt": jets.pt.to_numpy().astype(np.float32),
        "eta": eta.astype(np.float32),
        "phi": phi.astype(np.float32),
        "n_constituents": nconst.astype(np.int32),
        "parton": sel["parton"][keep].astype(np.int32),
    }
    if "m_true" in sel:
        rows["m_true"] = sel["m_true"][keep].astype(np.float32)
    return rows


def _merge(shards: list[Path], out: Path, attrs: dict) -> None:
    with h5py.File(out, "w", track_order=True) as f:
        srcs = [h5py.File(p, "r") for p in shards]
        try:
            keys = list(srcs[0].keys())
            total = sum(len(s[keys[0]]) for s in srcs)
            for k in keys:
                d0 = srcs[0][k]
                chunks = d0.chunks if d0.ndim > 1 else (min(4096, max(total, 1)),)
                dst = f.create_dataset(k, shape=(total, *d0.shape[1:]), dtype=d0.dtype, chunks=chunks,
                                       compression="gzip", compression_opts=4, shuffle=True, track_times=False)
                pos = 0
                for s in srcs:
                    src = s[k]
                    if src.chunks == dst.chunks and src.chunks[0] == 1 and src.compression == dst.compression:
                        # One compressed chunk per sample: copy the bytes, no decompress/recompress.
                        tail = (0,) * (src.ndim - 1)
                        for i in range(len(src)):
                            mask, raw = src.id.read_direct_chunk((i, *tail))
                            dst.id.write_direct_chunk((pos + i, *tail), raw, mask)
                        pos += len(src)
                        continue
                    for start in range(0, len(src), 1024):
                        block = src[start:start + 1024]
                        dst[pos:pos + len(block)] = block
                        pos += len(block)
            f.attrs.update(attrs)
        finally:
            for s in srcs:
                s.close()


def generate(s: GenSpec, *, address: str | None = None, progress: bool = True) -> dict:
    """Run the generation tasks on Ray and write ``s.out``; returns a summary."""
    import ray

    check_spec(s)
    out = Path(s.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out.parent} ({e.strerror}); choose another --out", key="--out") from None
    work = out.with_name(f".{out.name}.parts-{os.getpid()}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    started_ray = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        else:
            ray.init(num_cpus=max(s.workers, 1), log_to_driver=False, logging_level="WARNING",
                     include_dashboard=False)
        started_ray = True
    t0 = time.time()
    try:
        work.mkdir(parents=True, exist_ok=True)
        shares = [s.n // s.workers + (1 if i < s.n % s.workers else 0) for i in range(s.workers)]

        @ray.remote
        class Counter:
            def __init__(self):
                self.n = 0

            def add(self, k: int) -> None:
                self.n += k

            def get(self) -> int:
                return self.n

        counter = Counter.options(num_cpus=0).remote()
        task = ray.remote(num_cpus=1)(run_task)
        shards = [work / f"shard_{i:04d}.h5" for i in range(s.workers)]
        spec = asdict(s)
        pending = [task.remote(spec, i, share, str(p), counter) for i, (share, p) in enumerate(zip(shares, shards)) if share]
        refs = list(pending)
        tty = sys.stderr.isatty()
        last_print = 0.0
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            now = time.time()
            if progress and (tty or now - last_print > 10 or not pending):
                done = ray.get(counter.get.remote())
                rate = done / max(now - t0, 1e-9)
                bar = "#" * int(30 * done / s.n)
                end = "" if tty and pending else "\n"
                print(f"\r  {s.process}: [{bar:<30}] {done}/{s.n} ({rate:.1f}/s, {s.workers} worker(s))",
                      end=end, file=sys.stderr, flush=True)
                last_print = now
        n_events = sum(ray.get(refs))
        events = s.process == "event_objects"
        attrs = {"generator": "pythia8mc + fastjet (e2e-search)", "process": s.process, "n": s.n, "seed": s.seed,
                 "workers": s.workers, "channel_names": ",".join(s.channels), "image_size": s.image_size,
                 "pixel_eta": 0.0174, "pixel_phi": 2 * np.pi / 360, "jet_algorithm": "anti-kt",
                 "jet_radius": 0.4 if events else 0.8, "sqrt_s_gev": 13000.0,
                 "pthat_min_gev": "ttbar: none, W+jets: 40" if events else 400.0, "mass_range": list(s.mass_range), "decay": s.decay,
                 "per_mass": s.per_mass, "events_generated": int(n_events),
                 "layout": "objects" if events else "channels_last"}
        _merge([p for p, share in zip(shards, shares) if share], tmp, attrs)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if tmp.exists():
            tmp.unlink()
        if started_ray:
            ray.shutdown()
    elapsed = time.time() - t0
    return {"out": str(out), "n": s.n, "seconds": elapsed, "per_second": s.n / elapsed, "events": int(n_events)}
