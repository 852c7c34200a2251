"""What ``e2e-search confirm`` will do, checked before Ray starts (nothing written), and how it chooses champions.

:func:`prepare`: the search run (the latest finished one, or ``--search``), its resolved YAML, its data file
unchanged since the search (tag ``e2e.data_hash``, e2e_search/data/fileid.py), a test split, and the finalists: the
``top`` best finished trials by the search metric (``per_family``: the ``top`` best of each family; a joint
task adds the ``top`` best by ``val_mae`` for the regressor), each with its parameters and the epoch it was
best at. Bad input is one ``UserError`` line (exit 2). :func:`choose_champion`: the rule that picks a champion
from the finalists' test means and intervals. The run itself: e2e_search/confirm/run.py.
"""


from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.errors import UserError

DEFAULT_TOP = 3
DEFAULT_SEEDS = 3


@dataclass
class Finalist:
    position: int
    """1-based: the order of the finalists (by the search metric, best first)."""
    run_id: str
    """The search trial's MLflow run."""
    trial_id: str
    family: str
    params: dict[str, Any]
    """The trial's parameters (config.yaml of its run), without Optuna's helper entries."""
    epochs: int
    """The epoch the trial was best at: the finalist trains up to it."""
    val: dict[str, float]
    """The trial's metrics at its best epoch (``best_<m>`` of its run, as ``<m>``)."""
    num_params: int | None

    @property
    def label(self) -> str:
        return f"#{self.position} {self.family}"


@dataclass
class Ranking:
    """One champion to choose: the classifier, or the regressor (a joint task has both)."""

    kind: str
    """``classifier`` or ``regressor``."""
    model: str
    """The registered model (``<experiment>-<kind>``)."""
    val_metric: str
    val_mode: str
    test_metric: str
    """The test metric it is chosen by (bootstrapped: e2e_search/analysis/bootstrap.py)."""
    mode: str
    members: list[int]
    """Indices into ``ConfirmPlan.finalists``."""


@dataclass
class ConfirmPlan:
    uri: str
    experiment: str
    search_id: str
    search_name: str
    plan: Any
    """The search's e2e_search.search.run.Plan, rebuilt from its resolved YAML (the same data split)."""
    finalists: list[Finalist]
    rankings: list[Ranking]
    seeds: list[int]
    top: int
    per_family: bool
    notes: list[str] = field(default_factory=list)

    @property
    def cfg(self):
        return self.plan.cfg


@dataclass
class SeedResult:
    finalist: int
    """Index into ``ConfirmPlan.finalists``."""
    seed: int
    status: str
    """FINISHED or FAILED."""
    metrics: dict[str, Any]
    """The last epoch's report (``test_*`` included when it finished)."""
    checkpoint: str | None
    error: str | None = None


# --------------------------------------------------------------------------- which test metric, which champion
def champion_metric(kind: str, val_metric: str) -> tuple[str, str]:
    """(test metric, mode) a champion of ``kind`` is chosen by: the search metric on the test split when it has a
    bootstrap, else ``test_auc`` (classifier) or ``test_mae`` (regressor); a signed bias becomes ``abs_bias``."""
    from e2e_search.analysis.bootstrap import CLASSIFICATION, REGRESSION, base_name

    name = base_name(val_metric)
    if kind == "classifier":
        name = name if name in CLASSIFICATION else "auc"
        return f"test_{name}", "max"
    name = "abs_bias" if name == "bias" else name
    name = name if name in REGRESSION else "mae"
    return f"test_{name}", "min"


@dataclass
class Candidate:
    label: str
    mean: float
    lo: float
    hi: float
    num_params: int | None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def choose_champion(cands: list[Candidate], mode: str, metric: str) -> tuple[int | None, str]:
    """The champion among ``cands`` and why, in one line.

    The best mean wins unless another finalist's interval overlaps the best mean's interval: then, of the
    finalists whose intervals overlap it (the best included), the one with the fewest parameters (equal
    counts: the better mean). None when no candidate has a finite mean."""
    ok = [i for i, c in enumerate(cands) if _finite(c.mean)]
    if not ok:
        return None, "no finalist has a finite test mean"
    sign = 1.0 if mode == "max" else -1.0
    best = max(ok, key=lambda i: (sign * cands[i].mean, -i))  # the first of equal means
    b = cands[best]

    def span(c: Candidate) -> str:
        return f"{c.mean:.4g} [{c.lo:.4g}, {c.hi:.4g}]"

    overlap = [i for i in ok if i != best and _finite(cands[i].lo) and _finite(cands[i].hi) and _finite(b.lo)
               and _finite(b.hi) and cands[i].lo <= b.hi and b.lo <= cands[i].hi]
    if not overlap:
        return best, f"best mean {metric} {span(b)}; no other finalist's 95% interval overlaps it"
    size = lambda i: cands[i].num_params if cands[i].num_params else math.inf  # noqa: E731
    pick = min([best] + overlap, key=lambda i: (size(i), -sign * cands[i].mean, i))
    if pick == best:
        others = ", ".join(cands[i].label for i in overlap)
        return best, (f"best mean {metric} {span(b)}; the 95% intervals of {others} overlap it, but none has "
                      "fewer parameters")
    c = cands[pick]
    return pick, (f"fewer parameters: {c.label} ({c.num_params:,} parameters, {metric} {span(c)}) over the best "
                  f"mean {b.label} ({b.num_params or 0:,} parameters, {span(b)}): their 95% intervals overlap")


# --------------------------------------------------------------------------- before Ray: checks, finalists
def _search_run(client, exp, search: str | None):
    from e2e_search.record.store import search_run_of

    if search:
        run = search_run_of(client, exp, search)
        if run.info.status != "FINISHED":
            raise UserError(f"search run {search} has not finished (status {run.info.status}): finish it first "
                            f"(e2e-search resume {exp.name} --search {search}) or give a finished search", key="--search")
        return run
    found = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                               filter_string="tags.`e2e.kind` = 'search' and attributes.status = 'FINISHED'")
    if not found:
        raise UserError(f"experiment '{exp.name}' holds no finished search; run one first (e2e-search run FILE) or "
                        f"finish an interrupted one (e2e-search resume {exp.name})", key="EXPERIMENT")
    return found[0]


def _resolved_config(client, run):
    import yaml

    from e2e_search.spec.loader import validate

    rid = run.info.run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(client.download_artifacts(rid, "search_space.yaml", tmp)).read_text()
    except Exception:  # noqa: BLE001 - not an e2e-search search, or its artifacts are gone
        raise UserError(f"search run {rid} holds no search_space.yaml artifact (its artifacts are gone?); give "
                        "another search with --search", key="--search") from None
    return validate(yaml.safe_load(text), source=f"search_space.yaml of search run {rid}")


def _check_data(cfg, run) -> None:
    """The search's data file is still there and holds the same bytes (tag ``e2e.data_hash``)."""
    from e2e_search.data.fileid import TAG, data_hash

    path = cfg.data.path
    name = run.data.tags.get("mlflow.runName", run.info.run_id)
    if not Path(path).is_file():
        raise UserError(f"the data file of search {name}, {path}, is gone (or is not a file): its test split cannot "
                        "be scored; restore the file, or run confirm from the folder the search ran in",
                        key="data.path")
    recorded = run.data.tags.get(TAG)
    if recorded and data_hash(path) != recorded:
        raise UserError(f"{path} changed since search {name} ran (its hash is no longer {recorded}): the split "
                        "would not hold out the same test events; restore the file the search used, or run a new "
                        "search on this one", key="data.path")


def _trial_params(client, run_id: str) -> dict[str, Any]:
    import yaml

    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text())
        return dict(cfg["params"])
    except Exception:  # noqa: BLE001
        raise UserError(f"trial run {run_id} holds no readable config.yaml (its parameters); its artifacts are "
                        "gone?", key="--search") from None


def _rankings(cfg, experiment: str) -> list[tuple[str, str, str, str]]:
    """(kind, registered model, val metric, val mode) of each champion the search registers."""
    from e2e_search.record.store import champion_names

    metric, mode = cfg.metrics[0], cfg.modes[0]
    kinds = {"classification": [("classifier", metric, mode)], "regression": [("regressor", metric, mode)],
             "joint": [("classifier", metric, mode), ("regressor", "val_mae", "min")]}[cfg.task.type]
    return [(kind, champion_names(experiment, "regression" if kind == "regressor" else "classification")[0], m, o)
            for kind, m, o in kinds]


def _settings(cfg, top: int | None, seeds: int | None, per_family: bool | None) -> tuple[int, int, bool]:
    """``top``/``seeds``/``per_family`` as given, else the search's ``search.confirm`` values, else 3, 3, False."""
    conf = cfg.search.confirm
    top = top if top is not None else (conf.top if conf else DEFAULT_TOP)
    seeds = seeds if seeds is not None else (conf.seeds if conf else DEFAULT_SEEDS)
    per_family = per_family if per_family is not None else (conf.per_family if conf else False)
    return top, seeds, per_family


def _finished_trials(client, exp, sid: str) -> list[Any]:
    """The trials of search run ``sid`` that finished (MLflow status and tag ``e2e.status``)."""
    trials = client.search_runs([exp.experiment_id], max_results=5000,
                                filter_string=f"tags.`mlflow.parentRunId` = '{sid}' and tags.`e2e.kind` = 'trial'")
    return [t for t in trials if t.info.status == "FINISHED" and t.data.tags.get("e2e.status") == "FINISHED"]


def _pick(finished: list[Any], kind: str, metric: str, mode: str, top: int, per_family: bool,
          name: str) -> tuple[list[Any], str | None]:
    """(the ``top`` best of ``finished`` by ``best_<metric>`` (of each family with ``per_family``), best first;
    a note when there are fewer, else None)."""
    key = f"best_{metric}"
    scored = [t for t in finished if _finite(t.data.metrics.get(key))]
    scored.sort(key=lambda t: t.data.metrics[key], reverse=(mode == "max"))
    groups: dict[str, list] = {}
    for t in scored:
        groups.setdefault(t.data.tags.get("e2e.family", "?") if per_family else "", []).append(t)
    picked = [t for g in groups.values() for t in g[:top]]
    picked.sort(key=lambda t: t.data.metrics[key], reverse=(mode == "max"))
    if not picked:
        raise UserError(f"search {name} has no finished trial with a finite {metric}: nothing to confirm; run "
                        "a search whose trials finish", key="--search")
    short = [g for g, ts in groups.items() if len(ts) < top]
    if not short:
        return picked, None
    what = f"famil{'ies' if len(short) > 1 else 'y'} {', '.join(short)}" if per_family else "the search"
    return picked, (f"note: {what} has fewer than {top} finished trials with a finite {metric}: "
                    f"confirming {len(picked)} {kind} finalist(s)")


def _search_plan(cfg, address: str | None, sid: str, name: str):
    """The search's Plan rebuilt from its resolved YAML, with a test split to score."""
    from e2e_search.search.plan import plan

    try:
        p = plan(cfg, address=address)
    except UserError as e:
        raise e.with_source(f"search_space.yaml of search run {sid}") from None
    if p.data is None or not p.data.test:
        raise UserError(f"the test split of search {name} is empty; run a search with a larger data.test_fraction",
                        key="data.test_fraction")
    return p


def _finalists(client, cfg, chosen: list[Any]) -> list[Finalist]:
    finalists = []
    for i, t in enumerate(chosen, 1):
        m = t.data.metrics
        params = _trial_params(client, t.info.run_id)
        params.pop("seed", None)
        finalists.append(Finalist(
            position=i, run_id=t.info.run_id, trial_id=t.data.tags.get("e2e.trial_id", ""),
            family=params.get("family") or t.data.tags.get("e2e.family", "?"), params=params,
            epochs=max(1, int(m.get("best_epoch", cfg.scheduler.max_epochs))),
            val={k[5:]: v for k, v in m.items() if k.startswith("best_val_")},
            num_params=int(m["num_params"]) if _finite(m.get("num_params")) else None))
    return finalists


def prepare(uri: str, experiment: str, *, search: str | None = None, top: int | None = None,
            seeds: int | None = None, per_family: bool | None = None, address: str | None = None) -> ConfirmPlan:
    """Everything ``confirm`` checks before Ray starts; writes nothing. ``top``/``seeds``/``per_family`` None:
    the search's ``search.confirm`` values, else 3, 3 and False. Raises UserError (one line) on bad input."""
    from mlflow.tracking import MlflowClient

    from e2e_search.record.store import experiment_of

    for flag, v in (("--top", top), ("--seeds", seeds)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be 1 or more (got {v}); e.g. {flag} 3", key=flag)
    client = MlflowClient(tracking_uri=uri)
    exp = experiment_of(client, experiment)
    run = _search_run(client, exp, search)
    sid, name = run.info.run_id, run.data.tags.get("mlflow.runName", run.info.run_id)
    cfg = _resolved_config(client, run)
    cfg.tracking.uri = uri
    top, seeds, per_family = _settings(cfg, top, seeds, per_family)
    if cfg.data.test_fraction == 0:
        raise UserError(f"search {name} held out no test split (data.test_fraction: 0): there is nothing to score; "
                        "run a search with data.test_fraction > 0 (e.g. 0.15)", key="data.test_fraction")

    finished = _finished_trials(client, exp, sid)
    notes: list[str] = []
    chosen: list[Any] = []
    members: list[list[str]] = []
    specs = _rankings(cfg, cfg.tracking.experiment)
    for kind, _, metric, mode in specs:
        picked, note = _pick(finished, kind, metric, mode, top, per_family, name)
        if note:
            notes.append(note)
        members.append([t.info.run_id for t in picked])
        for t in picked:
            if t.info.run_id not in {c.info.run_id for c in chosen}:
                chosen.append(t)
    _check_data(cfg, run)
    p = _search_plan(cfg, address, sid, name)
    finalists = _finalists(client, cfg, chosen)
    index = {f.run_id: i for i, f in enumerate(finalists)}
    rankings = []
    for (kind, model, metric, mode), ids in zip(specs, members):
        tm, tmode = champion_metric(kind, metric)
        rankings.append(Ranking(kind, model, metric, mode, tm, tmode, [index[r] for r in ids]))
    if not run.data.tags.get("e2e.data_hash"):
        notes.append(f"note: search {name} recorded no data hash (it predates them): the data file {cfg.data.path} "
                     "cannot be checked against the one it used")
    return ConfirmPlan(uri=uri, experiment=experiment, search_id=sid, search_name=name, plan=p, finalists=finalists,
                       rankings=rankings, seeds=list(range(1, seeds + 1)), top=top, per_family=per_family, notes=notes)


def describe(cp: ConfirmPlan) -> str:
    lines = [f"confirm search {cp.search_name}: {len(cp.finalists)} finalist(s) x {len(cp.seeds)} seed(s) "
             f"(seeds {', '.join(map(str, cp.seeds))}), scored once on {len(cp.plan.data.test)} test events"]
    for f in cp.finalists:
        vals = ", ".join(f"{r.val_metric}={f.val.get(r.val_metric, float('nan')):.4g}" for r in cp.rankings)
        lines.append(f"  {f.label:<18} trial {f.trial_id:<12} {vals}, best at epoch {f.epochs}")
    return "\n".join(lines)


@dataclass
class ConfirmOutcome:
    confirm_id: str
    summary: str
    champions: dict[str, str]
    """registered model -> the seed run its new version comes from."""
    failed: int
    finished: int


class ConfirmFailed(RuntimeError):
    """No retraining finished: nothing to choose from (the reasons are in the seed runs' ``e2e.error``)."""


