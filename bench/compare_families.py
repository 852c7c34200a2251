"""search_spaces/compare_families.yaml on a generated top-vs-QCD set, then the family table from MLflow.

    .venv/bin/python bench/compare_families.py [--n 20000] [--budget cpu|gpu]

The data file (``e2e_runs/data/top_vs_qcd_<n>.h5``) is generated first when missing (Pythia 8,
2 workers). ``--budget cpu`` shrinks the search to what 2 cores finish in about half an hour:
patch 25 for the plain transformers, 8 trials of at most 3 epochs, the split cached in memory.
``--budget gpu`` runs the YAML's own search with one GPU per trial. Prints and writes
(``e2e_runs/bench/compare_families.md``) one row per family: best val AUC (and its background
rejection at 50% signal efficiency), parameters, trials, trial-epochs used, wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
CPU = ["search.num_samples=10", "scheduler.max_epochs=3", "scheduler.grace_period=1", "params.patch_size.values=[25]",
       "params.stem_channels.values=[16]", "params.width.values=[16]", "params.embed_dim.values=[64]",
       "params.pretrain_epochs=1", "data.cache=memory"]
GPU = ["resources.gpus_per_worker=1", "resources.cpus_per_worker=4", "data.cache=device"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--budget", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--name", default="bench_compare_families")
    args = ap.parse_args()
    data = ROOT / f"e2e_runs/data/top_vs_qcd_{args.n // 1000}k.h5"
    uri = f"sqlite:///{ROOT / 'e2e_runs/bench/mlflow.db'}"
    (ROOT / "e2e_runs/bench").mkdir(parents=True, exist_ok=True)
    sets = [f"name={args.name}", f"data.path={data}", f"data.generate.n={args.n}", "data.generate.seed=7",
            f"tracking.uri={uri}", *(CPU if args.budget == "cpu" else GPU)]
    cmd = [str(ROOT / ".venv/bin/e2e-search"), "run", str(ROOT / "search_spaces/compare_families.yaml")]
    cmd += sum((["--set", s] for s in sets), [])
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    wall = time.time() - t0
    if rc != 0:
        return rc

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(args.name)
    search = client.search_runs([exp.experiment_id], filter_string="tags.`e2e.kind` = 'search'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    trials = client.search_runs([exp.experiment_id], max_results=1000,
                                filter_string=f"tags.`mlflow.parentRunId` = '{search.info.run_id}'")
    rows: dict[str, dict] = {}
    for t in trials:
        fam = t.data.tags.get("e2e.family", "?")
        r = rows.setdefault(fam, {"auc": float("nan"), "rej50": float("nan"), "params": 0, "trials": 0, "epochs": 0})
        m = t.data.metrics
        r["trials"] += 1
        r["epochs"] += int(m.get("epochs_run", 0))
        if m.get("best_val_auc", -1) > (r["auc"] if r["auc"] == r["auc"] else -1):
            r.update(auc=m["best_val_auc"], rej50=m.get("best_val_rej50", float("nan")), params=int(m.get("num_params", 0)))
    lines = [f"compare_families on {data.name} ({args.n} jets), budget {args.budget}, search wall time {wall / 60:.1f} min",
             "", "| family | best val AUC | rejection @50% eff | parameters | trials | trial-epochs |",
             "|---|---|---|---|---|---|"]
    for fam, r in sorted(rows.items(), key=lambda kv: -kv[1]["auc"] if kv[1]["auc"] == kv[1]["auc"] else 0):
        lines.append(f"| {fam} | {r['auc']:.4f} | {r['rej50']:.1f} | {r['params']:,} | {r['trials']} | {r['epochs']} |")
    text = "\n".join(lines)
    print(text)
    (ROOT / "e2e_runs/bench/compare_families.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
