"""Model families at an equal budget, scored on the test split: ``search_spaces/compare_families.yaml`` on a
generated data set, then ``confirm`` of each family's best trial, and the family table against ``resnet15``.

    .venv/bin/python bench/compare_families.py [--data top_vs_qcd|quark_vs_gluon|boosted_scalar] [--n 8000]
        [--families resnet15,vit,hit_transformer] [--lrs 1e-3,3e-3] [--epochs 8] [--seeds 2] [--scaling 2000,4000]

Every family gets the same search: the family and the learning rate are both grid dimensions, so each family
trains one trial per learning rate in ``--lrs``, each for exactly ``--epochs`` epochs (no early stopping:
``scheduler.type: none``), on the same data, 2 trials at a time with one core each. Then
``e2e-search confirm --per-family --top 1 --seeds N`` retrains each family's best trial with N seeds up to its
best epoch and scores it once on the held-out test split (paired bootstrap against resnet15).

The data file (``e2e_runs/data/<data>_<n/1000>k.h5``, Pythia seed 7) is generated first when missing. Every
family reads the sparse cache (``data.cache: sparse``): dense batches built on the device for the image families,
hit lists for ``hit_transformer``. ``--scaling 2000,4000`` adds the same search and confirm at those training-set
sizes (``data.limit``, a random subset of the file) and prints test AUC (or MAE) against size.

Prints and writes (``e2e_runs/bench/compare_families_<data>.md``) one row per family: classification: test AUC
(mean over seeds [95% bootstrap interval over test jets and seeds] ± std), background rejection at 30/50/70% signal
efficiency, Δ and P(> resnet15); regression (``boosted_scalar``, target ``m_true`` in GeV, Huber loss): test MAE,
resolution and bias of (pred - true)/true overall and per bin of the true mass, P(MAE < resnet15's); then
parameters, FLOPs per jet, CPU training jets/s (median over the search's epochs, 1 core per trial, 2 trials at a
time), CPU inference jets/s (batch 64) and ONNX Runtime latency per jet at batch 1 (2 threads) of the seed-1 model,
trials and trial-epochs of the search, wall times.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "resnet15"
REGRESSION = ["task.type=regression", "task.target=m_true", "task.num_classes=null", "params.loss=huber",
              "search.metric=val_mae"]


def _fmt(v, spec: str = ".4f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _onnx_latency_ms(run_id: str, uri: str) -> float | None:
    """ONNX Runtime CPU latency per jet at batch 1 (median, ms) of a trial's best checkpoint; None if it fails."""
    from e2e_search.export.onnx import export

    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = export(run_id, str(Path(tmp) / "m.onnx"), tracking_uri=uri, runs=50)
        except Exception as e:  # noqa: BLE001 - a family that does not export: leave the cell empty, say why
            print(f"export of {run_id} failed: {e}", flush=True)
            return None
    return r.timing["onnxruntime"]["latency_ms"] if r.timing else None


def family_rows(client: MlflowClient, search, uri: str, regression: bool) -> tuple[dict[str, dict], dict]:
    """family -> its confirmed finalist's figures (from the search's confirm/<id>.json), and that payload."""
    from e2e_search.analysis.report import _cost

    cid = search.data.tags["e2e.confirm_id"]
    with tempfile.TemporaryDirectory() as tmp:
        payload = json.loads(Path(client.download_artifacts(search.info.run_id, f"confirm/{cid}.json", tmp)).read_text())
    rk = payload["rankings"][0]
    fins = payload["finalists"]
    order = rk["matrix_finalists"]
    base = next((f for f in order if fins[f]["family"] == BASELINE), None)
    main = "test_mae" if regression else "test_auc"
    rows = {}
    for f in rk["finalists"]:
        fin = fins[f]
        t = fin["test"]
        row = {"main": t.get(main, {}).get("mean"), "std": t.get(main, {}).get("std"),
               "interval": fin["intervals"].get(main, [None, None]),
               "val": fin["val"].get("val_mae" if regression else "val_auc"), "params": fin["num_params"],
               "seeds": len(t.get(main, {}).get("values", {})),
               "extra": {k: v.get("mean") for k, v in t.items() if isinstance(v, dict)}}
        if base is not None and f in order and f != base and row["main"] is not None:
            row["p_base"] = rk["matrix"][order.index(f)][order.index(base)]
            row["d_base"] = row["main"] - fins[base]["test"][main]["mean"]
        seed1 = fin["seed_runs"].get("1") or next(iter(fin["seed_runs"].values()), None)
        if seed1:
            row.update(_cost(client, seed1))
            row["onnx_ms"] = _onnx_latency_ms(seed1, uri)
        rows[fin["family"]] = row
    return rows, payload


def run_size(args, data: Path, limit: int | None, uri: str, exe: list[str]) -> dict:
    """One equal-budget search and its confirm at one training-set size; returns the table's rows and timing."""
    regression = args.data == "boosted_scalar"
    fams = args.families.split(",")
    lrs = [float(v) for v in args.lrs.split(",")]
    name = f"{args.name}_{args.data}" + (f"_{limit}" if limit else "") + (f"_{args.tag}" if args.tag else "")
    sets = [f"name={name}", f"data.path={data}", f"data.generate.n={args.n}", "data.generate.seed=7",
            f"data.generate.recipe={args.data}", f"tracking.uri={uri}", f"family.values={json.dumps(fams)}",
            f"params.lr={{type: grid, values: {json.dumps(lrs)}}}", f"search.num_samples={len(fams) * len(lrs)}",
            f"scheduler.max_epochs={args.epochs}", *(REGRESSION if regression else [])]
    if limit:
        sets.append(f"data.limit={limit}")
    sets += args.set
    cmd = [*exe, "run", str(ROOT / "search_spaces/compare_families.yaml")] + sum((["--set", s] for s in sets), [])
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    if subprocess.call(cmd, cwd=ROOT) != 0:
        raise SystemExit(f"search {name} failed")
    wall = time.time() - t0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    search = client.search_runs([exp.experiment_id], filter_string="tags.`e2e.kind` = 'search'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    cmd = [*exe, "confirm", name, "--search", search.info.run_id, "--per-family", "--top", "1",
           "--seeds", str(args.seeds), "--tracking-uri", uri]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    if subprocess.call(cmd, cwd=ROOT) != 0:
        raise SystemExit(f"confirm of {name} failed")
    confirm_wall = time.time() - t0
    search = client.get_run(search.info.run_id)
    trials = client.search_runs([exp.experiment_id], max_results=1000,
                                filter_string=f"tags.`mlflow.parentRunId` = '{search.info.run_id}' and "
                                              "tags.`e2e.kind` = 'trial'")
    used: dict[str, list[int]] = {}
    speed: dict[str, list[float]] = {}
    for t in trials:
        fam = t.data.tags.get("e2e.family", "?")
        used.setdefault(fam, []).append(int(t.data.metrics.get("epochs_run", 0)))
        speed.setdefault(fam, []).extend(m.value for m in client.get_metric_history(t.info.run_id,
                                                                                   "train_samples_per_s"))
    rows, payload = family_rows(client, search, uri, regression)
    for fam, r in rows.items():
        r["train_speed"] = statistics.median(speed[fam]) if speed.get(fam) else None
        r["trials"], r["trial_epochs"] = len(used.get(fam, [])), sum(used.get(fam, []))
    return {"rows": rows, "wall": wall, "confirm_wall": confirm_wall, "test_events": payload["test_events"],
            "limit": limit}


def table(args, res: dict) -> list[str]:
    regression = args.data == "boosted_scalar"
    rows = res["rows"]
    if regression:
        head = (f"| family | test MAE (GeV) [95% interval] | ± std | resolution | bias | Δ MAE vs {BASELINE} | "
                f"P(MAE < {BASELINE}'s) | resolution per true-mass bin | bias per bin |")
    else:
        head = (f"| family | test AUC [95% interval] | ± std | rej @30% | rej @50% | rej @70% | Δ AUC vs {BASELINE} | "
                f"P(> {BASELINE}) |")
    head += (" best val (search) | parameters | FLOPs/jet | CPU train jets/s | CPU jets/s (batch 64) | "
             "ONNX ms/jet (batch 1) | trials | trial-epochs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    key = (lambda kv: kv[1]["main"] if kv[1]["main"] is not None else 1e9) if regression else \
        (lambda kv: -(kv[1]["main"] if kv[1]["main"] is not None else -1))
    for fam, r in sorted(rows.items(), key=key):
        lo, hi = r["interval"]
        ex = r["extra"]
        cells = [fam, f"{_fmt(r['main'])} [{_fmt(lo)}, {_fmt(hi)}]", _fmt(r["std"])]
        if regression:
            bins = sorted((k for k in ex if k.startswith("test_bin/") and k.endswith("/resolution")),
                          key=lambda k: float(k.split("/")[1].split("-")[0]))  # by the bin's lower edge (GeV)
            cells += [_fmt(ex.get("test_resolution"), ".3f"), _fmt(ex.get("test_bias"), "+.3f")]
        else:
            cells += [_fmt(ex.get(f"test_rej{e}"), ".1f") for e in (30, 50, 70)]
        cells += ["baseline" if fam == BASELINE else _fmt(r.get("d_base"), "+.4f"),
                  "–" if fam == BASELINE else _fmt(r.get("p_base"), ".2f")]
        if regression:
            cells += [" ".join(f"{b.split('/')[1]}: {_fmt(ex[b], '.3f')}" for b in bins),
                      " ".join(f"{_fmt(ex[b.replace('/resolution', '/bias')], '+.3f')}" for b in bins)]
        cells += [_fmt(r["val"]), f"{r['params'] or 0:,}", _fmt(r.get("flops"), ".3g"),
                  _fmt(r.get("train_speed"), ",.0f"), _fmt(r.get("throughput"), ",.0f"), _fmt(r.get("onnx_ms"), ".2f"),
                  str(r["trials"]), str(r["trial_epochs"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=["top_vs_qcd", "quark_vs_gluon", "boosted_scalar"], default="top_vs_qcd")
    ap.add_argument("--n", type=int, default=8000, help="jets in the generated file (default 8000)")
    ap.add_argument("--families", default="resnet15,vit,hit_transformer")
    ap.add_argument("--lrs", default="1e-3,3e-3", help="learning rates: each family trains one trial per value")
    ap.add_argument("--epochs", type=int, default=8, help="epochs of every trial (default 8)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per family in confirm (default 2)")
    ap.add_argument("--scaling", default="", help="also at these training-set sizes (data.limit), e.g. 2000,4000")
    ap.add_argument("--skip-full", action="store_true", help="only the --scaling sizes, not the whole file")
    ap.add_argument("--name", default="bench_families")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to the search as --set (e.g. params.max_hits=64); give --tag too")
    ap.add_argument("--tag", default="", help="suffix of the experiment and output names (a variant)")
    args = ap.parse_args()
    data = ROOT / f"e2e_runs/data/{args.data}_{args.n // 1000}k.h5"
    uri = f"sqlite:///{ROOT / 'e2e_runs/bench/mlflow.db'}"
    (ROOT / "e2e_runs/bench").mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "e2e_search.cli"]  # the CLI of this interpreter (.venv/bin/python)
    results = [] if args.skip_full else [run_size(args, data, None, uri, exe)]
    for size in [int(v) for v in args.scaling.split(",") if v]:
        results.append(run_size(args, data, size, uri, exe))
    main_res = results[0]
    metric = "test MAE (GeV)" if args.data == "boosted_scalar" else "test AUC"
    lines = [f"compare_families on {data.name} ({args.n} jets, {main_res['test_events']:,} test jets): families "
             f"{args.families}, each {len(args.lrs.split(','))} trials (lr {args.lrs}) x {args.epochs} epochs; search "
             f"{main_res['wall'] / 60:.1f} min, confirm {main_res['confirm_wall'] / 60:.1f} min ({args.seeds} seeds per "
             "family, each up to its best epoch)", "", *table(args, main_res)]
    if len(results) > 1:
        fams = sorted(main_res["rows"])
        lines += ["", f"Scaling: {metric} (mean over seeds [95% interval]) against the number of jets in the file "
                      "(70% train, 15% validation, 15% test)", "",
                  "| jets | test jets | " + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
        for res in sorted(results, key=lambda r: r["limit"] or args.n):
            cells = []
            for f in fams:
                r = res["rows"].get(f)
                cells.append("–" if r is None else f"{_fmt(r['main'])} [{_fmt(r['interval'][0])}, "
                                                   f"{_fmt(r['interval'][1])}]")
            lines.append(f"| {res['limit'] or args.n} | {res['test_events']:,} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    stem = f"compare_families_{args.data}" + (f"_{args.tag}" if args.tag else "")
    (ROOT / f"e2e_runs/bench/{stem}.md").write_text(text + "\n")
    (ROOT / f"e2e_runs/bench/{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
