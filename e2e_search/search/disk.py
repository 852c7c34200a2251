"""A full disk: refused before Ray when a folder a search writes to has too little room, and said in one line
when it fills up during the search (issue 30, kind 7).

A search writes to three places, often on different disks: Ray's storage (``tracking.storage``: every trial's
checkpoints), the MLflow store (a SQLite file) and MLflow's artifact root (``tracking.artifacts``: the best
checkpoints and plots the runs keep). A trial whose checkpoint cannot be written or kept fails (its MLflow run
FAILED, no champion from it); the search goes on with the others and ends with exit 1 and one line naming the full
disk. A full MLflow store records nothing more: the search stops at once (exit 1, one line; what could not be
written, e.g. the runs' end, is written by ``resume`` once there is room).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from e2e_search.data.capacity import existing_folder
from trainables.errors import UserError, is_disk_full

MIN_FREE_BYTES = 256 * 2**20
"""Free space a search needs at least in each folder it writes to (checkpoints of small models are a few MiB
each; Ray keeps two per trial, MLflow one per trial with its plots)."""


def sparse_cache_bytes(setup) -> int:
    """Bytes the sparse cache of ``setup`` (a DataSetup with ``cache: sparse``) writes: its non-zero pixels
    (``setup.fill`` of every row's H x W x C) as float32 values and int32 indices, with a 2x margin."""
    H, W = setup.src_size or setup.img_size
    rows = len(setup.train) + len(setup.val) + len(setup.test)
    return int(2 * rows * H * W * len(setup.channels) * (setup.fill or 0.0) * 8)


def needs(params: int, trials: int) -> dict[str, int]:
    """Bytes a search of ``trials`` trials of models of up to ``params`` parameters writes, at least
    MIN_FREE_BYTES each: Ray's storage keeps two checkpoints per trial (the best and the latest: weights and
    AdamW's two moments, float32), MLflow's artifact root one best checkpoint with its plots (~1 MiB), the store
    its rows (~1 MiB per trial)."""
    ckpt = 3 * 4 * params
    return {"storage": max(MIN_FREE_BYTES, trials * 2 * ckpt), "artifacts": max(MIN_FREE_BYTES, trials * (ckpt + 2**20)),
            "store": max(MIN_FREE_BYTES, trials * 2**20)}


def check_free_space(places: dict[str, tuple[Path, int]]) -> None:
    """Every folder of ``places`` (YAML key -> (folder, bytes it needs)) has that much free on its disk. Raises
    UserError naming the key, the folder, its free space, the need and the fix."""
    for key, (folder, need) in places.items():
        where = existing_folder(folder)
        try:
            free = shutil.disk_usage(where).free
        except OSError:  # not a local folder we can measure (checked elsewhere): nothing to say
            continue
        if free < need:
            raise UserError(f"{folder} has {free / 2**20:.0f} MiB free on its disk ({where}); this search needs about "
                            f"{need / 2**20:.0f} MiB there for its checkpoints and records: free space or set {key} to a "
                            "folder on another disk", key=key)


class DiskFull(Exception):
    """A search stopped because a disk ran full (its runs closed as far as the store allows): one line, exit 1."""


def full_disk_line(errors: list[str], places: dict[str, str], store: str | None = None) -> str:
    """The one line that says a disk ran full during a search: how many trials it failed, an example, where the
    search writes and what to do; ``store``: the MLflow store, when its own disk is what ran full."""
    if store is not None:
        return (f"the disk of the MLflow store {store} ran full during the search: it stopped, and what could not "
                "be recorded is missing (its runs may still read RUNNING); free space there, then `e2e-search resume "
                "EXPERIMENT` continues the search and closes them")
    where = ", ".join(f"{k} {v}" for k, v in places.items())
    example = next((e for e in errors if is_disk_full(e)), errors[0] if errors else "")
    if "] " in example:  # the OS's words, not the tool's preamble
        example = example[example.rindex("] ") + 2:]
    return (f"a disk ran full during the search ({len(errors)} trial(s) failed on it: {example[:120]}); the "
            f"search writes to {where}: free space there (or set tracking.storage / tracking.artifacts to another "
            "disk) and run the search again; no champion comes from a failed trial")


def quiet_store_full() -> None:
    """MLflow's SQL store logs every failed write with its traceback (ERROR, ``mlflow.store.db.utils``); a full
    disk fails every write: those records are dropped (the search says the cause once)."""
    import logging

    class _NotFull(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
            return not is_disk_full(text)

    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(type(f).__name__ == "_NotFull" for f in logger.filters):
        logger.addFilter(_NotFull())
