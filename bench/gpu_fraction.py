"""Per-trial GPU fractions (``resources.gpus_per_worker: 1/K``): K small trials sharing one GPU vs one at a time.

    .venv/bin/python bench/gpu_fraction.py --model vit_ti25 --trials 4 --fractions 1,0.5,0.25

Runs the search's own trial function (``trainables.trial.run_trial``, a TorchTrainer per Tune trial) for
``--trials`` trials of the same small model under Ray Tune, once per GPU fraction, and prints the wall time
of the whole batch of trials, how many ran at once, and the summed training images/s. Needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import VIT, data_setup, fmt, machine, vit_params, write_jets, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_ti25", choices=sorted(VIT))
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--data")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--fractions", default="1,0.5,0.25")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cpus", type=float, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    from ray import tune

    from trainables.trial import run_trial

    print(machine(), flush=True)
    tmp = tempfile.mkdtemp(prefix="e2e_frac_")
    path = args.data or os.path.join(tmp, "jets.h5")
    if not os.path.exists(path):
        write_jets(path, args.n)
    params = {**vit_params(args.model), "batch_size": args.batch, "lr": 1e-4}
    _, setup = data_setup(path, cache="device", batch_size=args.batch, params=params)
    ray.init(num_cpus=(os.cpu_count() or 1) + 1, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", _temp_dir=os.environ.get("E2E_BENCH_RAY_TMP", "/tmp/rb"))
    rows = []
    for frac in (float(f) for f in args.fractions.split(",")):
        shared = {"family": "vit", "data": setup.to_dict(), "max_epochs": args.epochs, "metric": "val_loss",
                  "mode": "min", "metrics": ["val_loss"], "loader_workers": 0,
                  "train_storage": os.path.join(tmp, f"train_{frac:g}"),
                  "resources": {"workers": 1, "cpus_per_worker": args.cpus, "gpus_per_worker": frac,
                                "worker_failures": 0}}
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=shared), {"cpu": 0.01})
        tuner = tune.Tuner(trainable, param_space={**params, "seed": tune.grid_search(list(range(args.trials)))},
                           tune_config=tune.TuneConfig(max_concurrent_trials=args.trials),
                           run_config=tune.RunConfig(name=f"frac_{frac:g}", storage_path=os.path.join(tmp, "tune"),
                                                     verbose=0))
        t0 = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - t0
        rates = [r.metrics.get("train_samples_per_s", float("nan")) for r in grid]
        errors = sum(1 for r in grid if r.error)
        rows.append({"fraction": frac, "wall_s": wall, "trial_img_s": rates, "errors": errors,
                     "at_once": min(args.trials, int(1 / frac + 1e-9))})
        print(f"gpus_per_worker={frac:g}: {args.trials} trials in {wall:.0f} s, up to {rows[-1]['at_once']} at once, "
              f"per-trial img/s {[fmt(r) for r in rates]}, errors {errors}", flush=True)
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)  # the synthetic file and the runs' checkpoints
    base = rows[0]["wall_s"]
    print(f"\n{machine()}; {args.model}, batch {args.batch}, {args.trials} trials x {args.epochs} epochs "
          f"of {len(setup.train)} jets, data.cache device")
    print(f"{'gpus_per_worker':>15} {'wall s':>7} {'speed-up':>8} {'summed img/s (at once)':>23}")
    for r in rows:
        summed = sum(x for x in r["trial_img_s"] if x == x) * min(1.0, r["at_once"] / args.trials)
        print(f"{r['fraction']:15g} {r['wall_s']:7.0f} {base / r['wall_s']:8.2f} {fmt(summed):>23}")
    write_result(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
