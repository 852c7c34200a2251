"""search_spaces/compare_families.yaml on a generated top-vs-QCD set, then ``confirm`` of the best trial of each
family on the test split, and the family table against the ``resnet15`` baseline.

    .venv/bin/python bench/compare_families.py [--n 20000] [--budget cpu|gpu] [--seeds 3]

The data file (``e2e_runs/data/top_vs_qcd_<n>.h5``) is generated first when missing (Pythia 8,
2 workers). ``--budget cpu`` shrinks the search to what 2 cores finish in about half an hour:
patch 25 for the plain transformers, 10 trials of at most 3 epochs, the split cached in memory, coatnet and
maxvit at embed_dim 32 (dim_head 32, stem_width 8, mlp_ratio 2, 3 stages of 1 block; the others 64 wide).
``--budget gpu`` runs the YAML's own search with one GPU per trial. Then
``e2e-search confirm --per-family --top 1 --seeds N``: each family's best trial retrained with N seeds up to
its best epoch and scored once on the test split (every family the same budget: the same data, seeds and
resources). Prints and writes (``e2e_runs/bench/compare_families.md``) one row per family: test AUC mean
over seeds with its 95% bootstrap interval and std, background rejection at 30/50/70% signal efficiency
(test, mean over seeds), the difference to ``resnet15`` and P(family beats resnet15) from the paired
bootstrap, the search's best val AUC, parameters, FLOPs per jet and CPU throughput (batch 64) of the
seed-1 model, trials and trial-epochs of the search, wall times.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
CPU = ["search.num_samples=10", "scheduler.max_epochs=3", "scheduler.grace_period=1", "params.patch_size.values=[25]",
       "params.stem_channels.values=[16]", "params.width.values=[16]", "params.embed_dim.values=[64]",
       "params.pretrain_epochs=1", "data.cache=memory",
       # coatnet/maxvit at 64 wide take 5-8 min per epoch of 5,600 jets on one core: their own, smaller widths
       "params.embed_dim.when.family=[vit, swin, cait, hybrid_vit, mae]", "params.depths.values=[[1, 1, 1]]",
       "params.conv_stages.values=[1]", "params.stem_width=8", "params.dim_head=32",
       "params.mlp_ratio={value: 2, when: {family: [coatnet, maxvit]}}"]
GPU = ["resources.gpus_per_worker=1", "resources.cpus_per_worker=4", "data.cache=device"]
BASELINE = "resnet15"


def _fmt(v, spec: str = ".4f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def family_rows(client: MlflowClient, search) -> tuple[dict[str, dict], dict]:
    """family -> its confirmed finalist's figures (from the search's confirm/<id>.json), and that payload."""
    from e2e_search.report import _cost

    cid = search.data.tags["e2e.confirm_id"]
    with tempfile.TemporaryDirectory() as tmp:
        payload = json.loads(Path(client.download_artifacts(search.info.run_id, f"confirm/{cid}.json", tmp)).read_text())
    rk = payload["rankings"][0]
    fins = payload["finalists"]
    order = rk["matrix_finalists"]
    base = next((f for f in order if fins[f]["family"] == BASELINE), None)
    rows = {}
    for f in rk["finalists"]:
        fin = fins[f]
        t = fin["test"]
        row = {"auc": t.get("test_auc", {}).get("mean"), "std": t.get("test_auc", {}).get("std"),
               "interval": fin["intervals"].get("test_auc", [None, None]), "val_auc": fin["val"].get("val_auc"),
               "params": fin["num_params"], "seeds": len(t.get("test_auc", {}).get("values", {}))}
        for e in (30, 50, 70):
            row[f"rej{e}"] = t.get(f"test_rej{e}", {}).get("mean")
        if base is not None and f in order and f != base and row["auc"] is not None:
            row["p_base"] = rk["matrix"][order.index(f)][order.index(base)]
            row["d_base"] = row["auc"] - fins[base]["test"]["test_auc"]["mean"]
        seed1 = fin["seed_runs"].get("1") or next(iter(fin["seed_runs"].values()), None)
        if seed1:
            row.update(_cost(client, seed1))
        rows[fin["family"]] = row
    return rows, payload


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--budget", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per family in confirm (default 3)")
    ap.add_argument("--name", default="bench_compare_families")
    args = ap.parse_args()
    data = ROOT / f"e2e_runs/data/top_vs_qcd_{args.n // 1000}k.h5"
    uri = f"sqlite:///{ROOT / 'e2e_runs/bench/mlflow.db'}"
    (ROOT / "e2e_runs/bench").mkdir(parents=True, exist_ok=True)
    sets = [f"name={args.name}", f"data.path={data}", f"data.generate.n={args.n}", "data.generate.seed=7",
            f"tracking.uri={uri}", *(CPU if args.budget == "cpu" else GPU)]
    exe = [sys.executable, "-m", "e2e_search.cli"]  # the CLI of this interpreter (.venv/bin/python)
    cmd = [*exe, "run", str(ROOT / "search_spaces/compare_families.yaml")] + sum((["--set", s] for s in sets), [])
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
    cmd = [*exe, "confirm", args.name, "--search", search.info.run_id, "--per-family", "--top", "1",
           "--seeds", str(args.seeds), "--tracking-uri", uri]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    confirm_wall = time.time() - t0
    if rc != 0:
        return rc

    search = client.get_run(search.info.run_id)
    trials = client.search_runs([exp.experiment_id], max_results=1000,
                                filter_string=f"tags.`mlflow.parentRunId` = '{search.info.run_id}' and "
                                              "tags.`e2e.kind` = 'trial'")
    used: dict[str, list[int]] = {}
    for t in trials:
        used.setdefault(t.data.tags.get("e2e.family", "?"), []).append(int(t.data.metrics.get("epochs_run", 0)))
    rows, payload = family_rows(client, search)
    lines = [f"compare_families on {data.name} ({args.n} jets, {payload['test_events']:,} test jets), budget "
             f"{args.budget}: search {wall / 60:.1f} min, confirm {confirm_wall / 60:.1f} min "
             f"({args.seeds} seeds per family, each up to its best epoch)", "",
             f"Test AUC: mean over seeds [95% interval: bootstrap over test jets and seeds] ± std over seeds; "
             f"rejections: mean over seeds; P(> {BASELINE}): paired bootstrap on the same test jets.", "",
             f"| family | test AUC [95% interval] | ± std | rej @30% | rej @50% | rej @70% | Δ AUC vs {BASELINE} | "
             f"P(> {BASELINE}) | best val AUC (search) | parameters | FLOPs/jet | CPU jets/s (batch 64) | trials | "
             "trial-epochs |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fam, r in sorted(rows.items(), key=lambda kv: -(kv[1]["auc"] if kv[1]["auc"] is not None else -1)):
        lo, hi = r["interval"]
        lines.append(
            f"| {fam} | {_fmt(r['auc'])} [{_fmt(lo)}, {_fmt(hi)}] | {_fmt(r['std'])} | {_fmt(r['rej30'], '.1f')} | "
            f"{_fmt(r['rej50'], '.1f')} | {_fmt(r['rej70'], '.1f')} | "
            f"{'baseline' if fam == BASELINE else _fmt(r.get('d_base'), '+.4f')} | "
            f"{'–' if fam == BASELINE else _fmt(r.get('p_base'), '.2f')} | {_fmt(r['val_auc'])} | "
            f"{r['params'] or 0:,} | {_fmt(r.get('flops'), '.3g')} | {_fmt(r.get('throughput'), ',.0f')} | "
            f"{len(used.get(fam, []))} | {sum(used.get(fam, []))} |")
    text = "\n".join(lines)
    print(text)
    (ROOT / "e2e_runs/bench/compare_families.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
