"""Issue 15's end-to-end check: the same one-trial search with ``data.cache: memory`` and ``sparse``, side by side.

    .venv/bin/python bench/sparse_search.py                 # 10,000 synthetic 125x125x3 jets (~6 min, 2 cores)
    .venv/bin/python bench/sparse_search.py --rows 2000     # a smoke run

Writes synthetic sparse jets at the occupancy of generated top/QCD jets (``_common.write_jets``, as
``bench/sparse_cache.py``), then runs ``e2e-search run`` three times on that file, each a new process with
the same seed, one ``vit`` trial (patch 25) for ``--epochs`` epochs: ``memory``, ``sparse`` (the first
sparse search builds the cache with Ray tasks before its trial) and ``sparse`` again (a second search:
the cache is reused). From MLflow it prints each trial's ``setup_s`` (what the trial spent on its data
before the first step), ``val_auc``, ``val_loss`` and ``train_loss``, the ingest time printed by ``run``,
and the ratios. The metrics agree within float tolerance: a sparse batch is the dense batch, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def config(path: Path, name: str, uri: str, epochs: int) -> dict:
    return {
        "name": name, "family": "vit", "task": {"type": "classification", "num_classes": 2},
        "data": {"path": str(path), "val_fraction": 0.2, "test_fraction": 0.1, "normalize": "per_channel",
                 "flip_augment": True},
        "params": {"lr": 1e-3, "batch_size": 256, "patch_size": 25, "depth": 2, "embed_dim": 32, "num_heads": 2},
        "search": {"algorithm": "random", "num_samples": 1, "seed": 3, "metric": "val_auc"},
        "scheduler": {"type": "none", "max_epochs": epochs},
        "resources": {"workers": 1, "cpus_per_worker": 2},
        "tracking": {"uri": uri},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--fill", type=float, default=0.00175)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from _common import machine, write_jets
    from mlflow.tracking import MlflowClient

    print(machine(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_jets(tmp / "jets.h5", args.rows, fill=args.fill)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        for name, cache in (("memory", "memory"), ("sparse", "sparse"), ("sparse_again", "sparse")):
            yml = tmp / f"{name}.yaml"
            yml.write_text(yaml.safe_dump(config(path, name, uri, args.epochs)))
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "e2e_search.cli", "run", str(yml), "--set", f"data.cache={cache}"],
                               cwd=tmp, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                print(p.stdout[-3000:], p.stderr[-3000:], sep="\n")
                return p.returncode
            ingest = re.search(r"sparse cache built in ([0-9.]+) s", p.stderr)
            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(name)
            (trial,) = client.search_runs([exp.experiment_id], filter_string="tags.`e2e.kind` = 'trial'")
            m = trial.data.metrics
            rows.append({"search": name, "cache": cache, "ingest": float(ingest.group(1)) if ingest else None,
                         "reused": "reused" in p.stderr, "setup_s": m["setup_s"], "wall": wall,
                         **{k: m[k] for k in ("val_auc", "val_loss", "train_loss")}})
            r = rows[-1]
            print(f"{name}: setup_s {r['setup_s']:.2f} s, val_auc {r['val_auc']:.6f}, val_loss {r['val_loss']:.6f}, "
                  f"train_loss {r['train_loss']:.6f}, ingest {r['ingest']}, reused {r['reused']}, "
                  f"run {wall:.0f} s", flush=True)
    mem, sp, again = rows
    print(f"\n{args.rows:,} jets, {args.epochs} epoch(s), one vit trial per search:")
    print("| search | cache | ingest before the trials | trial setup_s (MLflow) | val_auc | val_loss | train_loss | "
          "`run` wall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ing = f"{r['ingest']:.1f} s" if r["ingest"] is not None else ("reused" if r["reused"] else "—")
        print(f"| {r['search']} | {r['cache']} | {ing} | {r['setup_s']:.2f} s | {r['val_auc']:.6f} | "
              f"{r['val_loss']:.6f} | {r['train_loss']:.6f} | {r['wall']:.0f} s |")
    print(f"\nsetup_s sparse / memory: {sp['setup_s'] / mem['setup_s']:.4f} (first), "
          f"{again['setup_s'] / mem['setup_s']:.4f} (second search)")
    for k in ("val_auc", "val_loss", "train_loss"):
        print(f"{k}: |sparse - memory| = {abs(sp[k] - mem[k]):.2e}, |second - first sparse| = {abs(again[k] - sp[k]):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
