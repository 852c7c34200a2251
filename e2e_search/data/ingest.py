"""The sparse cache built before the trials start (``e2e-search run``, ``data.cache: sparse``): its blocks as Ray
tasks on this node, one per CPU (the cache's format and its in-process build: trainables/data/sparse_ingest.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trainables.data.setup import DataSetup
from trainables.data.sparse_cache import open_cache
from trainables.data.sparse_ingest import ensure, write_block
from trainables.errors import UserError


def ray_blocks(parallel: int) -> Callable[[dict, np.ndarray, list[tuple[int, int]], Path], list[tuple[int, int]]]:
    """A ``run_blocks`` for :func:`trainables.data.sparse_ingest.ensure`: the blocks as Ray tasks on this node (the
    folder is on its disk), at most ``parallel`` at a time. Needs a connected Ray."""
    def run(spec: dict, rows: np.ndarray, parts: list[tuple[int, int]], tmp: Path) -> list[tuple[int, int]]:
        return _run_ray(spec, rows, parts, tmp, parallel)

    run.tasks = "Ray tasks"  # type: ignore[attr-defined]  # said in the build's progress line
    return run


def _run_ray(spec: dict, rows: np.ndarray, parts: list[tuple[int, int]], tmp: Path,
             parallel: int) -> list[tuple[int, int]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=1, max_retries=0)(write_block).options(scheduling_strategy=here)
    spec_ref = ray.put(spec)
    todo = list(enumerate(parts))
    pending: list[ray.ObjectRef] = []
    done: list[tuple[int, int]] = []
    try:
        while todo or pending:
            while todo and len(pending) < parallel:
                i, (a, b) = todo.pop(0)
                pending.append(task.remote(spec_ref, i, rows[a:b], str(tmp)))
            ready, pending = ray.wait(pending, num_returns=1)
            done.extend(ray.get(ready))
    except ray.exceptions.RayTaskError as e:
        for ref in pending:
            ray.cancel(ref, force=True)
        cause = getattr(e, "cause", None)
        if isinstance(cause, UserError):
            raise cause from None
        raise
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return sorted(done)



def ingest_for_search(setup: DataSetup, *, use_ray: bool = True) -> Path | None:
    """What ``e2e-search run`` does before the trials start: for ``cache: sparse``, build the cache with Ray
    tasks (one per CPU of this node) unless it exists; prints one line either way. None for other caches."""
    if setup is None or setup.cache != "sparse" or setup.kind != "images":
        return None
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    parallel = 1
    if use_ray:  # one task per CPU of this node (the blocks run here, where the folder is)
        import ray

        here = ray.get_runtime_context().get_node_id()
        cpus = [n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == here and n["Alive"]]
        parallel = max(1, int(cpus[0] if cpus else 1))
    t0 = time.perf_counter()
    built: list[str] = []

    def note(line: str) -> None:
        built.append(line)
        log(line)

    folder = ensure(setup, parallel=parallel, run_blocks=ray_blocks(parallel) if use_ray else None, log=note)
    if not built:
        c = open_cache(folder)
        log(f"data: sparse cache {folder} reused ({len(c.rows)} images, {c.meta['fill']:.2%} of pixels non-zero, "
            f"{c.nbytes / 2**20:,.1f} MiB, checked in {time.perf_counter() - t0:.2f} s)")
    return folder
