"""``e2e-search report EXPERIMENT``: an HTML leaderboard of a search from its MLflow records.

One row per trial of the latest search (or ``--search RUN_ID``): family, status, the search metric
and the physics metrics at the trial's best epoch, parameters, FLOPs and CPU inference throughput
of the best checkpoint (batch 64), epochs used. Plots (PNG, embedded): best metric per family,
metric vs parameters, and for multi-objective searches the Pareto front over the first two
metrics. The file is written atomically and logged to the search's parent run as ``report.html``.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from .core.layout import BEST_CHECKPOINT_ARTIFACT
from .errors import UserError

PHYSICS = ["val_auc", "val_rej30", "val_rej50", "val_rej70", "val_acc", "val_mae", "val_bias", "val_resolution"]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cost(client: MlflowClient, run_id: str) -> dict[str, float]:
    """FLOPs per example and CPU examples/s (batch 64) of a trial's best checkpoint; {} when it has none."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .export import load_trained, random_inputs

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, BEST_CHECKPOINT_ARTIFACT, tmp)
            t = load_trained(Path(path), run_id)
    except Exception:
        return {}
    t.model.requires_grad_(False)  # FlopCounterMode's module hooks trip over parameters that want grads
    out: dict[str, float] = {}
    try:
        with torch.no_grad():
            one = [torch.from_numpy(a) for a in random_inputs(t, 1)]
            with FlopCounterMode(display=False) as fc:
                t.model(*one)
            out["flops"] = float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - an operator the counter does not know: leave the cell empty
        pass
    with torch.inference_mode():
        batch = [torch.from_numpy(a) for a in random_inputs(t, 64)]
        t.model(*batch)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.5 or n < 2:
            t.model(*batch)
            n += 1
        out["throughput"] = 64 * n / (time.perf_counter() - t0)
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def pareto_front(points: list[tuple[float, float]], modes: tuple[str, str]) -> list[int]:
    """Indices of the points no other point beats in both objectives."""
    sign = [1 if m == "max" else -1 for m in modes]
    s = [(a * sign[0], b * sign[1]) for a, b in points]
    return [i for i, p in enumerate(s)
            if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in s)]


def _plots(rows: list[dict], metric: str, metrics: list[str], modes: list[str]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if _finite(r.get(metric))]
    out = []
    if not done:
        return out
    fams = sorted({r["family"] for r in done})
    best = [max(r[metric] for r in done if r["family"] == f) if modes[0] == "max"
            else min(r[metric] for r in done if r["family"] == f) for f in fams]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(fams, best, color="C0")
    ax.set_ylabel(f"best {metric}"), ax.set_title("best trial per family")
    if modes[0] == "max":
        ax.set_ylim(min(best) - 0.05 * (abs(min(best)) + 1e-9), max(best) * 1.01 if max(best) > 0 else None)
    fig.tight_layout()
    out.append(("Best per family", _png(fig)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for f in fams:
        sel = [r for r in done if r["family"] == f and r.get("num_params")]
        ax.scatter([r["num_params"] for r in sel], [r[metric] for r in sel], label=f)
    ax.set_xscale("log"), ax.set_xlabel("parameters"), ax.set_ylabel(metric), ax.legend(fontsize=8)
    fig.tight_layout()
    out.append((f"{metric} vs parameters", _png(fig)))
    if len(metrics) >= 2:
        m2 = metrics[1]
        pts = [r for r in done if _finite(r.get(m2))]
        if pts:
            front = pareto_front([(r[metric], r[m2]) for r in pts], (modes[0], modes[1]))
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.scatter([r[metric] for r in pts], [r[m2] for r in pts], color="gray", label="trials")
            fr = sorted((pts[i] for i in front), key=lambda r: r[metric])
            ax.plot([r[metric] for r in fr], [r[m2] for r in fr], "o-", color="C3", label="Pareto front")
            ax.set_xlabel(metric), ax.set_ylabel(m2), ax.legend()
            if m2 in ("num_params", "latency_ms", "flops"):
                ax.set_yscale("log")
            ax.set_title(f"{len(front)} of {len(pts)} trials on the Pareto front")
            fig.tight_layout()
            out.append(("Pareto front", _png(fig)))
            for i in front:
                pts[i]["pareto"] = True
    return out


def build_report(uri: str, experiment: str, search_run: str | None = None, *, costs: bool = True) -> tuple[str, str]:
    """(HTML text, parent run id) for the latest search of ``experiment`` (or ``search_run``)."""
    from .tracking import experiment_of, search_run_of

    client = MlflowClient(tracking_uri=uri)
    exp = experiment_of(client, experiment)
    if search_run is None:
        searches = client.search_runs([exp.experiment_id], filter_string="tags.`e2e.kind` = 'search'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        if not searches:
            raise UserError(f"experiment '{experiment}' holds no e2e-search run; give the experiment of a search "
                            "(e2e-search run FILE records one)", key="EXPERIMENT")
        parent = searches[0]
    else:  # a trial's run (or another experiment's) would get an empty leaderboard uploaded into it
        parent = search_run_of(client, exp, search_run)
    metric, mode = parent.data.tags.get("e2e.metric", "val_loss"), parent.data.tags.get("e2e.mode", "min")
    try:
        import yaml

        with tempfile.TemporaryDirectory() as tmp:
            resolved = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "search_space.yaml",
                                                                     tmp)).read_text())
        metrics = resolved["search"]["metric"] if isinstance(resolved["search"]["metric"], list) else [metric]
        modes = resolved["search"]["mode"] if isinstance(resolved["search"]["mode"], list) else [mode]
    except Exception:
        metrics, modes = [metric], [mode]
    trials = client.search_runs([exp.experiment_id], max_results=5000,
                                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    rows: list[dict[str, Any]] = []
    for t in trials:
        m = t.data.metrics
        row = {"run": t.info.run_id, "trial": t.data.tags.get("e2e.trial_id", ""),
               "family": t.data.tags.get("e2e.family", "?"), "status": t.data.tags.get("e2e.status", "?"),
               "epochs": int(m.get("epochs_run", 0)), "num_params": int(m.get("num_params", 0)) or None,
               "error": t.data.tags.get("e2e.error", "")}
        for k in set(PHYSICS) | set(metrics) | {"latency_ms"}:
            if f"best_{k}" in m:
                row[k] = float(m[f"best_{k}"])
            elif k in metrics and k in m and k not in row:  # a per-trial constant as an objective
                row[k] = m[k]
        if costs and row["status"] == "FINISHED":
            row.update(_cost(client, t.info.run_id))
        rows.append(row)
    key = lambda r: r.get(metric, -math.inf if mode == "max" else math.inf)  # noqa: E731
    rows.sort(key=key, reverse=(mode == "max"))
    plots = _plots(rows, metric, metrics, modes)
    return _html(experiment, parent, rows, metric, mode, plots), parent.info.run_id


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _html(experiment: str, parent, rows: list[dict], metric: str, mode: str, plots) -> str:
    cols = ["family", "trial", "status", metric] + [k for k in PHYSICS if k != metric and any(k in r for r in rows)]
    cols += [c for c in ["num_params", "latency_ms", "flops", "throughput", "epochs"] if c not in cols]
    heads = {"num_params": "parameters", "flops": "FLOPs/example", "throughput": "CPU examples/s (batch 64)",
             "latency_ms": "latency ms (batch 1, trial's device)", "epochs": "epochs used"}
    body = []
    for i, r in enumerate(rows, 1):
        style = ' style="background:#fde"' if r["status"] != "FINISHED" else (' style="background:#efe"' if i == 1 else "")
        star = " ★" if r.get("pareto") else ""
        cells = "".join(f"<td>{_fmt(r.get(c))}{star if c == metric else ''}</td>" for c in cols)
        body.append(f"<tr{style} title=\"{html.escape(r['error'])}\"><td>{i}</td>{cells}<td><code>{r['run']}</code></td></tr>")
    figs = "".join(f"<figure><img src=\"data:image/png;base64,{b}\"><figcaption>{html.escape(t)}</figcaption></figure>"
                   for t, b in plots)
    params = ", ".join(f"{k}={v}" for k, v in sorted(parent.data.params.items()))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>e2e-search report: {html.escape(experiment)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;
font-size:13px}}th{{background:#eee}}figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>e2e-search report: {html.escape(experiment)}</h1>
<p>search run <code>{parent.info.run_id}</code> ({html.escape(parent.data.tags.get('mlflow.runName', ''))}), status {parent.info.status};
ranked by <b>{html.escape(metric)}</b> ({mode}) at each trial's best epoch. {html.escape(params)}</p>
<table><tr><th>rank</th>{''.join(f'<th>{html.escape(heads.get(c, c))}</th>' for c in cols)}<th>MLflow run</th></tr>
{''.join(body)}</table>
<p>★ on the Pareto front. Red rows: trials that failed (hover for the error).</p>
{figs}
<p><small>generated {time.strftime('%Y-%m-%d %H:%M:%S')} by e2e-search report</small></p>
</body></html>
"""


def write_report(uri: str, experiment: str, out: Path, search_run: str | None = None) -> Path:
    text, parent = build_report(uri, experiment, search_run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    with tempfile.TemporaryDirectory() as d:  # on the parent run always as report.html
        (Path(d) / "report.html").write_text(text)
        MlflowClient(tracking_uri=uri).log_artifact(parent, str(Path(d) / "report.html"))
    return out
