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
from typing import cast

import h5py
import numpy as np

from e2e_search.data.physics.detector import CHANNELS
from trainables.errors import UserError

PYTHIA_SEED_MAX = 900_000_000
BATCH_EVENTS = 64
IMAGE_SIZE_MAX = 360
"""Pixels are 2*pi/360 wide in phi: 360 of them already span the whole circle around the beam."""
SQRT_S_GEV = 13000.0
WORKER_BASE_BYTES = 512 << 20
"""Memory of one generation task besides its image buffers (Ray worker, Pythia, FastJet, awkward): ~220 MiB
measured without Ray, rounded up."""
IMAGE_BUFFERS = 4
"""Copies of a batch's images a task holds at its peak (the images, noise, the kept rows, HDF5's write); the
peak memory measured at 360 pixels is half of this estimate."""
COMPRESSED_FRACTION = 0.01
"""gzip-4 + shuffle keeps about this fraction of a (sparse, zero-suppressed) image's raw bytes (measured: 2.6 KiB
per 125x125x3 jet, 12.4 KiB per 360x360x3 jet, both below 1 KiB + 1% of the raw bytes)."""
FILE_OVERHEAD_BYTES = 1 << 20
"""HDF5 metadata and the 1-D datasets' chunks of one shard or output file, at most."""
EXAMPLE_BYTES = 1024
"""Compressed bytes of an example besides its image (scalars, chunk index), with margin; all of an event_objects row."""

CLI_KEYS = {"process": "PROCESS", "n": "--n", "out": "--out", "seed": "--seed", "workers": "--workers",
            "channels": "--channels", "image_size": "--image-size", "mass_range": "--mass-range", "decay": "--decay",
            "per_mass": "--per-mass"}
"""The ``data generate`` option that sets each GenSpec field (named in refusals)."""
YAML_KEYS = {"process": "data.generate.recipe", "out": "data.path",
             **{k: f"data.generate.{k}" for k in ("n", "seed", "workers", "channels", "image_size", "mass_range",
                                                   "decay", "per_mass")}}
"""The search YAML's key that sets each GenSpec field (``data.generate`` recipes)."""


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


def _verb(key: str) -> str:
    return "use" if key.startswith("-") or key.isupper() else "set"


def _use(key: str, value: str) -> str:
    """The fix, worded for a flag (``use --n 4``) or a YAML key (``set data.generate.n: 4``)."""
    return f"use {key} {value}" if _verb(key) == "use" else f"set {key}: {value}"


def work_plan(s: GenSpec) -> list[list[int]]:
    """Examples per label of each task that has work (see ``processes.split_counts``)."""
    from e2e_search.data.physics.processes import class_counts, split_counts

    # More workers than examples: each works on one example (the same plan as with n workers).
    return [c for c in split_counts(class_counts(s.process, s.n), min(s.workers, s.n)) if sum(c) > 0]


def needs(s: GenSpec) -> tuple[int, int, int]:
    """(tasks with work, memory per task, disk of the whole run) in bytes, estimated before generating."""
    tasks = len(work_plan(s))
    per_example: float
    if s.process == "event_objects":
        image, per_example = 0, EXAMPLE_BYTES
    else:
        image = s.image_size * s.image_size * len(s.channels) * 4
        per_example = EXAMPLE_BYTES + COMPRESSED_FRACTION * image
    memory = WORKER_BASE_BYTES + IMAGE_BUFFERS * BATCH_EVENTS * image
    # The tasks' shards and the merged output exist together until the shards are removed.
    disk = 2 * s.n * per_example + (tasks + 1) * FILE_OVERHEAD_BYTES
    return tasks, int(memory), int(disk)


def check_spec(s: GenSpec, *, keys: dict[str, str] = CLI_KEYS, local: bool = True) -> None:
    """Every option's range, then the memory (``local``: the tasks run on this machine) and the disk the output
    needs; UserError naming ``keys[field]`` otherwise. Nothing is simulated or written."""
    from e2e_search.data.physics.processes import CLASSIFICATION, PROCESSES
    from trainables.errors import did_you_mean

    k = keys
    if s.process not in PROCESSES:
        raise UserError(f"unknown process '{s.process}'{did_you_mean(s.process, PROCESSES)}", key=k["process"])
    if not isinstance(s.n, int) or s.n <= 0:
        raise UserError(f"must be > 0 (got {s.n}); {_use(k['n'], '1000')} for a thousand examples", key=k["n"])
    if s.process in CLASSIFICATION and s.n < 2:
        raise UserError(f"{s.n} example cannot hold both classes of {s.process} (half each); "
                        f"{_use(k['n'], '2')} or more", key=k["n"])
    if not isinstance(s.workers, int) or s.workers <= 0:
        raise UserError(f"must be > 0 (got {s.workers}); {_use(k['workers'], '1')} or one per core", key=k["workers"])
    if not 1 <= s.seed <= PYTHIA_SEED_MAX:
        raise UserError(f"{s.seed} is outside Pythia's seed range 1..{PYTHIA_SEED_MAX}; "
                        f"{_use(k['seed'], f'1..{PYTHIA_SEED_MAX}')}", key=k["seed"])
    bad = [c for c in s.channels if c not in CHANNELS]
    if bad or not s.channels or len(set(s.channels)) != len(s.channels):
        raise UserError(f"channels must be distinct names from {', '.join(CHANNELS)} (got {','.join(s.channels)}); "
                        f"{_use(k['channels'], ','.join(CHANNELS))} or a subset", key=k["channels"])
    if not 8 <= s.image_size <= IMAGE_SIZE_MAX:
        raw = s.image_size ** 2 * len(s.channels) * 4
        why = ("too small for a jet" if s.image_size < 8 else
               f"one {s.image_size}x{s.image_size}x{len(s.channels)} float32 image is {_human(raw)}, and pixels are "
               f"2*pi/360 wide in phi, so {IMAGE_SIZE_MAX} of them already go once around the beam")
        raise UserError(f"{s.image_size} pixels per side: {why}; {_use(k['image_size'], f'8..{IMAGE_SIZE_MAX}')} "
                        "(125 is the E2E window)", key=k["image_size"])
    try:
        lo, hi = (float(v) for v in s.mass_range)
    except (TypeError, ValueError):
        lo, hi = np.nan, np.nan
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi < SQRT_S_GEV):
        got = (",".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in s.mass_range)
               if isinstance(s.mass_range, (list, tuple)) else s.mass_range)
        raise UserError(f"needs LOW,HIGH in GeV with 0 < LOW < HIGH < {SQRT_S_GEV:g} (got {got}); "
                        f"{_use(k['mass_range'], '50,200' if k['mass_range'].startswith('-') else '[50, 200]')}",
                        key=k["mass_range"])
    if s.decay not in ("bb", "gammagamma"):
        raise UserError(f"unknown decay '{s.decay}' (valid: bb, gammagamma); {_use(k['decay'], 'bb')}", key=k["decay"])
    if not isinstance(s.per_mass, int) or s.per_mass <= 0:
        raise UserError(f"must be > 0 (got {s.per_mass}); {_use(k['per_mass'], '200')}", key=k["per_mass"])
    out = Path(s.out)
    if out.suffix not in (".h5", ".hdf5"):
        raise UserError(f"'{s.out}' should end in .h5; {_use(k['out'], out.with_suffix('.h5').name)}", key=k["out"])
    probe = out.parent.resolve()
    while not probe.exists():
        probe = probe.parent
    try:
        if probe.is_file():
            raise NotADirectoryError(f"{probe} is a file")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"cannot write '{s.out}' ({e.strerror or e}); {_use(k['out'], 'a path in a writable folder')}",
                        key=k["out"]) from None
    _check_capacity(s, k, local)


def _check_capacity(s: GenSpec, k: dict[str, str], local: bool) -> None:
    from e2e_search.data.capacity import SAFETY, available_memory, check_disk, human

    tasks, memory, disk = needs(s)
    images = s.process != "event_objects"
    shape = f"{s.image_size}x{s.image_size}x{len(s.channels)}"
    if local:
        avail = available_memory()
        fit = int(avail // (memory * SAFETY))
        if fit < tasks:
            what = (f"{tasks} generation task(s) need about {human(tasks * memory)} of memory (each "
                    f"{human(memory)}" + (f", with {BATCH_EVENTS} {shape} float32 images" if images else "") +
                    f"), {human(avail)} is available on this machine")
            if fit >= 1:
                raise UserError(f"{what}; {_use(k['workers'], str(fit))} or fewer", key=k["workers"])
            raise UserError(f"{what}; {_verb(k['image_size'])} a smaller {k['image_size']}", key=k["image_size"])
    what = (f"{s.n} examples of {shape} float32 images" if images else f"{s.n} events") + \
        " (the tasks' shards and the merged file, compressed)"
    fix = (f"{_verb(k['n'])} a smaller {k['n']}" + (f" or {k['image_size']}" if images else "") +
           f", or put {k['out']} on a disk with more space")
    check_disk(Path(s.out), disk, what=what, key=k["n"], fix=fix)


def _human(n: float) -> str:
    from e2e_search.data.capacity import human

    return human(n)


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


def run_task(spec: dict, task: int, counts: list[int], shard: str, progress=None) -> int:
    """Generate ``counts`` examples (per label, see ``processes.class_counts``) into ``shard``; returns the number
    of events generated."""
    from e2e_search.data.physics.processes import samples

    s = GenSpec(**spec)
    rng = np.random.default_rng(task_seed(s.seed, task, 0))
    mass_range = cast("tuple[float, float]", tuple(s.mass_range))  # two numbers: check_spec
    parts = samples(s.process, counts, rng=rng, mass_range=mass_range, decay=s.decay, per_mass=s.per_mass)
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
                if smp.extra.get("balance"):  # at most the task's count of each label
                    cap = smp.extra["balance"]
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
        from e2e_search.data.physics.events import event_rows

        return event_rows(smp, events, rng)
    import awkward as ak

    from e2e_search.data.physics.clustering import Batch, jet_at
    from e2e_search.data.physics.detector import jet_images

    b = Batch(events)
    sel = smp.select(b)
    keep = np.nonzero(sel["keep"])[0]
    if len(keep) == 0:
        return None
    idx = sel["jet"][keep]
    jets = jet_at(b, sel["jet"])[keep]
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


def generate(s: GenSpec, *, address: str | None = None, progress: bool = True,
             keys: dict[str, str] = CLI_KEYS) -> dict:
    """Run the generation tasks on Ray and write ``s.out``; returns a summary.

    Every option, the memory and the disk are checked first (``check_spec``); refusals name ``keys[field]``.
    Each class's count is spread over the tasks, so every share is class-balanced whatever ``s.workers``
    (tasks without work are not started).
    """
    import ray

    check_spec(s, keys=keys, local=address is None)
    plan = work_plan(s)
    if progress and len(plan) < s.workers:
        print(f"note: {s.n} examples keep {len(plan)} of the {s.workers} workers busy (each share class-balanced)",
              file=sys.stderr, flush=True)
    out = Path(s.out).resolve()  # the tasks run in their own working folders
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out.parent} ({e.strerror}); {_use(keys['out'], 'a writable path')}",
                        key=keys["out"]) from None
    work = out.with_name(f".{out.name}.parts-{os.getpid()}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    started_ray = _start_ray(address, len(plan))
    t0 = time.time()
    try:
        work.mkdir(parents=True, exist_ok=True)
        shards = [work / f"shard_{i:04d}.h5" for i in range(len(plan))]
        n_events = _run_tasks(s, plan, shards, progress, t0)
        _merge(shards, tmp, _attrs(s, len(plan), n_events))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if tmp.exists():
            tmp.unlink()
        if started_ray:
            ray.shutdown()
    elapsed = time.time() - t0
    return {"out": s.out, "n": s.n, "seconds": elapsed, "per_second": s.n / elapsed, "events": int(n_events)}


def _start_ray(address: str | None, cpus: int) -> bool:
    """Start Ray for ``cpus`` tasks (or connect to ``address``) unless it runs already; whether it was started."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # (ignores: Ray's stub types logging_level as int, but ray.init takes a level name too)
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")  # type: ignore[arg-type]
    else:
        ray.init(num_cpus=cpus, log_to_driver=False, logging_level="WARNING",  # type: ignore[arg-type]
                 include_dashboard=False)
    return True


def _run_tasks(s: GenSpec, plan: list[list[int]], shards: list[Path], progress: bool, t0: float) -> int:
    """Run one task per share of ``plan`` into its shard, showing progress (``progress``; rate since ``t0``) until
    all are done; returns the number of events they generated."""
    import ray

    @ray.remote
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, k: int) -> None:
            self.n += k

        def get(self) -> int:
            return self.n

    # @ray.remote made Counter an ActorClass, which mypy does not see (it does not apply class decorators)
    counter = Counter.options(num_cpus=0).remote()  # type: ignore[attr-defined]
    task = ray.remote(num_cpus=1)(run_task)
    spec = asdict(s)
    pending = [task.remote(spec, i, counts, str(p), counter) for i, (counts, p) in enumerate(zip(plan, shards))]
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
            print(f"\r  {s.process}: [{bar:<30}] {done}/{s.n} ({rate:.1f}/s, {len(plan)} worker(s))",
                  end=end, file=sys.stderr, flush=True)
            last_print = now
    return sum(ray.get(refs))


def _attrs(s: GenSpec, workers: int, n_events: int) -> dict:
    """The output file's attributes: how it was generated (``workers``: the tasks that had work)."""
    events = s.process == "event_objects"
    return {"generator": "pythia8mc + fastjet (e2e-search)", "process": s.process, "n": s.n, "seed": s.seed,
            "workers": workers, "channel_names": ",".join(s.channels), "image_size": s.image_size,
            "pixel_eta": 0.0174, "pixel_phi": 2 * np.pi / 360, "jet_algorithm": "anti-kt",
            "jet_radius": 0.4 if events else 0.8, "sqrt_s_gev": 13000.0,
            "pthat_min_gev": "ttbar: none, W+jets: 40" if events else 400.0, "mass_range": list(s.mass_range),
            "decay": s.decay,
            "per_mass": s.per_mass, "events_generated": int(n_events),
            "layout": "objects" if events else "channels_last"}
