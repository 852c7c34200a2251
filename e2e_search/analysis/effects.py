"""What each technique buys: the ``report`` section on the searched parameters' effects.

For every parameter the search varied (``choice``/``grid`` values, booleans; ranges such as ``mask_ratio``
in three quantile bins, or per value when the trials took at most four), from the trials' MLflow records:

- the search metric at each finished trial's best epoch, per value (box and points; a conditional
  parameter's trials where it was not active form the group "not active", e.g. ``mask_ratio`` without
  pretraining);
- after ``e2e-search confirm`` (``search.confirm``), below on its own scale, each confirmed finalist's test
  metric (mean over seeds) with its 95% bootstrap interval, at the finalist's value, and the mean over the
  finalists of each value (e2e_search/confirm/record.py);
- Optuna's parameter importances for the search metric (``optuna.importance.get_param_importances`` with
  its default evaluator, PED-ANOVA in Optuna 5, which also rates conditional parameters) on an in-memory
  study rebuilt from the finished trials (``optuna.trial.create_trial`` with each parameter's distribution);
- for ``event_transformer`` searches: the task queries' attention over the objects (each trial's
  ``best_checkpoint/attention.npz``, trainables/attention/tasks.py) averaged over the trials with and
  without pretraining, side by side, and the masked-object reconstruction errors (``best_val_recon_*``,
  trainables/core/recon.py) of the best pretrained trial.

Where something cannot be shown (too few finished trials, a parameter that took one value), the section
says why instead of drawing it.
"""

from __future__ import annotations

import html
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from e2e_search.spec.dims import ChoiceDim, FixedDim, GridDim, LogUniformDim, QUniformDim, RandIntDim, UniformDim
from trainables.core.layout import BEST_ATTENTION_ARTIFACT

NOT_ACTIVE = "not active"
MIN_TRIALS = 3
"""Finished trials the importance chart needs at least."""


@dataclass
class Factor:
    """One searched parameter: its dimension, and each finished trial's value label (None: not active)."""

    name: str
    dim: Any
    labels: list[str | None]
    order: list[str] = field(default_factory=list)
    """Group labels in display order."""
    values: list[Any] = field(default_factory=list)
    """Each trial's parsed value (None: not active), for the importance study."""


def dims_of(resolved: dict) -> dict[str, Any]:
    """The searched dimensions of a resolved search YAML (``search_space.yaml`` of the search run): family
    (when searched) and every ``params`` entry that is not a fixed value. Unknown shapes are skipped."""
    from pydantic import TypeAdapter

    from e2e_search.spec.dims import Dimension

    out: dict[str, Any] = {}
    fam = resolved.get("family")
    if isinstance(fam, dict) and len(fam.get("values", [])) > 1:
        out["family"] = ChoiceDim(type="choice", values=list(fam["values"]))
    adapter = TypeAdapter(Dimension)
    for name, raw in (resolved.get("params") or {}).items():
        try:
            dim = adapter.validate_python(raw)
        except Exception:  # noqa: BLE001 - a report never fails on one odd entry
            continue
        if isinstance(dim, FixedDim) or (isinstance(dim, (ChoiceDim, GridDim)) and len(dim.values) < 2):
            continue
        out[name] = dim
    return out


def _parse(dim: Any, text: str | None) -> Any:
    """An MLflow param string back to the dimension's value (None when absent or unparseable)."""
    if text is None:
        return None
    if isinstance(dim, (ChoiceDim, GridDim)):
        for v in dim.values:
            if str(v) == text:
                return v
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _label(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def factors(dims: dict[str, Any], params: list[dict[str, str]]) -> list[Factor]:
    """One Factor per dimension from each trial's MLflow params (strings), choices and grids first (in the
    YAML's order), then ranges. Ranges with more than four
    distinct values are cut into three quantile bins labelled ``low [a, b]``, ``mid ...``, ``high ...``."""
    out = []
    for name, dim in dims.items():
        values = [_parse(dim, p.get(name)) for p in params]
        if isinstance(dim, (ChoiceDim, GridDim)):
            labels = [None if v is None else _label(v) for v in values]
            order = [_label(v) for v in dim.values]
        else:
            seen = sorted({float(v) for v in values if v is not None})
            if len(seen) <= 4:
                labels = [None if v is None else _label(float(v)) for v in values]
                order = [_label(v) for v in seen]
            else:
                arr = np.asarray(seen)
                edges = np.quantile(np.asarray([float(v) for v in values if v is not None]), [1 / 3, 2 / 3])
                names = ["low", "mid", "high"]

                def bin_of(v: float, edges=edges) -> int:
                    return int(np.searchsorted(edges, v, side="right"))

                ranges: dict[int, tuple[float, float]] = {}
                for v in arr:
                    b = bin_of(v)
                    lo, hi = ranges.get(b, (v, v))
                    ranges[b] = (min(lo, v), max(hi, v))
                text = {b: f"{names[b]} [{lo:.3g}, {hi:.3g}]" for b, (lo, hi) in ranges.items()}
                labels = [None if v is None else text[bin_of(float(v))] for v in values]
                order = [text[b] for b in sorted(text)]
        present = [o for o in order if o in labels]
        if any(lb is None for lb in labels):
            present.append(NOT_ACTIVE)
        out.append(Factor(name, dim, labels, present, values))
    return sorted(out, key=lambda f: not isinstance(f.dim, (ChoiceDim, GridDim)))  # choices first, then ranges


def _distribution(dim: Any, observed: list[Any]):
    """The Optuna distribution of a dimension (None: not representable, e.g. list values)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dim, (ChoiceDim, GridDim)):
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in dim.values):
            return None
        return CategoricalDistribution(list(dim.values))
    lo = min([float(dim.low)] + [float(v) for v in observed])
    hi = max([float(dim.high)] + [float(v) for v in observed])
    if isinstance(dim, RandIntDim):
        return IntDistribution(int(math.floor(lo)), int(math.ceil(hi)))
    if isinstance(dim, LogUniformDim):
        return FloatDistribution(lo, hi, log=True)
    if isinstance(dim, (UniformDim, QUniformDim)):
        return FloatDistribution(lo, hi)
    return None


def importances(facs: list[Factor], scores: list[float], mode: str) -> tuple[dict[str, float], str]:
    """(parameter -> importance, normalized to sum 1, highest first; or {}) and a note: why there is no
    chart, or which evaluator made it. ``scores``: the search metric of the same trials as the factors."""
    import optuna

    ok = [i for i, s in enumerate(scores) if isinstance(s, (int, float)) and math.isfinite(s)]
    if len(ok) < MIN_TRIALS:
        return {}, (f"no importance chart: {len(ok)} finished trial(s) with a finite metric; Optuna's importances "
                    f"need at least {MIN_TRIALS}")
    usable = []
    for f in facs:
        seen = {f.values[i] for i in ok if f.values[i] is not None}
        dist = _distribution(f.dim, [v for v in seen])
        if len(seen) >= 2 and dist is not None:
            usable.append((f, dist))
    if not usable:
        return {}, "no importance chart: no searched parameter took two different values in the finished trials"
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" in the report's output
    try:
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    finally:
        optuna.logging.set_verbosity(level)
    for i in ok:
        params, dists = {}, {}
        for f, dist in usable:
            v = f.values[i]
            if v is None:
                continue
            if isinstance(dist, optuna.distributions.IntDistribution):
                v = int(round(float(v)))
            params[f.name], dists[f.name] = v, dist
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(scores[i])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = optuna.importance.get_param_importances(study)
    said = " ".join(str(w.message) for w in caught if "importance" in str(w.message).lower())
    if not res:
        return {}, f"no importance chart: Optuna rated no parameter. {said}".strip()
    if len(set(round(v, 12) for v in res.values())) == 1 and len(res) > 1:
        return {}, (f"no importance chart: Optuna rated every parameter the same ({len(ok)} trials are too few "
                    f"to tell them apart). {said}").strip()
    evaluator = type(optuna.importance.PedAnovaImportanceEvaluator()).__name__
    return dict(res), (f"Optuna {optuna.__version__} get_param_importances (default evaluator, {evaluator}) over "
                       f"{len(ok)} finished trials")


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def effects_figure(facs: list[Factor], scores: list[float], metric: str, tested: list[dict] | None = None,
                   test_metric: str | None = None):
    """Per factor (one column each, three per row), the search metric per value (box + each trial's point)
    and, below it on its own scale when finalists were confirmed, each finalist's test mean with its 95%
    interval (squares) and the mean over the finalists of each value (bar).
    ``tested``: [{"labels": {factor: label}, "mean", "lo", "hi", "name"}]."""
    plt = _plt()
    n = len(facs)
    cols = min(3, n)
    per = 2 if tested else 1
    rows = math.ceil(n / cols) * per
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.0 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    for k, f in enumerate(facs):
        r, c = (k // cols) * per, k % cols
        ax = axes[r, c]
        groups = [[s for lb, s in zip(f.labels, scores) if (lb or NOT_ACTIVE) == g and math.isfinite(s)]
                  for g in f.order]
        if any(groups):
            ax.boxplot([g if g else [np.nan] for g in groups], positions=range(len(f.order)), widths=0.5,
                       showfliers=False, medianprops={"color": "C0"})
        for x, g in enumerate(groups):
            ax.scatter(x + 0.06 * rng.standard_normal(len(g)), g, s=14, color="gray", alpha=0.8, zorder=3,
                       label=f"{metric} of each trial (search)" if (k == 0 and x == 0) else None)
        ax.set_xticks(range(len(f.order)), f.order, fontsize=8, rotation=20 if len(f.order) > 3 else 0)
        ax.set_title(f"{f.name}: {metric} (search)", fontsize=9)
        ax.set_ylabel(metric, fontsize=8)
        if not tested:
            continue
        ax = axes[r + 1, c]
        for x, lab in enumerate(f.order):
            fins = [t for t in tested if (t["labels"].get(f.name) or NOT_ACTIVE) == lab and t.get("mean") is not None]
            if fins:
                ax.hlines(np.mean([t["mean"] for t in fins]), x - 0.35, x + 0.35, color="C0", lw=2,
                          label="mean over the value's finalists" if (k == 0 and x == 0) else None)
            for j, t in enumerate(fins):
                dx = (j - (len(fins) - 1) / 2) * min(0.12, 0.6 / max(1, len(fins)))
                lo, hi = t.get("lo"), t.get("hi")
                yerr = None if lo is None or hi is None else [[max(t["mean"] - lo, 0)], [max(hi - t["mean"], 0)]]
                ax.errorbar([x + dx], [t["mean"]], yerr=yerr, fmt="s", ms=4, color="C3", capsize=3, lw=1, zorder=4,
                            label=(f"{test_metric} of a confirmed finalist (mean over seeds), 95% interval"
                                   if k == 0 and x == 0 and j == 0 else None))
        ax.set_xticks(range(len(f.order)), f.order, fontsize=8, rotation=20 if len(f.order) > 3 else 0)
        ax.set_xlim(-0.5, len(f.order) - 0.5)
        ax.set_title(f"{f.name}: {test_metric} (confirm, test split)", fontsize=9)
        ax.set_ylabel(test_metric, fontsize=8)
    for k in range(n, math.ceil(n / cols) * cols):
        for r in range(per):
            axes[(k // cols) * per + r, k % cols].axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        h, lb = ax.get_legend_handles_labels()
        handles += h
        labels += lb
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.05 if per == 2 else 0.07, 1, 1))
    else:
        fig.tight_layout()
    return fig


def importance_figure(imp: dict[str, float], metric: str, note: str):
    plt = _plt()
    names = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(5.5, 0.4 * len(names) + 1.4))
    ax.barh(names, [imp[n] for n in names], color="C0")
    for i, n in enumerate(names):
        ax.text(imp[n], i, f" {imp[n]:.2f}", va="center", fontsize=8)
    ax.set_xlabel(f"importance for {metric} (sum 1)")
    ax.set_xlim(0, max(imp.values()) * 1.2 + 1e-9)
    ax.set_title("what mattered: Optuna parameter importances", fontsize=9)
    fig.tight_layout()
    return fig


def attention_compare_figure(maps: dict[str, list[dict[str, np.ndarray]]], objects: list[str], groups: list[str]):
    """Side by side per pretraining setting (``maps``: setting -> per trial {task: (G, N)}), one row per task
    query (``shared`` for trials whose tasks read one shared query): the attention of the task's queries
    (averaged over its queries and the trials that have it) over the object slots, per event group."""
    plt = _plt()
    settings = list(maps)
    tasks = list(dict.fromkeys(t for ms in maps.values() for m in ms for t in m))
    fig, axes = plt.subplots(len(tasks), len(settings), figsize=(4.6 * len(settings), 2.9 * len(tasks)),
                             squeeze=False, sharey=True)
    width = 0.8 / max(1, len(groups))
    for r, task in enumerate(tasks):
        for ax, s in zip(axes[r], settings):
            have = [m[task] for m in maps[s] if task in m]
            if not have:
                ax.set_axis_off()
                continue
            mean = np.mean(have, axis=0)                                     # (G, N)
            for g, name in enumerate(groups):
                ax.bar(np.arange(len(objects)) + (g - (len(groups) - 1) / 2) * width, mean[g], width, label=name,
                       color=("C0", "C3", "C2", "C4")[g % 4])
            ax.set_xticks(range(len(objects)), objects, fontsize=8)
            ax.set_title(f"'{task}' query, {s} ({len(have)} trial{'s' if len(have) != 1 else ''})", fontsize=9)
        axes[r, 0].set_ylabel("attention weight", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("what each task's query looks at, with and without masked-object pretraining "
                 "(validation, each trial's best epoch)", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the section
def _tested(confirmed: dict | None, facs: list[Factor], runs: list[str]) -> tuple[list[dict], str | None]:
    """The confirmed finalists as points for the figure: their factor labels (from their source trial)."""
    if not confirmed:
        return [], None
    rk = confirmed["rankings"][0]
    m = rk["test_metric"]
    out = []
    for f in rk["finalists"]:
        fin = confirmed["finalists"][f]
        if fin["source_run"] not in runs:
            continue
        i = runs.index(fin["source_run"])
        t = fin["test"].get(m)
        lo, hi = (fin["intervals"].get(m) or [None, None])
        out.append({"name": fin["label"], "labels": {fac.name: fac.labels[i] for fac in facs},
                    "mean": t["mean"] if t else None, "lo": lo, "hi": hi})
    return out, m


def _table(facs: list[Factor], scores: list[float], metric: str, tested: list[dict], test_metric: str | None) -> str:
    rows = []
    for f in facs:
        for g in f.order:
            vals = [s for lb, s in zip(f.labels, scores) if (lb or NOT_ACTIVE) == g and math.isfinite(s)]
            med = f"{np.median(vals):.4g} ({min(vals):.4g}–{max(vals):.4g})" if vals else "–"
            fins = [t for t in tested if (t["labels"].get(f.name) or NOT_ACTIVE) == g and t.get("mean") is not None]
            tcell = "; ".join(f"{t['mean']:.4g} [{t['lo']:.4g}, {t['hi']:.4g}]" if t.get("lo") is not None
                              else f"{t['mean']:.4g}" for t in fins) or "–"
            if len(fins) > 1:
                tcell = f"<b>{np.mean([t['mean'] for t in fins]):.4g}</b> mean of: " + tcell
            rows.append(f"<tr><td>{html.escape(f.name)}</td><td>{html.escape(g)}</td><td>{len(vals)}</td>"
                        f"<td>{med}</td>" + (f"<td>{tcell}</td>" if test_metric else "") + "</tr>")
    head = (f"<tr><th>parameter</th><th>value</th><th>finished trials</th><th>{html.escape(metric)} median "
            f"(min–max)</th>" + (f"<th>{html.escape(test_metric)} of the confirmed finalists: mean over seeds "
                                  f"[95% interval]</th>" if test_metric else "") + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _attention_maps(client, trials: list) -> tuple[dict, list[str], list[str]] | None:
    """Per pretraining setting, each finished trial's per-task mean attention; None without event maps."""
    from trainables.attention.tasks import is_task_attention, query_means

    maps: dict[str, list] = {}
    objects = groups = None
    for t in trials:
        if t.data.tags.get("e2e.family") != "event_transformer":
            continue
        p = t.data.params.get("pretrain_epochs")
        try:
            setting = "all trials" if p is None else "no pretraining" if int(p) == 0 else f"pretraining ({int(p)} epochs)"
        except ValueError:
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(client.download_artifacts(t.info.run_id, BEST_ATTENTION_ARTIFACT, tmp))
                if not is_task_attention(path):
                    continue
                with np.load(path) as z:
                    maps.setdefault(setting, []).append(query_means(z))
                    objects, groups = [str(o) for o in z["objects"]], [str(g) for g in z["groups"]]
        except Exception:  # noqa: BLE001 - a trial without maps is left out
            continue
    if not maps or objects is None or groups is None:  # (set together)
        return None
    return dict(sorted(maps.items())), objects, groups


def _recon_table(trials: list, scores: list[float], mode: str) -> str:
    """The masked-object reconstruction MSE (objects x features) of the best pretrained trial."""
    from trainables.data.object_names import EVENT_FEATURES

    best = None
    for t, s in zip(trials, scores):
        if "best_val_recon" in t.data.metrics and math.isfinite(s) and (
                best is None or (s > best[1] if mode == "max" else s < best[1])):
            best = (t, s)
    if best is None:
        return ""
    m = best[0].data.metrics
    keys = [k[len("best_val_recon_"):] for k in m if k.startswith("best_val_recon_")]
    feats = [f for f in EVENT_FEATURES if any(k.endswith("_" + f) for k in keys)] or sorted(
        {k.rsplit("_", 1)[1] for k in keys if "_" in k})
    objs = list(dict.fromkeys(k.rsplit("_", 1)[0] for k in keys if "_" in k and k.rsplit("_", 1)[1] in feats))
    rows = "".join(f"<tr><th>{html.escape(o)}</th>" + "".join(
        f"<td>{m.get(f'best_val_recon_{o}_{f}', math.nan):.3f}</td>" for f in feats)
        + f"<td>{m.get(f'best_val_recon_{o}', math.nan):.3f}</td>"
        + f"<td>{m.get(f'best_val_recon_{o}_ratio', math.nan):.3f}</td></tr>" for o in objs)
    return (f"<p>Masked-object reconstruction of the best pretrained trial (<code>{best[0].info.run_id}</code>): "
            f"mean squared error of the hidden objects on the validation split, in standardized units (1 = as "
            f"good as predicting each feature's mean); overall {m.get('best_val_recon', math.nan):.3f}. Metrics "
            f"<code>val_recon_&lt;object&gt;_&lt;feature&gt;</code> of each pretrained trial.</p><table><tr><th></th>"
            + "".join(f"<th>{html.escape(f)}</th>" for f in feats) + "<th>mean</th><th>against the slot's mean "
            f"predictor (&le; 0.5: half its error or less)</th></tr>{rows}</table>")


def effects_section(client, trials: list, resolved: dict | None, metric: str, mode: str,
                    confirmed: dict | None, png) -> str:
    """The report's "Technique effects" HTML (see the module). ``trials``: the search's trial runs (MLflow);
    ``png``: figure -> base64 PNG text."""
    if not resolved:
        return ("<h2>Technique effects</h2><p>Not shown: the search run has no resolved search_space.yaml to "
                "tell which parameters were searched.</p>")
    done = [t for t in trials if t.data.tags.get("e2e.status") == "FINISHED"
            and math.isfinite(t.data.metrics.get(f"best_{metric}", math.nan))]
    dims = dims_of(resolved)
    out = ["<h2>Technique effects</h2>"]
    if not dims:
        out.append("<p>Not shown: the search varied no parameter (every parameter is fixed).</p>")
        return "\n".join(out)
    if not done:
        out.append(f"<p>Not shown: no finished trial has a finite {html.escape(metric)}.</p>")
        return "\n".join(out)
    scores = [float(t.data.metrics[f"best_{metric}"]) for t in done]
    facs = factors(dims, [dict(t.data.params) for t in done])
    runs = [t.info.run_id for t in done]
    tested, test_metric = _tested(confirmed, facs, runs)
    single = [f.name for f in facs if len([g for g in f.order if g != NOT_ACTIVE]) < 2]
    shown = [f for f in facs if f.name not in single]
    out.append(f"<p>{html.escape(metric)} at each finished trial's best epoch ({len(done)} trials), per value of "
               f"each searched parameter" + (f"; below: the {len(tested)} finalists confirmed on the test split "
                                             f"({html.escape(test_metric or '')}, mean over seeds, 95% bootstrap "
                                             f"interval)" if tested else
                                             "; no test figures (run <code>e2e-search confirm</code> or set "
                                             "<code>search.confirm</code> to add them)") + ".</p>")
    if single:
        out.append(f"<p>Left out (one value in the finished trials): {html.escape(', '.join(single))}.</p>")
    if shown:
        out.append(f'<figure><img src="data:image/png;base64,{png(effects_figure(shown, scores, metric, tested, test_metric))}">'
                   f"<figcaption>{html.escape(metric)} per parameter value</figcaption></figure>")
        out.append(_table(shown, scores, metric, tested, test_metric))
    imp, note = importances(facs, scores, mode)
    if imp:
        out.append(f'<figure><img src="data:image/png;base64,{png(importance_figure(imp, metric, note))}">'
                   f"<figcaption>{html.escape(note)}</figcaption></figure>")
    else:
        out.append(f"<p>{html.escape(note)}.</p>")
    att = _attention_maps(client, done)
    if att is not None:
        maps, objects, groups = att
        out.append("<h3>What the task heads look at</h3>")
        out.append(f'<figure><img src="data:image/png;base64,{png(attention_compare_figure(maps, objects, groups))}">'
                   "<figcaption>cross-attention of the task queries over the objects (plots/task_attention.png of "
                   "each trial has the per-query maps and single events)</figcaption></figure>")
        if len(maps) < 2 and "pretrain_epochs" in dims:
            out.append("<p>Only one pretraining setting has finished trials with maps: no side-by-side view.</p>")
    out.append(_recon_table(done, scores, mode))
    out.append(_paired_sections(confirmed, done, dims))
    return "\n".join(out)


def _paired_sections(confirmed: dict | None, done: list, dims: dict[str, Any]) -> str:
    """Pretraining against training from scratch at each labelled fraction, and one query per task against one
    shared query (e2e_search/analysis/paired.py), when the search varied them and confirm scored them."""
    from e2e_search.analysis.paired import pairs, pairs_table

    if not confirmed or "pretrain_epochs" not in dims and "query_sharing" not in dims:
        return ""
    params_of = {t.info.run_id: dict(t.data.params) for t in done}
    searched = list(dims)
    defaults = {"label_fraction": "1.0", "query_sharing": "per_task"}
    out = []
    if "pretrain_epochs" in dims:
        rows = [r for r in pairs(confirmed, params_of, searched, "pretrain_epochs", "0",
                                 "label_fraction" if "label_fraction" in dims else None, defaults)]
        if "query_sharing" in dims:  # the per-task heads' rows (the shared ones are the next table's)
            per_task = {fin["label"] for f, fin in enumerate(confirmed["finalists"])
                        if params_of.get(fin["source_run"], {}).get("query_sharing", "per_task") == "per_task"}
            rows = [r for r in rows if r["baseline"]["label"] in per_task]
        if rows:
            out.append("<h3>Pretraining against training from scratch" + (", per labelled fraction"
                       if "label_fraction" in dims else "") + "</h3><p>Finalists that differ only in "
                       "<code>pretrain_epochs</code>; test figures of <code>confirm</code> (mean over seeds, 95% "
                       "bootstrap interval); P: share of paired bootstrap replicates (test events and seeds "
                       "resampled together) in which the pretrained model scores better. <code>label_fraction</code>: "
                       "the share of training events whose labels the task epochs use; pretraining reads every "
                       "training event without its label.</p>")
            out.append(pairs_table(rows, factor="pretrain_epochs", baseline_name="from scratch",
                                   technique_name="pretrained", stratum="label_fraction" if "label_fraction" in dims
                                   else None))
    if "query_sharing" in dims:
        rows = pairs(confirmed, params_of, searched, "query_sharing", "shared",
                     "pretrain_epochs" if "pretrain_epochs" in dims else None, defaults)
        if rows:
            out.append("<h3>One query per task against one shared query</h3><p>Finalists that differ only in "
                       "<code>query_sharing</code>; P: share of paired bootstrap replicates in which one query per "
                       "task scores better.</p>")
            out.append(pairs_table(rows, factor="query_sharing", baseline_name="shared query",
                                   technique_name="query per task", stratum="pretrain_epochs"
                                   if "pretrain_epochs" in dims else None))
    return "\n".join(out)
