"""The MLflow record of ``e2e-search confirm`` (e2e_search/confirm/run.py), and the champions it moves.

Every run is a child of the search run, tagged ``e2e.phase = confirm`` and ``e2e.confirm_id`` (one id per
``confirm``; the search run's tag ``e2e.confirm_id`` names the latest):

- one **seed run** per finalist and seed (``e2e.kind = confirm_seed``): the trial's parameters with ``seed`` and
  ``epochs``; every metric of the scored epoch (``val_*`` and every physics metric on the test split:
  ``test_auc``, ``test_rej30/50/70``, ``test_acc``, ``test_mae``, ``test_bias``, ``test_resolution``, per bin
  ``test_bin/<lo>-<hi>/...``); the 95% bootstrap interval of the champion metric(s) over the test events,
  ``test_auc_lo`` / ``test_auc_hi``; the model as ``best_checkpoint/`` (with ``test_predictions.npz``) and the
  test plots under ``plots/test/``;
- one **finalist run** per finalist (``e2e.kind = confirm_finalist``): ``test_<m>_mean`` and ``test_<m>_std``
  over the seeds (sample standard deviation) of every test metric, and the 95% interval of the champion
  metric(s), ``test_auc_lo`` / ``test_auc_hi``, from a bootstrap that resamples both the test events and the
  seeds (e2e_search/analysis/bootstrap.py: it holds the test sample's and the training seed's variance); the source
  trial's ``best_<m>`` (selection-biased validation figures, for comparison) and ``num_params``; tags
  ``e2e.source_run_id``, ``e2e.seed_runs``, and ``e2e.champion`` / ``e2e.champion_reason`` on the champion;
- on the **search run**: ``confirm/<confirm id>.json`` (finalists, intervals, the pairwise matrix
  P(row beats column), the champion and why; ``report`` draws from it) and tags ``e2e.confirm_id``,
  ``e2e.confirm.champion.<model>`` (the seed run registered) and ``e2e.confirm.reason.<model>``.

The alias ``champion`` of ``<experiment>-classifier`` (and ``-regressor``) moves to a new version from the chosen
finalist's first seed run (its model was trained without looking at the test split; its figures are the
finalist's), tagged with the test mean, the interval and the reason.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from e2e_search.analysis.bootstrap import LEVEL, REPLICATES, interval, resampled, seed_mean, view, win_matrix
from e2e_search.confirm.plan import Candidate, ConfirmFailed, ConfirmOutcome, ConfirmPlan, SeedResult, choose_champion
from trainables.core.layout import BEST_ARTIFACT, TEST_PREDICTIONS_FILE
from trainables.core.scoring import load_scored
from trainables.names import RUN_NAME_MAX, mlflow_key, param_value, tag_value, unique_keys
from trainables.params import public_params

INTERVAL = (f"{LEVEL:.0%} percentile bootstrap, {REPLICATES} replicates: the test events resampled (the same "
            "events for every finalist) and, for a finalist, its seeds too")
_SKIP = {"epoch", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "time_since_restore",
         "iterations_since_restore", "pid", "done", "checkpoint_score"}


@contextlib.contextmanager
def _folder(path: str | None) -> Iterator[Path | None]:
    """A checkpoint folder (local path or a URI Ray can read) as a local folder while the block runs."""
    if not path:
        yield None
        return
    if "://" not in path:
        yield Path(path)
        return
    from ray.train import Checkpoint

    with Checkpoint(path).as_directory() as d:
        yield Path(d)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k not in _SKIP and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(float(v))}


def _read_predictions(results: list[SeedResult]) -> dict[tuple[int, int], dict]:
    """(finalist, seed) -> its test predictions; a finished seed whose file cannot be read becomes FAILED."""
    out = {}
    for r in results:
        if r.status != "FINISHED":
            continue
        try:
            with _folder(r.checkpoint) as d:
                if d is None:
                    raise FileNotFoundError("no checkpoint was reported")
                out[(r.finalist, r.seed)] = load_scored(d / TEST_PREDICTIONS_FILE)
        except Exception as e:  # noqa: BLE001 - recorded on the seed's run
            r.status, r.error = "FAILED", f"test predictions unreadable: {type(e).__name__}: {e}"[:2000]
    if out:
        ref = np.sort(next(iter(out.values()))["index"])
        for key, p in out.items():
            if not np.array_equal(np.sort(p["index"]), ref):
                raise RuntimeError(f"finalist {key[0]} seed {key[1]} was scored on other test events than the rest")
    return out


def _bootstrap(cp: ConfirmPlan, preds: dict[tuple[int, int], dict]) -> dict[str, dict]:
    """metric -> {"seed": {(f, s): (lo, hi)}, "samples": {f: (replicates,)}, "interval": {f: (lo, hi)}}."""
    out: dict[str, dict] = {}
    for metric in dict.fromkeys(r.test_metric for r in cp.rankings):
        fins = [f for f in range(len(cp.finalists)) if any((f, s) in preds for s in cp.seeds)]
        keys = [[(f, s) for s in cp.seeds if (f, s) in preds] for f in fins]
        stats = resampled([[view(preds[k], metric) for k in ks] for ks in keys], metric)
        entry: dict[str, dict] = {"seed": {}, "samples": {}, "interval": {}}
        for f, ks, st in zip(fins, keys, stats):
            for k, s in zip(ks, st):
                entry["seed"][k] = interval(s)
            entry["samples"][f] = seed_mean(st, seed=1 + f)
            entry["interval"][f] = interval(entry["samples"][f])
        out[metric] = entry
    return out


def _aggregate(results: list[SeedResult], f: int) -> dict[str, dict[str, Any]]:
    """test metric -> {"mean", "std", "values": {seed: value}} over the finished seeds of finalist ``f``."""
    done = [r for r in results if r.finalist == f and r.status == "FINISHED"]
    names = sorted({k for r in done for k in _numeric(r.metrics) if k.startswith("test_")})
    out = {}
    for k in names:
        vals = {r.seed: float(r.metrics[k]) for r in done if k in _numeric(r.metrics)}
        arr = np.array(list(vals.values()))
        out[k] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "values": vals}
    return out


def _start(client: MlflowClient, exp_id: str, name: str, tags: dict[str, str]) -> str:
    tags = {MLFLOW_RUN_NAME: name[:RUN_NAME_MAX], **{mlflow_key(k): tag_value(v) for k, v in tags.items()}}
    return client.create_run(exp_id, run_name=name[:RUN_NAME_MAX], tags=tags).info.run_id


def _log(client: MlflowClient, rid: str, *, params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    ps = [Param(k, param_value(v)) for k, v in unique_keys(dict(sorted(params.items()))).items()]
    named = cast("dict[str, float]", unique_keys(cast("dict[str, object]", metrics)))  # (keys renamed only)
    ms = [Metric(k, float(v), now, step) for k, v in named.items()]
    for i in range(0, len(ps), 100):  # MLflow takes at most 100 params and 1000 metrics per batch
        client.log_batch(rid, params=ps[i:i + 100])
    for i in range(0, len(ms), 1000):
        client.log_batch(rid, metrics=ms[i:i + 1000])


def _seed_run(client: MlflowClient, exp_id: str, cp: ConfirmPlan, r: SeedResult, confirm_id: str,
              boot: dict[str, dict]) -> str:
    from e2e_search.record.figures import prediction_plots

    f = cp.finalists[r.finalist]
    tags = {MLFLOW_PARENT_RUN_ID: cp.search_id, "e2e.kind": "confirm_seed", "e2e.phase": "confirm",
            "e2e.confirm_id": confirm_id, "e2e.search": cp.search_name, "e2e.finalist": str(f.position),
            "e2e.source_run_id": f.run_id, "e2e.source_trial_id": f.trial_id, "e2e.family": f.family,
            "e2e.seed": str(r.seed), "e2e.status": r.status}
    if r.error:
        tags["e2e.error"] = r.error
    rid = _start(client, exp_id, f"{cp.search_name}-confirm-{f.position}-s{r.seed}", tags)
    status = "FAILED"
    try:
        metrics = _numeric(r.metrics)
        for m, entry in boot.items():
            lo, hi = entry["seed"].get((r.finalist, r.seed), (math.nan, math.nan))
            if math.isfinite(lo):
                metrics[f"{m}_lo"], metrics[f"{m}_hi"] = lo, hi
        _log(client, rid, params={**public_params(f.params), "seed": r.seed, "epochs": f.epochs}, metrics=metrics,
             step=int(r.metrics.get("epoch", f.epochs)))
        with _folder(r.checkpoint) as d:
            if d is not None and d.is_dir():
                client.log_artifacts(rid, str(d), artifact_path=BEST_ARTIFACT)
                if (d / TEST_PREDICTIONS_FILE).is_file():
                    with tempfile.TemporaryDirectory() as tmp:
                        prediction_plots(d / TEST_PREDICTIONS_FILE, Path(tmp))
                        client.log_artifacts(rid, tmp, artifact_path="plots/test")
        status = r.status
    finally:
        client.set_terminated(rid, status=status)
    return rid


def _finalist_run(client: MlflowClient, exp_id: str, cp: ConfirmPlan, f: int, confirm_id: str,
                  agg: dict[str, dict], boot: dict[str, dict], seed_runs: dict[int, str], finished: int) -> str:
    fin = cp.finalists[f]
    tags = {MLFLOW_PARENT_RUN_ID: cp.search_id, "e2e.kind": "confirm_finalist", "e2e.phase": "confirm",
            "e2e.confirm_id": confirm_id, "e2e.search": cp.search_name, "e2e.finalist": str(fin.position),
            "e2e.source_run_id": fin.run_id, "e2e.source_trial_id": fin.trial_id, "e2e.family": fin.family,
            "e2e.seeds": ",".join(map(str, cp.seeds)), "e2e.seed_runs": ",".join(seed_runs.values()),
            "e2e.interval": INTERVAL, "e2e.status": "FINISHED" if finished else "FAILED"}
    rid = _start(client, exp_id, f"{cp.search_name}-confirm-{fin.position}", tags)
    metrics: dict[str, float] = {"seeds_finished": float(finished)}
    for m, a in agg.items():
        metrics[f"{m}_mean"], metrics[f"{m}_std"] = a["mean"], a["std"]
    for m, entry in boot.items():
        lo, hi = entry["interval"].get(f, (math.nan, math.nan))
        if math.isfinite(lo):
            metrics[f"{m}_lo"], metrics[f"{m}_hi"] = lo, hi
    metrics.update({f"best_{k}": v for k, v in fin.val.items() if isinstance(v, float) and math.isfinite(v)})
    if fin.num_params:
        metrics["num_params"] = float(fin.num_params)
    try:
        _log(client, rid, params={**public_params(fin.params), "epochs": fin.epochs,
                                  "seeds": ",".join(map(str, cp.seeds))}, metrics=metrics, step=fin.epochs)
    finally:
        client.set_terminated(rid, status="FINISHED" if finished else "FAILED")
    return rid


def _finalist_runs(client: MlflowClient, exp_id: str, cp: ConfirmPlan, results: list[SeedResult], confirm_id: str,
                   boot: dict[str, dict], seed_runs: dict[int, dict[int, str]]) -> tuple[dict, dict]:
    """(finalist -> its test metrics over the seeds, finalist -> its finalist run), one run per finalist."""
    aggs: dict[int, dict] = {}
    fin_runs: dict[int, str] = {}
    for f in range(len(cp.finalists)):
        aggs[f] = _aggregate(results, f)
        done = sum(1 for r in results if r.finalist == f and r.status == "FINISHED")
        fin_runs[f] = _finalist_run(client, exp_id, cp, f, confirm_id, aggs[f], boot, seed_runs.get(f, {}), done)
    return aggs, fin_runs


def _candidates(cp: ConfirmPlan, rk, entry: dict, aggs: dict) -> list[Candidate]:
    """The finalists of ranking ``rk`` with their test mean and interval."""
    cands = []
    for f in rk.members:
        a = aggs[f].get(rk.test_metric)
        lo, hi = entry["interval"].get(f, (math.nan, math.nan))
        cands.append(Candidate(cp.finalists[f].label, a["mean"] if a else math.nan, lo, hi,
                               cp.finalists[f].num_params))
    return cands


def _move_champion(client: MlflowClient, cp: ConfirmPlan, rk, f: int, c: Candidate, reason: str, confirm_id: str,
                   preds: dict, seed_runs: dict[int, dict[int, str]], fin_runs: dict[int, str]) -> tuple[str, Any]:
    """Register finalist ``f``'s first seed run as ``rk.model``'s champion and tag the runs -> (seed run, version)."""
    from e2e_search.record.store import set_champion

    fin = cp.finalists[f]
    seed = min(s for s in cp.seeds if (f, s) in preds)
    source = seed_runs[f][seed]
    version = set_champion(client, rk.model, client.get_run(source), {
        "e2e.search": cp.search_name, "e2e.family": fin.family, "e2e.metric": rk.test_metric,
        "e2e.value": f"{c.mean:.6g}", "e2e.lo": f"{c.lo:.6g}", "e2e.hi": f"{c.hi:.6g}",
        "e2e.phase": "confirm", "e2e.confirm_id": confirm_id, "e2e.finalist_run": fin_runs[f],
        "e2e.source_run": fin.run_id, "e2e.seed": str(seed), "e2e.champion_reason": reason},
        description=f"best {rk.kind} of e2e-search experiment '{cp.experiment}'")
    client.set_tag(fin_runs[f], mlflow_key(f"e2e.champion.{rk.kind}"), reason)
    client.set_tag(cp.search_id, mlflow_key(f"e2e.confirm.champion.{rk.model}"), source)
    client.set_tag(cp.search_id, mlflow_key(f"e2e.confirm.reason.{rk.model}"), reason)
    return source, version


def _finalists_payload(cp: ConfirmPlan, aggs: dict, boot: dict[str, dict], seed_runs: dict[int, dict[int, str]],
                       fin_runs: dict[int, str]) -> list[dict[str, Any]]:
    """The finalists' part of confirm/<confirm id>.json."""
    return [{
        "position": fin.position, "label": fin.label, "family": fin.family, "source_run": fin.run_id,
        "trial_id": fin.trial_id, "epochs": fin.epochs, "num_params": fin.num_params, "run": fin_runs[f],
        "seed_runs": {str(s): rid for s, rid in seed_runs.get(f, {}).items()}, "val": fin.val,
        "test": {m: {"mean": a["mean"], "std": a["std"], "values": {str(s): v for s, v in a["values"].items()}}
                 for m, a in aggs[f].items()},
        "intervals": {m: list(e["interval"][f]) for m, e in boot.items() if f in e["interval"]},
        "seed_intervals": {m: {str(s): list(iv) for (ff, s), iv in e["seed"].items() if ff == f}
                           for m, e in boot.items()}}
        for f, fin in enumerate(cp.finalists)]


def record(cp: ConfirmPlan, results: list[SeedResult], *, confirm_id: str) -> ConfirmOutcome:
    """Bootstrap, record and choose (see the module's text). Raises ConfirmFailed when no seed finished."""
    client = MlflowClient(tracking_uri=cp.uri)
    exp_id = client.get_run(cp.search_id).info.experiment_id
    preds = _read_predictions(results)
    boot = _bootstrap(cp, preds) if preds else {}
    seed_runs: dict[int, dict[int, str]] = {}
    for r in results:
        seed_runs.setdefault(r.finalist, {})[r.seed] = _seed_run(client, exp_id, cp, r, confirm_id, boot)
    client.set_tag(cp.search_id, "e2e.confirm_id", confirm_id)
    failed = sum(r.status != "FINISHED" for r in results)
    if not preds:
        raise ConfirmFailed(f"none of the {len(results)} retrainings finished (see tag e2e.error of the runs of "
                            f"confirm {confirm_id}): no champion moved")
    aggs, fin_runs = _finalist_runs(client, exp_id, cp, results, confirm_id, boot, seed_runs)

    rankings, champions, lines = [], {}, []
    for rk in cp.rankings:
        entry = boot[rk.test_metric]
        cands = _candidates(cp, rk, entry, aggs)
        pick, reason = choose_champion(cands, rk.mode, rk.test_metric)
        scored = [f for f in rk.members if f in entry["samples"]]
        matrix = win_matrix([entry["samples"][f] for f in scored], rk.mode)
        info: dict[str, Any] = {"kind": rk.kind, "model": rk.model, "val_metric": rk.val_metric,
                                "test_metric": rk.test_metric, "mode": rk.mode, "finalists": rk.members,
                                "matrix_finalists": scored, "matrix": matrix, "champion": None, "reason": reason}
        if pick is not None:
            f = rk.members[pick]
            source, version = _move_champion(client, cp, rk, f, cands[pick], reason, confirm_id, preds, seed_runs,
                                             fin_runs)
            champions[rk.model] = source
            info.update(champion=f, version=version, seed_run=source)
        rankings.append(info)
        lines += _table(cp, rk, cands, entry, aggs, matrix, scored, info)
    payload = {
        "confirm_id": confirm_id, "search_run": cp.search_id, "seeds": cp.seeds, "replicates": REPLICATES,
        "level": LEVEL, "interval": INTERVAL, "test_events": len(cp.plan.data.test), "rankings": rankings,
        "finalists": _finalists_payload(cp, aggs, boot, seed_runs, fin_runs)}
    client.log_dict(cp.search_id, _plain(payload), f"confirm/{confirm_id}.json")
    head = (f"confirm {confirm_id}: {len(results) - failed} of {len(results)} retrainings finished, "
            f"{len(cp.plan.data.test)} test events; intervals: {INTERVAL}")
    return ConfirmOutcome(confirm_id, "\n".join([head, *lines]), champions, failed, len(results) - failed)


def _plain(x: Any) -> Any:
    """JSON-safe: NaN/Inf -> None, numpy scalars -> floats, tuple keys never reach here."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _table(cp: ConfirmPlan, rk, cands, entry, aggs, matrix, scored, info) -> list[str]:
    m = rk.test_metric
    lines = ["", f"{rk.kind}: {m} ({rk.mode}) on the test split, mean ± std over seeds [95% interval]",
             f"  {'finalist':<18} {rk.val_metric:>10} {m + ' mean ± std':>22} {'[95% interval]':>20} {'parameters':>12}"]
    for f, c in zip(rk.members, cands):
        a = aggs[f].get(m)
        star = "  <- champion" if info.get("champion") == f else ""
        val = cp.finalists[f].val.get(rk.val_metric, math.nan)
        ms = f"{a['mean']:.4f} ± {a['std']:.4f}" if a else "–"
        iv = f"[{c.lo:.4f}, {c.hi:.4f}]" if math.isfinite(c.lo) else "–"
        lines.append(f"  {c.label:<18} {val:>10.4f} {ms:>22} {iv:>20} {c.num_params or 0:>12,}{star}")
    if len(scored) > 1:
        labels = [cp.finalists[f].label.split()[0] for f in scored]
        lines.append(f"  P(row beats column) on {m}, paired bootstrap over the same test events:")
        lines.append("  " + " " * 8 + "".join(f"{lb:>8}" for lb in labels))
        for lb, row in zip(labels, matrix):
            lines.append(f"  {lb:<8}" + "".join(f"{'–' if v is None else f'{v:.2f}':>8}" for v in row))
    if info.get("champion") is not None:
        lines.append(f"registered model '{rk.model}' version {info['version']} (alias champion) from run "
                     f"{info['seed_run']}: {info['reason']}")
    else:
        lines.append(f"{rk.model}: champion not moved ({info['reason']})")
    return lines
