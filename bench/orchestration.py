"""Per-trial orchestration overhead of the two ways a trial runs, side by side, and how it grows with trials.

    .venv/bin/python bench/orchestration.py --trials 2,8,16 --epochs 2
    .venv/bin/python bench/orchestration.py --trials 2,8 --runners auto        # the warm path only

Runs real searches (``e2e_search.search.run.execute``: Ray Tune, MLflow in SQLite) of a tiny ViT on a small
generated toy dataset, so that training is short and the overhead shows, once per ``resources.runner``:

- ``auto``: each one-worker trial trains in its own Tune process, reused for the next trial (``reuse_actors``);
- ``ray_train``: each trial builds a Ray Train ``TorchTrainer`` with one worker (the path before issue 14).

For each search size it prints, per trial (means):

- ``start``: the trial function's start -> the core training (``startup_s``: for ray_train Ray Train's
  placement group, worker process and torch process group; ~0 in process);
- ``setup``: data read and cached, model built (``setup_s``);
- ``train+val``: the epochs themselves (sum of ``epoch_time_s``);
- ``report``: per-epoch metrics, checkpoint written and persisted, the result relayed to Tune
  (Tune's ``time_total_s`` less the three above);
- ``outside``: the rest of the trial's MLflow run (from Tune's trial start to its run closed): the trial
  process's start (or reuse), the TorchTrainer's shutdown, the closing upload of the checkpoint and plots;
- ``mlflow``: driver time in the MLflow callback (``tracking_s`` of the search run / trials);

and for the search: its wall time, the share of ``wall x concurrent trials`` spent training
(``train share``), the overhead per trial (``wall x concurrent - training``, per trial), and the ratio of
ray_train's overhead per trial to auto's at the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import local_tracking, machine, start_ray, write_result


def search_config(data: str, tmp: str, n_trials: int, epochs: int, concurrent: int, runner: str) -> dict:
    return {
        "name": f"orchestration_{runner}_{n_trials}", "family": "vit", "task": {"type": "classification", "num_classes": 2},
        "data": {"path": data, "val_fraction": 0.25, "test_fraction": 0.0, "cache": "device"},
        "params": {"lr": 1e-3, "batch_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
                   "mlp_ratio": 2.0, "seed": {"type": "randint", "low": 0, "high": 1000}},
        "search": {"algorithm": "random", "num_samples": n_trials, "max_concurrent": concurrent, "metric": "val_auc"},
        "scheduler": {"type": "none", "max_epochs": epochs},
        "resources": {"workers": 1, "cpus_per_worker": 1, "runner": runner},
        "tracking": local_tracking(tmp),
    }


def tune_results(storage: Path) -> dict[str, list[dict]]:
    """trial id -> its Tune results (``result.json`` of each trial directory)."""
    out: dict[str, list[dict]] = {}
    for f in storage.glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def measure(data: str, tmp: str, n_trials: int, epochs: int, concurrent: int, runner: str) -> dict:
    from mlflow.tracking import MlflowClient

    from e2e_search.search.plan import plan
    from e2e_search.search.run import execute
    from e2e_search.spec.loader import validate

    cfg = validate(search_config(data, tmp, n_trials, epochs, concurrent, runner), source="bench")
    p = plan(cfg)
    t0 = time.time()
    out = execute(p)
    wall = time.time() - t0
    client = MlflowClient(out.tracking_uri)
    parent = client.get_run(out.parent_run_id)
    tune_dir = Path(parent.data.tags["e2e.tune_path"])
    results = tune_results(tune_dir)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    rows = []
    for run in children:
        tid = run.data.tags["e2e.trial_id"]
        res = results.get(tid, [])
        if not res or run.info.end_time is None:
            continue
        first = res[0]
        train = sum(r["epoch_time_s"] for r in res)
        start, setup = first.get("startup_s", 0.0), first.get("setup_s", 0.0)
        total = res[-1]["time_total_s"]
        rows.append({"start": start, "setup": setup, "train": train, "report": total - start - setup - train,
                     "outside": (run.info.end_time - run.info.start_time) / 1000 - total,
                     "save": mean(r.get("save_s", 0.0) for r in res),
                     "persist": mean(r["report_s"] for r in res if "report_s" in r) if len(res) > 1 else float("nan")})
    tracking = parent.data.metrics.get("tracking_s", float("nan"))
    per = {k: mean(r[k] for r in rows) for k in rows[0]} if rows else {}
    per["mlflow"] = tracking / max(1, len(rows))
    train_total = sum(r["train"] for r in rows)
    return {"runner": runner, "trials": n_trials, "finished": len(rows), "wall_s": wall,
            "train_share": train_total / (wall * concurrent),
            "overhead_per_trial_s": (wall * concurrent - train_total) / max(1, len(rows)), "per_trial": per}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", default="2,8,16", help="search sizes, run one after the other on one Ray")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n", type=int, default=800, help="toy jets (32x32x3) in the file")
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--runners", default="auto,ray_train", help="values of resources.runner to compare")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    import ray

    from e2e_search.data.toy import generate_toy_jets
    from e2e_search.search.ray_env import quiet_libraries

    print(machine(), flush=True)
    tmp = tempfile.mkdtemp(prefix="e2e_orch_")
    data = os.path.join(tmp, "toy.h5")
    generate_toy_jets(data, n=args.n, image_size=32, channels=3, seed=0)
    quiet_libraries(False)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # what e2e-search sets
    rows = []
    try:
        ray_start = start_ray()
        for n in (int(x) for x in args.trials.split(",")):
            for runner in args.runners.split(","):
                rows.append({"ray_init_s": ray_start, **measure(data, tmp, n, args.epochs, args.concurrent, runner)})
                r = rows[-1]
                print(f"  {runner}, {n} trials: {r['wall_s']:.0f} s, {r['finished']} finished, "
                      f"train share {r['train_share']:.2f}, overhead {r['overhead_per_trial_s']:.1f} s/trial", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    auto = {r["trials"]: r["overhead_per_trial_s"] for r in rows if r["runner"] == "auto"}
    print(f"\n{machine()}\nray.init {rows[0]['ray_init_s']:.1f} s; {args.epochs} epochs of a 1-layer ViT on "
          f"{args.n} toy jets per trial, {args.concurrent} trials at once, 1 CPU each")
    cols = ["start", "setup", "train", "report", "outside", "mlflow"]
    print(f"{'runner':>9} {'trials':>6} {'wall s':>7} {'train share':>11} {'overhead/trial s':>16} {'vs auto':>7} | per trial s: "
          + " ".join(f"{c:>7}" for c in ["start", "setup", "trn+val", "report", "outside", "mlflow"])
          + f" | per epoch s: {'save':>5} {'persist':>7}")
    for r in rows:
        pt = r["per_trial"]
        ratio = r["overhead_per_trial_s"] / auto[r["trials"]] if auto.get(r["trials"]) else float("nan")
        print(f"{r['runner']:>9} {r['trials']:>6} {r['wall_s']:7.1f} {r['train_share']:11.2f} {r['overhead_per_trial_s']:16.1f} "
              f"{ratio:7.2f} |              " + " ".join(f"{pt[c]:7.2f}" for c in cols)
              + f" |              {pt['save']:5.2f} {pt['persist']:7.2f}")
    write_result(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
