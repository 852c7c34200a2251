"""Search efficiency: ASHA + TPE / GP / warm-started TPE vs random search, in trial-epochs to a target val AUC.

    .venv/bin/python bench/search_efficiency.py --seeds 0,1,2 --trials 16 --random-trials 32 --epochs 9 \
        --searches tpe,gp,warm_tpe

Both searches run the same ViT search space (learning rate over four decades, depth, width, patch size,
pooling) on one fixed generated dataset (``--n`` Pythia top vs QCD jets, 4,000 by default, as
``search_spaces/vit_pareto.yaml`` generates them, averaged down to 25x25), through ``e2e_search.search.run.execute`` as
``e2e-search run`` does. ``--val-fraction`` of the jets (0.25 by default) form the validation split that scores
every trial; the rest train. A larger validation split (``--n 16000 --val-fraction 0.75``: 12,000 jets) makes a
high target a property of the configuration rather than of the split's noise:

- **ASHA + TPE**: ``search.algorithm: tpe``, ``scheduler: asha`` (grace ``--grace`` epochs, 1 by default,
  reduction factor 3), one search per seed in ``--seeds``;
- **ASHA + GP** (``--searches`` with ``gp``): ``search.algorithm: gp``, the same ASHA, one search per seed;
- **warm-started ASHA + TPE** (``warm_tpe``): first one ASHA + TPE search (search seed 100; with
  ``--source-per-seed`` one per seed, search seed 100 + seed) on another split
  of the same generated data (``data.seed: 1``), then one ASHA + TPE search per seed with
  ``search.warm_start: {experiment: <that search>, top: --warm-top}``. The source search's own trial-epochs
  are not counted (they are the earlier search that a warm start reuses);
- **random**: ``search.algorithm: random``, ``scheduler: none``: every trial trains all ``--epochs``.

The random search runs first (it sets the target), then the source search, then seed by seed one search of
each kind; ``--curves`` is rewritten after every search, so a run cut short keeps every finished search
(read it back with ``--curves`` alone).

A trial-epoch is one epoch of one trial. The cost of a search to reach the target is the number of
trial-epochs reported (in the order MLflow logged them, all trials counted) up to the first val AUC at or
above ``--target``. The default target is what the best 10% of the random
trials reach (``--target-quantile 0.9``): finding a top-10% model. Random trials are independent draws, so
the random figure is an expectation: over 2,000
random orders of the random trials (one at a time, each trained to the end), the trial-epochs up to the first
one that reaches the target. It prints both, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import mean, median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import local_tracking, machine, start_ray, write_result

SPACE = {
    "lr": {"type": "loguniform", "low": 1.0e-5, "high": 1.0e-1},
    "batch_size": 64,
    "weight_decay": 0.05,
    "patch_size": {"type": "choice", "values": [5, 25]},
    "depth": {"type": "randint", "low": 1, "high": 5},
    "embed_dim": {"type": "choice", "values": [16, 32, 64]},
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "pool": {"type": "choice", "values": ["token", "avg"]},
}
GENERATE = {"recipe": "top_vs_qcd", "workers": 2, "seed": 1}  # what search_spaces/vit_pareto.yaml uses (plus n)


def data_path(n: int) -> str:
    return f"e2e_runs/data/top_vs_qcd_{n // 1000}k.h5" if n % 1000 == 0 else f"e2e_runs/data/top_vs_qcd_{n}.h5"


def search_config(data: str, tmp: str, name: str, *, algorithm: str, scheduler: str, trials: int, epochs: int,
                  seed: int, concurrent: int, data_seed: int = 0, warm_start: dict | None = None,
                  n: int = 4000, val_fraction: float = 0.25, grace: int = 1) -> dict:
    sched = {"type": scheduler, "max_epochs": epochs}
    if scheduler == "asha":
        sched.update(grace_period=grace, reduction_factor=3)
    return {
        "name": name, "family": "vit", "task": {"type": "classification", "num_classes": 2},
        # 125x125 jets averaged down to 25x25 (5x5 blocks): quick on a CPU, still far from trivial to tag.
        "data": {"path": data, "val_fraction": val_fraction, "test_fraction": 0.0, "cache": "device", "log1p": True,
                 "resize": [25, 25], "resize_mode": "avgpool", "generate": {**GENERATE, "n": n}, "seed": data_seed},
        "params": SPACE,
        "search": {"algorithm": algorithm, "num_samples": trials, "max_concurrent": concurrent, "metric": "val_auc",
                   "seed": seed, **({"warm_start": warm_start} if warm_start else {})},
        "scheduler": sched,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "tracking": local_tracking(tmp),
    }


def curves(uri: str, parent_run_id: str) -> list[list[tuple[int, int, float]]]:
    """Each trial's val AUC as [(logged at ms, epoch, value)], from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return [sorted((m.timestamp, m.step, m.value) for m in client.get_metric_history(r.info.run_id, "val_auc"))
            for r in runs]


def cost_in_order(trials: list[list[tuple[int, int, float]]], target: float) -> int | None:
    """Trial-epochs logged up to the first value >= target (in logging order), or None if never reached."""
    events = sorted(e for t in trials for e in t)
    for i, (_, _, v) in enumerate(events, 1):
        if v >= target:
            return i
    return None


def expected_random_cost(trials: list[list[tuple[int, int, float]]], target: float, orders: int = 2000,
                         seed: int = 0) -> tuple[float, float]:
    """Mean trial-epochs to reach ``target`` over random orders of independent trials run one at a time, and the
    share of orders that reached it at all."""
    rng = random.Random(seed)
    costs, reached = [], 0
    for _ in range(orders):
        order = trials[:]
        rng.shuffle(order)
        spent = 0
        for t in order:
            hit = next((ep for _, ep, v in sorted(t, key=lambda e: e[1]) if v >= target), None)
            if hit is not None:
                costs.append(spent + hit)
                reached += 1
                break
            spent += len(t)
    return (mean(costs) if costs else float("nan")), reached / orders


Curves = list[list[tuple[int, int, float]]]  # per trial: [(logged at ms, epoch, val AUC)]


LABELS = {"asha_tpe": "ASHA+TPE", "asha_gp": "ASHA+GP", "asha_tpe_warm": "ASHA+TPE warm"}
SEARCHES = {"tpe": "asha_tpe", "gp": "asha_gp", "warm_tpe": "asha_tpe_warm"}


def run_searches(args) -> tuple[dict[str, dict[str, Curves]], Curves]:
    """The ASHA searches (one per seed and kind in ``--searches``) and the random search, on one generated
    dataset and one Ray -> ({kind: {seed: curves}}, random curves)."""
    import ray

    from e2e_search.search.plan import plan
    from e2e_search.search.ray_env import quiet_libraries
    from e2e_search.search.run import execute
    from e2e_search.spec.loader import validate

    tmp = tempfile.mkdtemp(prefix="e2e_eff_")
    data = args.data
    quiet_libraries(False)
    start_ray()
    kinds = [k.strip() for k in args.searches.split(",") if k.strip()]

    def run(name: str, **kw) -> Curves:
        cfg = validate(search_config(data, tmp, name, epochs=args.epochs, concurrent=args.concurrent, n=args.n,
                                     val_fraction=args.val_fraction, grace=args.grace, **kw), source="bench")
        out = execute(plan(cfg))
        return curves(out.tracking_uri, out.parent_run_id)

    seeds = args.seeds.split(",")
    out: dict[str, dict[str, Curves]] = {SEARCHES[k]: {} for k in kinds}
    sources: dict[str, Curves] = {}  # the warm starts' earlier searches (scored on their own split)
    rnd: Curves = []

    def save() -> None:  # after every search: a run cut short keeps what it measured (--curves)
        if args.curves:
            Path(args.curves).write_text(json.dumps({"argv": sys.argv, **out, "random": rnd, "sources": sources}))

    try:
        # random first (it sets the target), then seed by seed, so that every finished seed is complete
        rnd = run("random", algorithm="random", scheduler="none", trials=args.random_trials, seed=100)
        save()
        if "warm_tpe" in kinds and not args.source_per_seed:  # the earlier search: another split, its own seed
            sources["shared"] = run("source_tpe", algorithm="tpe", scheduler="asha", trials=args.trials, seed=100,
                                    data_seed=1)
        for s in seeds:
            source = "source_tpe"
            if "warm_tpe" in kinds and args.source_per_seed:  # each warm search its own earlier search
                source = f"source_tpe_{s}"
                sources[s] = run(source, algorithm="tpe", scheduler="asha", trials=args.trials, seed=100 + int(s),
                                 data_seed=1)
            for kind in kinds:
                warm = {"experiment": source, "top": args.warm_top} if kind == "warm_tpe" else None
                algorithm = "tpe" if kind == "warm_tpe" else kind
                out[SEARCHES[kind]][s] = run(f"asha_{kind}_{s}", algorithm=algorithm, scheduler="asha",
                                             trials=args.trials, seed=int(s), warm_start=warm)
                save()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return out, rnd, sources


def summarize(groups: dict[str, dict[str, Curves]], rnd: Curves, target: float | None, quantile: float,
              sources: dict[str, Curves] | None = None) -> list[dict]:
    if target is None:
        bests = sorted(max(v for _, _, v in t) for t in rnd if t)
        target = float(np.quantile(bests, quantile))
        print(f"target val AUC {target:.4f}: the {quantile:g} quantile of the random trials' best")
    rows = []
    print(f"{'search':>20} {'trials':>6} {'trial-epochs run':>16} {'best val AUC':>12} {'trial-epochs to target':>22}")
    for kind, by_seed in groups.items():
        for s, tr in by_seed.items():
            c = cost_in_order(tr, target)
            best = max((v for t in tr for _, _, v in t), default=float("nan"))
            rows.append({"search": f"{kind} seed {s}", "kind": kind, "trials": len(tr),
                         "trial_epochs": sum(map(len, tr)), "best": best, "to_target": c, "target": target})
            print(f"{LABELS.get(kind, kind) + ' s' + str(s):>20} {len(tr):6d} {sum(map(len, tr)):16d} {best:12.4f} "
                  f"{c if c is not None else 'not reached':>22}")
    exp, share = expected_random_cost(rnd, target)
    best = max((v for t in rnd for _, _, v in t), default=float("nan"))
    hits = sum(1 for t in rnd if any(v >= target for _, _, v in t))
    in_order = cost_in_order(rnd, target)
    rows.append({"search": "random", "trials": len(rnd), "trial_epochs": sum(map(len, rnd)), "best": best,
                 "expected_to_target": exp, "orders_reaching": share, "trials_reaching": hits,
                 "in_logged_order": in_order, "target": target})
    print(f"{'random':>20} {len(rnd):6d} {sum(map(len, rnd)):16d} {best:12.4f} {exp:22.1f}  (expected; "
          f"{hits}/{len(rnd)} trials reach it; {in_order} in the order it ran)")
    for s, tr in (sources or {}).items():  # whether each warm start's earlier search found the target region
        best = max((v for t in tr for _, _, v in t), default=float("nan"))
        print(f"{'source ' + str(s):>20} {len(tr):6d} {sum(map(len, tr)):16d} {best:12.4f}  (its own split; "
              f"{'above' if best >= target else 'below'} the target)")
    print()
    medians = {}
    for kind, by_seed in groups.items():
        # a search that never reached the target counts as infinitely costly (censored), never as left out
        all_costs = [r["to_target"] if r.get("to_target") is not None else math.inf
                     for r in rows if r.get("kind") == kind]
        costs = [c for c in all_costs if c != math.inf]
        if all_costs and exp == exp:
            medians[kind] = median(all_costs)
            mean_part = f"mean {mean(costs) / exp:.2f} of those that reached it" if costs else "none reached it"
            print(f"{LABELS.get(kind, kind)} / random trial-epochs to target: median {medians[kind] / exp:.2f} "
                  f"(unreached counted as infinite), {mean_part} ({len(costs)}/{len(by_seed)} searches reached it)")
    if "asha_tpe_warm" in medians and "asha_tpe" in medians:
        w, c = medians["asha_tpe_warm"], medians["asha_tpe"]
        ratio = ("undefined (neither median reached the target)" if w == c == math.inf else
                 "0: the cold median never reached the target" if c == math.inf else f"{w / c:.2f}")
        print(f"warm-started / cold ASHA+TPE trial-epochs to target (medians): {ratio} (goal: at most 0.5)")
        warm = [r.get("to_target") or math.inf for r in rows if r.get("kind") == "asha_tpe_warm"]
        cold = [r.get("to_target") or math.inf for r in rows if r.get("kind") == "asha_tpe"]
        lo, hi, share = bootstrap_ratio(warm, cold)
        print(f"  bootstrap over seeds (2,000 resamples): 68% interval {lo:.2f} to {hi:.2f}; the ratio is at most 0.5 "
              f"in {share:.0%} of resamples")
    return rows


def bootstrap_ratio(warm: list[float], cold: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The ratio of medians (warm / cold trial-epochs to target, unreached = inf) over ``n`` resamples of the
    seeds (each list with replacement, independently) -> (16th percentile, 84th percentile, share <= 0.5).
    A resample where neither median reaches the target counts as above 0.5 (undefined is not a success)."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(n):
        w = float(np.median(rng.choice(warm, len(warm))))
        c = float(np.median(rng.choice(cold, len(cold))))
        ratios.append(math.inf if w == math.inf else 0.0 if c == math.inf else w / c)
    r = np.array(ratios)
    return (float(np.percentile(r, 16, method="nearest")), float(np.percentile(r, 84, method="nearest")),
            float(np.mean(r <= 0.5)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="one ASHA search of each kind per seed")
    ap.add_argument("--searches", default="tpe", help="kinds of ASHA search, comma-separated: tpe (cold TPE), gp, "
                                                      "warm_tpe (TPE warm-started from a search on another split)")
    ap.add_argument("--warm-top", type=int, default=4, help="warm_tpe: the earlier search's best trials queued")
    ap.add_argument("--source-per-seed", action="store_true",
                    help="warm_tpe: one source search per seed (search seed 100 + seed) instead of one shared source "
                         "(seed 100), so that the figures average over the luck of the earlier search too")
    ap.add_argument("--grace", type=int, default=1, help="ASHA's grace period in epochs (default 1; reduction "
                                                         "factor 3)")
    ap.add_argument("--trials", type=int, default=16, help="trials per ASHA search")
    ap.add_argument("--random-trials", type=int, default=32, help="trials of the random search (all epochs)")
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--target", type=float, help="target val AUC (default: see --target-quantile)")
    ap.add_argument("--target-quantile", type=float, default=0.9,
                    help="without --target: the val AUC that this share of the random trials stay below "
                         "(0.9: what the best 10%% of random configurations reach in --epochs)")
    ap.add_argument("--n", type=int, default=4000, help="generated jets in the fixed dataset (default 4000)")
    ap.add_argument("--val-fraction", type=float, default=0.25,
                    help="share of the jets in the validation split, which scores every trial (default 0.25: 1,000 of "
                         "4,000 jets, an AUC error of about 0.008; 0.75 of 16,000 jets: about 0.002)")
    ap.add_argument("--data", help="the fixed dataset: Pythia top vs QCD jets, generated with "
                                   f"{GENERATE} and --n if the file is missing (default e2e_runs/data/top_vs_qcd_<n>.h5)")
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--curves", help="a JSON file of the trials' val AUC curves: read if it exists (no search "
                                     "runs: other targets for the same searches), else written after the searches")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    args.data = args.data or data_path(args.n)
    print(machine(), flush=True)
    if args.curves and os.path.exists(args.curves):
        saved = json.loads(Path(args.curves).read_text())
        groups, rnd, sources = {k: v for k, v in saved.items() if k in LABELS}, saved["random"], saved.get("sources")
    else:
        groups, rnd, sources = run_searches(args)  # writes --curves after every search
    print(f"\n{machine()}\nViT space of {len(SPACE)} keys, {args.epochs} epochs max, data {args.data}, "
          f"{args.concurrent} trials at once")
    write_result(args.out, summarize(groups, rnd, args.target, args.target_quantile, sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
