"""Paired comparisons of confirmed finalists: the ``report`` tables of what one technique buys at each setting of
another, on the test split.

Two finalists that differ only in ``factor`` (e.g. ``pretrain_epochs`` 0 against 4) and agree on every other
searched parameter form a pair; each pair is one row at its ``stratum`` value (e.g. ``label_fraction``): both
finalists' test metric (mean over the confirm seeds, 95% bootstrap interval) and P(the technique beats the
baseline), the share of paired bootstrap replicates (test events and seeds resampled together,
e2e_search/analysis/bootstrap.py) in which it does: the confirm record's win matrix.
"""

from __future__ import annotations

import html
import math
from typing import Any


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _is_baseline(value: str | None, baseline: str) -> bool:
    a, b = _num(value), _num(baseline)
    return (a == b) if a is not None and b is not None else value == baseline


def pairs(confirmed: dict, params_of: dict[str, dict[str, str]], searched: list[str], factor: str, baseline: str,
          stratum: str | None, defaults: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of the pairs of finalists of ``confirmed`` (a confirm/<id>.json) that differ in ``factor`` only
    (``baseline``: its reference value) among the ``searched`` parameters; ``params_of``: source run id -> the
    trial's parameters (MLflow strings); ``defaults``: the value of a parameter a trial does not have (an
    inactive conditional one). Each row: stratum value, baseline and technique finalists (label, mean, interval),
    their values of ``factor`` and P(technique beats baseline); sorted by the stratum's value."""
    rk = confirmed["rankings"][0]
    m, order, matrix = rk["test_metric"], rk.get("matrix_finalists") or [], rk.get("matrix") or []
    fins = confirmed["finalists"]
    defaults = defaults or {}

    def value(f: int, name: str) -> str | None:
        p = params_of.get(fins[f]["source_run"], {})
        return p.get(name, defaults.get(name))

    rows = []
    others = [s for s in searched if s != factor]
    members = [f for f in rk["finalists"] if fins[f]["source_run"] in params_of]
    for b in members:
        if not _is_baseline(value(b, factor), baseline):
            continue
        for t in members:
            if t == b or _is_baseline(value(t, factor), baseline):
                continue
            if any(value(t, o) != value(b, o) for o in others):
                continue
            p = matrix[order.index(t)][order.index(b)] if t in order and b in order else None

            def fig(f: int) -> dict[str, Any]:
                mean = (fins[f]["test"].get(m) or {}).get("mean")
                lo, hi = fins[f]["intervals"].get(m) or [None, None]
                return {"label": fins[f]["label"], "mean": mean, "lo": lo, "hi": hi}

            rows.append({"stratum": value(b, stratum) if stratum else None, "value": value(t, factor),
                         "baseline": fig(b), "technique": fig(t), "p": p, "metric": m})
    return sorted(rows, key=lambda r: (_num(r["stratum"]) if _num(r["stratum"]) is not None else math.inf,
                                       str(r["stratum"]), str(r["value"])))


def _cell(f: dict[str, Any]) -> str:
    if f["mean"] is None:
        return "–"
    iv = f" [{f['lo']:.4f}, {f['hi']:.4f}]" if f["lo"] is not None else ""
    return f"{f['mean']:.4f}{iv}"


def pairs_table(rows: list[dict[str, Any]], *, factor: str, baseline_name: str, technique_name: str,
                stratum: str | None, extra: dict[str, str] | None = None) -> str:
    """HTML table of :func:`pairs` rows; ``extra``: stratum value -> text of an added column (e.g. labelled
    events)."""
    if not rows:
        return ""
    m = rows[0]["metric"]
    head = ((f"<th>{html.escape(stratum)}</th>" if stratum else "") + ("<th>labelled training events</th>" if extra else "")
            + f"<th>{html.escape(baseline_name)}: {html.escape(m)} [95%]</th>"
            f"<th>{html.escape(technique_name)} ({html.escape(factor)}): {html.escape(m)} [95%]</th>"
            f"<th>difference</th><th>P({html.escape(technique_name)} better)</th>")
    body = []
    for r in rows:
        b, t = r["baseline"], r["technique"]
        diff = f"{t['mean'] - b['mean']:+.4f}" if t["mean"] is not None and b["mean"] is not None else "–"
        p = "–" if r["p"] is None else f"{r['p']:.2f}"
        s = r["stratum"]
        body.append("<tr>" + (f"<td>{html.escape(str(s))}</td>" if stratum else "")
                    + (f"<td>{html.escape((extra or {}).get(str(s), '–'))}</td>" if extra else "")
                    + f"<td>{_cell(b)}</td><td>{_cell(t)} ({html.escape(str(r['value']))})</td><td>{diff}</td>"
                    f"<td>{p}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
