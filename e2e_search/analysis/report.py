"""``e2e-search report EXPERIMENT``: an HTML leaderboard of a search from its MLflow records.

One row per trial of the latest search (or ``--search RUN_ID``): family, status, the search metric
and the physics metrics at the trial's best epoch, parameters, FLOPs and CPU inference throughput
of the best checkpoint (batch 64), epochs used. Plots (PNG, embedded): best metric per family,
metric vs parameters, for multi-objective searches the Pareto front over the first two
metrics, and the attention maps of the best trial of each family that saved them (for hit_transformer: which hits
the class token reads). After ``e2e-search confirm``, a section on the test split (the latest confirm of the search): per
finalist the test metrics' mean ± std over seeds and the 95% bootstrap interval, the matrix P(row beats
column) of the paired bootstrap, and the test metric per finalist and per seed with error bars
(e2e_search/confirm/record.py writes what it shows). Then what each technique buys (e2e_search/analysis/effects.py):
the search metric (and the confirmed test metric with its interval) per value of each searched parameter,
Optuna's parameter importances, and for event_transformer searches the task queries' attention maps with
and without pretraining, side by side. The file is written atomically and logged to the search's parent
run as ``report.html``.
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
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from trainables.core.layout import BEST_CHECKPOINT_ARTIFACT
from trainables.errors import UserError

if TYPE_CHECKING:
    from mlflow.entities import Run

PHYSICS = ["val_auc", "val_rej30", "val_rej50", "val_rej70", "val_acc", "val_mae", "val_bias", "val_resolution"]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cost(client: MlflowClient, run_id: str) -> dict[str, float]:
    """FLOPs per example and CPU examples/s (batch 64) of a trial's best checkpoint; {} when it has none."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from e2e_search.record.checkpoints import load_trained, random_inputs

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, BEST_CHECKPOINT_ARTIFACT, tmp)
            t = load_trained(Path(path), run_id)
    except Exception:  # noqa: BLE001 - no best checkpoint, or one that does not load: no cost columns
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
    out: list[tuple[str, str]] = []
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
    ax.set_xscale("log")
    ax.set_xlabel("parameters"), ax.set_ylabel(metric), ax.legend(fontsize=8)
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


def _attention_maps(client: MlflowClient, rows: list[dict]) -> list[tuple[str, str]]:
    """(title, base64 PNG) of the attention maps (``plots/attention_rollout.png``) of the best finished trial of each
    family that saved one, best family first (``rows`` sorted best first)."""
    import base64 as b64

    out, seen = [], set()
    for r in rows:
        if r["status"] != "FINISHED" or r["family"] in seen:
            continue
        try:
            names = {a.path for a in client.list_artifacts(r["run"], "plots")}
            if "plots/attention_rollout.png" not in names:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                data = Path(client.download_artifacts(r["run"], "plots/attention_rollout.png", tmp)).read_bytes()
        except Exception:  # noqa: BLE001 - an unreadable artifact leaves the map out, not the report
            continue
        seen.add(r["family"])
        what = "the class token's attention over the hits" if r["family"] == "hit_transformer" else "attention rollout"
        out.append((f"{r['family']}: {what} (trial {r['trial']}, best checkpoint)", b64.b64encode(data).decode()))
    return out


def _search_of(client: MlflowClient, exp, experiment: str, search_run: str | None):
    """The search run: ``search_run``, else the latest search of the experiment."""
    from e2e_search.record.store import search_run_of

    if search_run is None:
        searches = client.search_runs([exp.experiment_id], filter_string="tags.`e2e.kind` = 'search'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        if not searches:
            raise UserError(f"experiment '{experiment}' holds no e2e-search run; give the experiment of a search "
                            "(e2e-search run FILE records one)", key="EXPERIMENT")
        return searches[0]
    # a trial's run (or another experiment's) would get an empty leaderboard uploaded into it
    return search_run_of(client, exp, search_run)


def _objectives(client: MlflowClient, parent, metric: str, mode: str) -> tuple[Any, list[str], list[str]]:
    """(the search's resolved YAML or None, its metrics, their modes); the parent's tags when the YAML says none."""
    resolved = None
    try:
        import yaml

        with tempfile.TemporaryDirectory() as tmp:
            resolved = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "search_space.yaml",
                                                                     tmp)).read_text())
        metrics = resolved["search"]["metric"] if isinstance(resolved["search"]["metric"], list) else [metric]
        modes = resolved["search"]["mode"] if isinstance(resolved["search"]["mode"], list) else [mode]
    except Exception:  # noqa: BLE001 - search_space.yaml missing or unreadable: use the parent's tags
        metrics, modes = [metric], [mode]
    return resolved, metrics, modes


def _row(client: MlflowClient, t: Run, metrics: list[str], costs: bool) -> dict[str, Any]:
    """A trial's line of the leaderboard."""
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
    return row


def _mark_confirmed(rows: list[dict[str, Any]], confirmed: dict) -> None:
    """The leaderboard shows each finalist's test figure beside its validation one."""
    first = confirmed["rankings"][0]
    for fin in confirmed["finalists"]:
        t = fin["test"].get(first["test_metric"])
        lo, hi = (fin["intervals"].get(first["test_metric"]) or [None, None])
        for r in rows:
            if r["run"] == fin["source_run"] and t:
                r["confirmed"] = f"{t['mean']:.4g} [{_fmt(lo)}, {_fmt(hi)}]"


def build_report(uri: str, experiment: str, search_run: str | None = None, *, costs: bool = True) -> tuple[str, str]:
    """(HTML text, parent run id) for the latest search of ``experiment`` (or ``search_run``)."""
    from e2e_search.record.store import experiment_of

    client = MlflowClient(tracking_uri=uri)
    exp = experiment_of(client, experiment)
    parent = _search_of(client, exp, experiment, search_run)
    metric, mode = parent.data.tags.get("e2e.metric", "val_loss"), parent.data.tags.get("e2e.mode", "min")
    resolved, metrics, modes = _objectives(client, parent, metric, mode)
    trials: list[Run] = client.search_runs([exp.experiment_id], max_results=5000,
                                           filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = [t for t in trials if t.data.tags.get("e2e.phase") != "confirm"]  # retrainings: their own section
    confirmed = _confirm_payload(client, parent)
    rows = [_row(client, t, metrics, costs) for t in trials]
    key = lambda r: r.get(metric, -math.inf if mode == "max" else math.inf)  # noqa: E731
    rows.sort(key=key, reverse=(mode == "max"))
    plots = _plots(rows, metric, metrics, modes) + _attention_maps(client, rows)
    section = _confirm_section(confirmed) if confirmed else ""
    from e2e_search.analysis.effects import effects_section

    section += effects_section(client, trials, resolved, metric, mode, confirmed, _png)
    if confirmed:
        _mark_confirmed(rows, confirmed)
    return _html(experiment, parent, rows, metric, mode, plots, section,
                 f"{confirmed['rankings'][0]['test_metric']} (confirm)" if confirmed else None), parent.info.run_id


def _confirm_payload(client: MlflowClient, parent) -> dict | None:
    """The latest ``confirm`` of the search (confirm/<id>.json on its run), or None."""
    import json

    cid = parent.data.tags.get("e2e.confirm_id")
    if not cid:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(client.download_artifacts(parent.info.run_id, f"confirm/{cid}.json", tmp)).read_text())
    except Exception:  # noqa: BLE001 - a confirm that stopped before writing it: no section
        return None


TEST_SHOWN = {"classifier": ["test_auc", "test_rej30", "test_rej50", "test_rej70", "test_acc"],
              "regressor": ["test_mae", "test_bias", "test_resolution"]}


def _confirm_figure(payload: dict, rk: dict) -> str:
    """The test metric per finalist: mean over seeds with its 95% interval (thick), each seed with its own
    interval over test events (thin), and the trial's validation figure (open circle, selection-biased)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, fins = rk["test_metric"], payload["finalists"]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(rk["finalists"]) + 2), 3.6))
    for x, f in enumerate(rk["finalists"]):
        fin = fins[f]
        t = fin["test"].get(m)
        iv = fin["intervals"].get(m)
        if t and iv and None not in iv:
            ax.errorbar([x], [t["mean"]], yerr=[[t["mean"] - iv[0]], [iv[1] - t["mean"]]], fmt="s", color="C0",
                        capsize=6, lw=2, label="mean over seeds, 95% interval" if x == 0 else None)
        seeds = fin["seed_intervals"].get(m, {})
        for j, (seed, v) in enumerate(sorted((t or {}).get("values", {}).items())):
            lo, hi = seeds.get(seed, [None, None])
            dx = 0.12 * (j + 1)
            if lo is not None and hi is not None:
                ax.errorbar([x + dx], [v], yerr=[[max(v - lo, 0)], [max(hi - v, 0)]], fmt="o", ms=3, color="C1",
                            capsize=2, lw=1, label="each seed, 95% interval over test events" if x == j == 0 else None)
        val = fin["val"].get(rk["val_metric"])
        if val is not None:
            ax.plot([x - 0.15], [val], "o", mfc="none", color="gray",
                    label=f"search trial's {rk['val_metric']} (selection-biased)" if x == 0 else None)
    ax.set_xticks(range(len(rk["finalists"])))
    ax.set_xticklabels([fins[f]["label"] + (" ★" if rk.get("champion") == f else "") for f in rk["finalists"]],
                       fontsize=8)
    ax.set_ylabel(m), ax.set_title(f"{rk['kind']}: {m} on the test split")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def _confirm_section(payload: dict) -> str:
    fins = payload["finalists"]
    out = [f"<h2>Confirmation on the test split</h2><p>confirm <code>{html.escape(payload['confirm_id'])}</code>: "
           f"{len(fins)} finalist(s) retrained with seeds {', '.join(map(str, payload['seeds']))} up to the epoch "
           f"each was best at, scored once on {payload['test_events']:,} test events. Test figures: mean ± standard "
           f"deviation over seeds; [interval]: {html.escape(payload['interval'])}.</p>"]
    for rk in payload["rankings"]:
        m = rk["test_metric"]
        shown = [k for k in TEST_SHOWN[rk["kind"]] if any(k in fins[f]["test"] for f in rk["finalists"])]
        shown = [m] + [k for k in shown if k != m]
        head = "".join(f"<th>{html.escape(k)}</th>" for k in shown)
        body = []
        for f in rk["finalists"]:
            fin = fins[f]
            iv = fin["intervals"].get(m) or [None, None]
            cells = []
            for k in shown:
                t = fin["test"].get(k)
                cell = f"{_fmt(t['mean'])} ± {_fmt(t['std'])}" if t else "–"
                if k == m:
                    cell += f" [{_fmt(iv[0])}, {_fmt(iv[1])}]"
                cells.append(f"<td>{cell}</td>")
            star = rk.get("champion") == f
            style = ' style="background:#efe"' if star else ""
            body.append(f"<tr{style}><td>{html.escape(fin['label'])}{' ★' if star else ''}</td>"
                        f"<td>{_fmt(fin['val'].get(rk['val_metric']))}</td>{''.join(cells)}"
                        f"<td>{_fmt(fin['num_params'])}</td><td>{fin['epochs']}</td>"
                        f"<td><code>{html.escape(fin['source_run'])}</code></td></tr>")
        out.append(f"<h3>{html.escape(rk['kind'])}: {html.escape(rk['model'])}</h3><table><tr><th>finalist</th>"
                   f"<th>{html.escape(rk['val_metric'])} (search)</th>{head}<th>parameters</th><th>epochs</th>"
                   f"<th>trial run</th></tr>{''.join(body)}</table>")
        out.append(f"<p>★ champion: {html.escape(rk.get('reason') or '')}</p>")
        scored = rk.get("matrix_finalists") or []
        if len(scored) > 1:
            labels = [fins[f]["label"] for f in scored]
            rows = []
            for lb, row in zip(labels, rk["matrix"]):
                cells = []
                for v in row:
                    if v is None:
                        cells.append("<td>–</td>")
                    else:
                        shade = int(255 - 120 * abs(v - 0.5) * 2)
                        color = f"rgb({shade},255,{shade})" if v >= 0.5 else f"rgb(255,{shade},{shade})"
                        cells.append(f'<td style="background:{color}">{v:.2f}</td>')
                rows.append(f"<tr><th>{html.escape(lb)}</th>{''.join(cells)}</tr>")
            out.append(f"<p>P(row beats column) on {html.escape(m)}: the paired bootstrap over the same test events "
                       f"(and the seeds)</p><table><tr><th></th>{''.join(f'<th>{html.escape(x)}</th>' for x in labels)}"
                       f"</tr>{''.join(rows)}</table>")
        out.append(f"<figure><img src=\"data:image/png;base64,{_confirm_figure(payload, rk)}\"><figcaption>"
                   f"{html.escape(m)} per finalist with 95% intervals</figcaption></figure>")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _html(experiment: str, parent, rows: list[dict], metric: str, mode: str, plots, section: str = "",
          confirmed: str | None = None) -> str:
    cols = ["family", "trial", "status", metric] + (["confirmed"] if confirmed else [])
    cols += [k for k in PHYSICS if k != metric and any(k in r for r in rows)]
    cols += [c for c in ["num_params", "latency_ms", "flops", "throughput", "epochs"] if c not in cols]
    heads = {"num_params": "parameters", "flops": "FLOPs/example", "throughput": "CPU examples/s (batch 64)",
             "latency_ms": "latency ms (batch 1, trial's device)", "epochs": "epochs used",
             "confirmed": f"{confirmed} mean [95% interval]"}
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
<p>search run <code>{parent.info.run_id}</code> \
({html.escape(parent.data.tags.get('mlflow.runName', ''))}), status {parent.info.status};
ranked by <b>{html.escape(metric)}</b> ({mode}) at each trial's best epoch. {html.escape(params)}</p>
<table><tr><th>rank</th>{''.join(f'<th>{html.escape(heads.get(c, c))}</th>' for c in cols)}<th>MLflow run</th></tr>
{''.join(body)}</table>
<p>★ on the Pareto front. Red rows: trials that failed (hover for the error).</p>
{figs}
{section}
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
