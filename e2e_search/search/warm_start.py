"""``search.warm_start``: the best finished trials of an earlier search as the first trials of a new one.

Read before Ray starts, from the new search's own tracking store (reading only: a missing store is an
error, never created). The ``top`` best FINISHED trial runs of experiment ``search.warm_start.experiment``
(every search in it), ranked by ``best_<search metric>``, of a family this search trains, are mapped onto
the new space: dimensions the new space lacks are left out, numeric values outside the new ranges are
clipped into them, choice values the new space no longer offers are dropped (the sampler draws those), and
one note says what changed. The points are queued as the first trials (after grid points); for ``tpe`` and
``gp`` the earlier results are also given to the sampler as completed trials (searchers.observations): the queued
points and every other finished trial of the experiment (up to ``OBSERVED_MAX``, best first; read only for
those samplers) whose values lie in the new space unchanged, so that the sampler sees the poor regions as well
as the best one (as Optuna's ``study.add_trials(old_study.trials)`` warm start does). Trials are ranked by their
best epoch (``best_<metric>``) but observed with their last reported value, as the sampler observes its own.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from e2e_search.search.algorithms import LEARNING_SAMPLERS
from e2e_search.spec.dims import ChoiceDim, FixedDim, GridDim, LogUniformDim, QUniformDim, RandIntDim, UniformDim
from e2e_search.spec.params import is_categorical, never_active, search_dims
from e2e_search.spec.schema import SearchSpace
from trainables.errors import UserError

KEY = "search.warm_start.experiment"
# At most this many earlier trials (best first) become prior observations of a tpe/gp sampler.
OBSERVED_MAX = 200


@dataclass
class WarmStart:
    experiment: str
    points: list[dict[str, Any]]
    """Each earlier trial's values in the new space, under the Optuna names (``name__index``, ``name__step``)."""
    observed: list[tuple[dict[str, Any], float]]
    """(point, its earlier result: the search metric's last reported value, :func:`observed_value`), best first:
    the queued points, then every other finished trial (up to ``OBSERVED_MAX`` in all) whose values the new
    space holds unchanged."""
    run_ids: list[str] = field(default_factory=list)
    note: str | None = None
    """What the mapping changed (clipped, dropped, missing), said once."""


def to_space(cfg: SearchSpace, params: dict[str, Any], family: str | None) -> tuple[dict[str, Any], dict[str, set]]:
    """An earlier trial's ``params`` (and family) as a point of ``cfg``'s space -> (point, changes), changes
    {"clipped": names, "dropped": names, "missing": names}."""
    ignored = never_active(cfg)
    dims = {n: d for n, d in search_dims(cfg).items() if n not in ignored}
    values = {**params, **({"family": family} if family else {})}
    point: dict[str, Any] = {}
    changes: dict[str, set] = {"clipped": set(), "dropped": set(), "missing": set()}
    for name, dim in dims.items():
        if isinstance(dim, FixedDim):
            continue
        if name not in values:
            if not dim.when:  # a conditional one may simply have been inactive
                changes["missing"].add(name)
            continue
        v = values[name]
        if isinstance(dim, ChoiceDim | GridDim):
            if v not in dim.values:
                changes["dropped"].add(name)
            elif is_categorical(dim.values):
                point[name] = v
            else:
                point[f"{name}__index"] = dim.values.index(v)
            continue
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            changes["dropped"].add(name)
            continue
        c = min(max(float(v), dim.low), dim.high)
        if c != float(v):
            changes["clipped"].add(name)
        if isinstance(dim, RandIntDim):
            point[name] = int(round(c))
        elif isinstance(dim, QUniformDim):
            steps = math.floor((dim.high - dim.low) / dim.q + 1e-9)
            point[f"{name}__step"] = min(max(int(round((c - dim.low) / dim.q)), 0), steps)
        elif isinstance(dim, UniformDim | LogUniformDim):
            point[name] = c
    return point, changes


def observed_value(metrics: dict[str, float], metric: str) -> float:
    """An earlier trial's result as its sampler saw it: ``final_<metric>``, the last reported value (Ray's
    ``OptunaSearch`` tells the study a trial's last result, also when ASHA stopped it), not ``best_<metric>``,
    the best epoch's value that ranks the trials. An overfitting trial that peaked at its first epoch must not
    look better to the new search's sampler than to the old one's. ``best_<metric>`` where a run has no final."""
    value = metrics.get(f"final_{metric}", math.nan)
    return float(value if math.isfinite(value) else metrics[f"best_{metric}"])


def load(cfg: SearchSpace, uri: str) -> WarmStart | None:
    """The warm start of ``cfg`` (None without ``search.warm_start``), read from the store at ``uri``.

    Raises:
        UserError (key ``search.warm_start.experiment``): no such experiment, or no finished trial of this
        search's families reporting its metric."""
    from mlflow.tracking import MlflowClient

    from e2e_search.record.store import experiment_of, sqlite_path

    ws = cfg.search.warm_start
    if ws is None:
        return None
    fix = "give the name of an earlier search's experiment (e2e-search best NAME lists its trials) or remove " \
          "search.warm_start"
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UserError(f"no experiment '{ws.experiment}': there is no MLflow store at {uri} yet; {fix}", key=KEY)
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = experiment_of(client, ws.experiment, key=KEY)
    except UserError as e:
        raise UserError(e.message.split("; ")[0] + f"; {fix}", key=KEY) from None
    scored = _ranked_runs(cfg, client, exp.experiment_id, ws.experiment, fix)
    # only a sampler that learns (and is used: PBT has none) needs the earlier trials beyond the queued ones
    learns = cfg.search.algorithm in LEARNING_SAMPLERS and cfg.scheduler.type != "pbt"
    taken = scored[: max(ws.top, OBSERVED_MAX) if learns else ws.top]
    points, observed, rids, changed = _read_trials(cfg, client, taken, ws.top)
    if not points:
        raise UserError(f"experiment '{ws.experiment}': none of its best trials has its config.yaml any more; "
                        f"{fix}", key=KEY)
    return WarmStart(ws.experiment, points, observed, rids, _change_note(ws.experiment, len(points), changed))


def _ranked_runs(cfg: SearchSpace, client: Any, experiment_id: str, experiment: str, fix: str) -> list[Any]:
    """The experiment's finished trial runs of this search's families reporting ``best_<metric>``, best first.

    Raises:
        UserError: there is none."""
    metric, mode = cfg.metrics[0], cfg.modes[0]
    runs = client.search_runs([experiment_id],
                              filter_string="tags.`e2e.kind` = 'trial' and attributes.status = 'FINISHED'",
                              max_results=5000)
    families = set(cfg.families)
    same = [r for r in runs if r.data.tags.get("e2e.family") in families]
    scored = [r for r in same if math.isfinite(r.data.metrics.get(f"best_{metric}", math.nan))]
    if not scored:
        had = cast("set[str]", {r.data.tags.get("e2e.family") for r in runs})  # every trial run names its family
        why = ("no finished trial" if not runs else
               f"no finished trial of family {cfg.family_label} (it has {sorted(had)})"
               if not same else f"no finished trial reporting {metric}")
        raise UserError(f"experiment '{experiment}' has {why} to start from; {fix}", key=KEY)
    scored.sort(key=lambda r: r.data.metrics[f"best_{metric}"], reverse=(mode == "max"))
    return scored


def _read_trials(cfg: SearchSpace, client: Any, ranked: list[Any], top: int) -> tuple[
        list[dict[str, Any]], list[tuple[dict[str, Any], float]], list[str], dict[str, set]]:
    """The ``ranked`` runs' configs mapped onto ``cfg``'s space -> (the points of the ``top`` best, every
    observation, the points' run ids, what the mapping changed in the points); a run whose config.yaml is
    gone is skipped."""
    import yaml

    metric = cfg.metrics[0]
    points, observed, rids = [], [], []
    changed: dict[str, set] = {"clipped": set(), "dropped": set(), "missing": set()}
    with tempfile.TemporaryDirectory() as tmp:
        for rank, r in enumerate(ranked):
            rid = r.info.run_id
            try:
                saved = yaml.safe_load(Path(client.download_artifacts(rid, "config.yaml", tmp)).read_text()) or {}
            except Exception:  # noqa: BLE001 - an artifact store that lost the file: skip this trial
                continue
            point, ch = to_space(cfg, dict(saved.get("params") or {}), r.data.tags.get("e2e.family"))
            value = observed_value(r.data.metrics, metric)
            if rank >= top:  # observed only, and only where the new space holds it unchanged
                if not any(ch.values()):
                    observed.append((point, value))
                continue
            for k, names in ch.items():
                changed[k] |= names
            points.append(point)
            observed.append((point, value))
            rids.append(rid)
    return points, observed, rids, changed


def _change_note(experiment: str, n_points: int, changed: dict[str, set]) -> str | None:
    """The one note saying what the mapping changed (None: nothing)."""
    parts = []
    if changed["clipped"]:
        parts.append(f"clipped {', '.join(sorted(changed['clipped']))} into the new ranges")
    if changed["dropped"]:
        parts.append(f"dropped values of {', '.join(sorted(changed['dropped']))} that the new space does not offer "
                     "(the sampler draws them)")
    if changed["missing"]:
        parts.append(f"the earlier trials have no {', '.join(sorted(changed['missing']))} (the sampler draws them)")
    note = None
    if parts:
        note = f"warm start from '{experiment}' ({n_points} trials): " + "; ".join(parts)
    return note
