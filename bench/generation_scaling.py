"""Jets/s of `e2e-search data generate` with 1 and 2 Ray workers, side by side in one run.

    .venv/bin/python bench/generation_scaling.py [--n 1200] [--process top_vs_qcd]

Both runs share one local Ray (started and warmed up once, not timed); each run's time covers
Pythia initialisation, generation, clustering, images and the HDF5 merge.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import ray

from e2e_search.data.physics.generate import GenSpec, generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--process", default="top_vs_qcd")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(counts), log_to_driver=False, include_dashboard=False, logging_level="WARNING")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up (not timed): start one Ray worker process per core and import Pythia/FastJet there,
        # so neither run pays a cold start the other does not.
        generate(GenSpec(process=args.process, n=2 * max(counts), out=f"{tmp}/warm.h5", seed=1,
                         workers=max(counts)), progress=False)
        for w in counts:
            r = generate(GenSpec(process=args.process, n=args.n, out=f"{tmp}/w{w}.h5", seed=11, workers=w),
                         progress=False)
            rows.append((w, r["per_second"], r["seconds"]))
    base = rows[0][1]
    print(f"process {args.process}, {args.n} jets per run, {os.cpu_count()} cores")
    print(f"{'workers':>7}  {'jets/s':>8}  {'seconds':>8}  {'speed-up':>8}")
    for w, rate, secs in rows:
        print(f"{w:>7}  {rate:>8.1f}  {secs:>8.1f}  {rate / base:>7.2f}x")


if __name__ == "__main__":
    main()
