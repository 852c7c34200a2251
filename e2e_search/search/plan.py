"""Everything checked before Ray starts, in one pass and a fixed order, and nothing written but a generated or
converted data file (none in a dry run). The YAML's own checks (schema, parameters against each family, the
sampler and scheduler, metrics) ran when it was loaded (e2e_search/spec/loader.py ``validate``); ``plan`` then
checks what needs the data and the machine:

1. the ``data.generate`` recipe: its values, memory and disk (when the file does not exist yet);
2. model shapes against the data shape the recipe will write (before anything is simulated);
3. GPUs asked for against this machine's;
4. the MLflow store and every name the search derives from the YAML; the Optuna storage, if any;
5. ``search.warm_start``'s earlier trials;
6. the data generated, or converted (Parquet, ROOT, CSV) to its HDF5 cache;
7. the data file itself (e2e_search/data/inspect.py: keys, layout, labels, splits, statistics, the image cache);
8. model shapes against that file's shape, for every parameter value;
9. free space on the disks the search writes to (e2e_search/search/disk.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_search.data.formats import materialize
from e2e_search.data.inspect import inspect
from e2e_search.search.ray_env import init_ray, runs_in_process
from e2e_search.spec.schema import SearchSpace
from e2e_search.spec.shapes import check_shapes
from trainables.data.setup import DataSetup
from trainables.errors import UserError
from trainables.workdir import DEFAULT_WORKDIR


@dataclass
class Plan:
    """A checked search: its spec, its data, where it writes."""
    cfg: SearchSpace
    data: DataSetup | None
    """None in a dry run whose data file is still to be generated."""
    workdir: Path
    storage: Path
    tracking_uri: str
    artifact_root: str
    needs_generation: bool = False
    warm: Any = None
    """The earlier trials ``search.warm_start`` queues (e2e_search/search/warm_start.py), read in plan()."""



def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0



def plan(cfg: SearchSpace, *, address: str | None = None, generate: bool = True) -> Plan:
    """The checks of the module's text, in its order; the data generated or converted on the way (``generate``:
    False for a dry run, which writes nothing). Raises UserError naming the key and the fix."""
    from e2e_search.record.store import tracking_uri

    workdir = DEFAULT_WORKDIR
    needs_gen = cfg.data.generate is not None and not Path(cfg.data.path).exists()
    if needs_gen:  # the recipe's values, memory and disk, before anything else reads its shape
        check_generation(cfg.data.path, cfg.data.generate, address=address)
    # A file data.generate will write: the models must fit the shape it will have, before anything is simulated.
    check_shapes(cfg, None)
    if cfg.resources.gpus_per_worker > 0 and address is None and _local_gpus() == 0:
        raise UserError(
            f"asks for {cfg.resources.gpus_per_worker:g} GPU per worker but this machine has no GPU; "
            "set resources.gpus_per_worker: 0 (--set resources.gpus_per_worker=0) or use --address of a GPU cluster",
            key="resources.gpus_per_worker",
        )
    check_tracking(cfg, workdir)
    if cfg.search.optuna_storage:
        check_optuna_storage(cfg.search.optuna_storage)
    warm = _warm_start(cfg, workdir)
    if needs_gen and generate:
        generate_data(cfg.data.path, cfg.data.generate, address=address, drivers=not runs_in_process(cfg.resources))
    # Parquet/ROOT: converted once to an HDF5 cache (not in a dry run: then None, and nothing is written).
    source = None if (needs_gen and not generate) else materialize(cfg, generate=generate)
    data = inspect(source) if source is not None else None
    sizes: list[int] = []  # parameter counts of the models built: the checkpoints' size
    if data is not None:  # every family's model fits the data's shape for every parameter value
        check_shapes(cfg, data, sizes)
    storage = Path(cfg.tracking.storage) if cfg.tracking.storage else workdir / "ray_results"
    artifacts = Path(cfg.tracking.artifacts) if cfg.tracking.artifacts else workdir / "mlartifacts"
    _check_disks(cfg, workdir, storage, artifacts, max(sizes, default=0), data)
    return Plan(cfg=cfg, data=data, workdir=workdir, storage=storage.resolve(),
                tracking_uri=tracking_uri(cfg.tracking.uri, workdir), artifact_root=artifacts.resolve().as_uri(),
                needs_generation=needs_gen, warm=warm)



def _warm_start(cfg: SearchSpace, workdir: Path):
    """``search.warm_start``'s earlier trials, read from this search's tracking store (reads only); what the
    mapping onto the new space changed becomes a note, said once."""
    if cfg.search.warm_start is None:
        return None
    from e2e_search.record.store import resolve_uri
    from e2e_search.search.warm_start import load

    warm = load(cfg, resolve_uri(cfg.tracking.uri, workdir, flag="tracking.uri")[0])
    assert warm is not None  # None only without search.warm_start
    if warm.note:
        cfg.note("search.warm_start", warm.note)
    return warm



def check_tracking(cfg: SearchSpace, workdir: Path) -> None:
    """The MLflow store (``tracking.uri`` > ``MLFLOW_TRACKING_URI`` > the work directory's) is usable and every
    name the search derives is one MLflow and the file system accept; reads only (see tracking.check_store)."""
    from e2e_search.record.store import check_names, check_store, resolve_uri

    assert cfg.tracking.experiment is not None  # SearchSpace's validator defaults it to the search's name
    check_names(cfg.name, cfg.tracking.experiment, cfg.task.type)
    uri, key = resolve_uri(cfg.tracking.uri, workdir, flag="tracking.uri")
    check_store(uri, key, cfg.tracking.experiment)



def _check_disks(cfg: SearchSpace, workdir: Path, storage: Path, artifacts: Path, params: int, data) -> None:
    """Room for what the search writes (e2e_search/search/disk.py ``needs``) on Ray's storage, MLflow's artifact
    root and the SQLite store's disk, and for a sparse cache still to build; ``params``: the largest model's
    parameter count; ``data``: the DataSetup (None in a dry run of data still to generate)."""
    from e2e_search.record.store import resolve_uri, sqlite_path
    from e2e_search.search.disk import check_free_space, needs, sparse_cache_bytes

    need = needs(params, cfg.search.num_samples)
    places = {"tracking.storage": (storage, need["storage"]), "tracking.artifacts": (artifacts, need["artifacts"])}
    uri, key = resolve_uri(cfg.tracking.uri, workdir, flag="tracking.uri")
    db = sqlite_path(uri)
    if db is not None:
        places[key] = (db.parent, need["store"])
    if data is not None and data.cache == "sparse" and data.sparse_dir and not Path(data.sparse_dir).exists():
        places["data.cache"] = (Path(data.sparse_dir), sparse_cache_bytes(data))  # built before the first trial
    check_free_space(places)


def check_optuna_storage(url: str) -> None:
    """``search.optuna_storage`` names a database Optuna's RDB storage can open; reads only (a SQLite file's
    folder, or the nearest folder above it that exists, must be writable: the search creates the file and its
    folder when it starts).

    Raises:
        UserError: naming ``search.optuna_storage`` and why (a malformed URL, a missing driver, a folder that is
        not there, a server that does not answer)."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    key = "search.optuna_storage"
    try:
        parsed = make_url(url)
    except Exception as e:  # noqa: BLE001 - sqlalchemy's parse errors vary: one line either way
        raise UserError(f"'{url}' is not a database URL ({e}); give e.g. sqlite:///e2e_runs/optuna.db", key=key) from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise UserError(f"'{url}' is an in-memory database, gone when the search ends; give a file, e.g. "
                            "sqlite:///e2e_runs/optuna.db", key=key)
        folder = Path(db).resolve().parent
        existing = next(f for f in (folder, *folder.parents) if f.exists())  # the search creates the rest
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UserError(f"folder '{existing}' of '{url}' is not a writable folder; give another path",
                            key=key)
        return
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # noqa: BLE001 - a missing driver, a refused login, no server: one line
        why = " ".join(str(e).split())[:300]
        raise UserError(f"cannot open '{url}' ({type(e).__name__}: {why}); check the URL and that the database "
                        "server answers", key=key) from None


def _gen_spec(path: str, g):
    from e2e_search.data.physics.generate import GenSpec

    return GenSpec(process=g.recipe, n=g.n, out=path, seed=g.seed, workers=g.workers, channels=list(g.channels),
                   image_size=g.image_size, mass_range=tuple(g.mass_range), decay=g.decay, per_mass=g.per_mass)



def check_generation(path: str, g, *, address: str | None = None) -> None:
    """The ``data.generate`` recipe's values and the memory and disk its file needs, before anything runs
    (errors name ``data.generate.<key>``)."""
    if g.recipe == "toy_jets":
        from e2e_search.data.toy import check_toy

        check_toy(Path(path), n=g.n, image_size=g.image_size, channels=g.channels, seed=g.seed)
        return
    from e2e_search.data.physics.generate import YAML_KEYS, check_spec

    check_spec(_gen_spec(path, g), keys=YAML_KEYS, local=address is None)



def generate_data(path: str, g, *, address: str | None = None, drivers: bool = True) -> None:
    """Write ``path`` from the YAML's ``data.generate`` recipe (atomically; cached for later runs)."""
    check_generation(path, g, address=address)
    print(f"data file {path} not found: generating it with recipe '{g.recipe}' (cached for later runs)",
          file=sys.stderr)
    if g.recipe == "toy_jets":
        from e2e_search.data.toy import generate_toy_jets

        generate_toy_jets(path, n=g.n, image_size=g.image_size, channels=g.channels, seed=g.seed)
        return
    from e2e_search.data.physics.generate import YAML_KEYS, generate

    init_ray(address, verbose=False, drivers=drivers)  # the search reuses this Ray
    generate(_gen_spec(path, g), address=address, keys=YAML_KEYS)



def describe(p: Plan) -> str:
    c = p.cfg
    gen_n = c.data.generate.n if c.data.generate is not None else None  # (set when p.needs_generation)
    lines = [
        f"search '{c.name}': family {c.family_label}, task {c.task.type}, {c.search.algorithm} x {c.search.num_samples} trials, "
        f"metric {c.search.metric} ({c.search.mode}), scheduler {c.scheduler.type} up to {c.scheduler.max_epochs} epochs",
        f"data: {p.data.summary()}" if p.data else f"data: {c.data.path} will be generated ({gen_n} samples)"
        if p.needs_generation else f"data: {c.data.path} checked without converting it; run converts it once to an HDF5 cache",
        f"resources: {c.resources.workers} worker(s) x {c.resources.cpus_per_worker:g} CPU"
        + (f" + {c.resources.gpus_per_worker:g} GPU" if c.resources.gpus_per_worker else "") + " per trial",
        f"tracking: {p.tracking_uri} (experiment '{c.tracking.experiment}'), storage {p.storage}",
    ]
    if p.warm is not None:
        lines.append(f"warm start: the {len(p.warm.points)} best trials of experiment '{p.warm.experiment}' first"
                     + (" (and as prior observations)" if c.search.algorithm in ("tpe", "gp") else ""))
    return "\n".join(lines)
