"""Trial parameters: the training schema, checks against a family, the Optuna space.

``params`` in the YAML mixes training hyperparameters (``TrainParams``) and the
family's own (``Family.params``). Each name must belong to one of them; fixed
values and the ends/values of every dimension are type-checked up front.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ValidationError

from e2e_search.spec.dims import (
    ChoiceDim,
    FixedDim,
    GridDim,
    LogUniformDim,
    QUniformDim,
    RandIntDim,
    UniformDim,
    dim_values,
)
from e2e_search.spec.schema import SearchSpace
from trainables.errors import UserError, did_you_mean, error_text
from trainables.params import TrainParams
from trainables.registry import family_names, get_family


def search_dims(cfg: SearchSpace) -> dict[str, Any]:
    """The dimensions the sampler draws: ``family`` first when the search is over families, then ``params``."""
    dims: dict[str, Any] = {}
    if not isinstance(cfg.family, str):
        values = list(cfg.family.values)
        dims["family"] = (GridDim(type="grid", values=values) if cfg.family.type == "grid"
                          else ChoiceDim(type="choice", values=values))
    dims.update(cfg.params)
    return dims


def param_owners(cfg: SearchSpace) -> dict[str, list[tuple[type[BaseModel], Any, str | None]]]:
    """name -> [(pydantic model, field, owning family or None for training)] over every family searched."""
    fields: dict[str, list] = {n: [(TrainParams, f, None)] for n, f in TrainParams.model_fields.items()}
    for fam_name in cfg.families:
        fam = get_family(fam_name)
        for name, f in fam.params.model_fields.items():
            fields.setdefault(name, []).append((fam.params, f, fam_name))
    return fields


def _check_value(model: type[BaseModel], name: str, value: Any) -> str | None:
    """None when ``value`` is valid for field ``name`` of ``model``, else the reason and the fix."""
    defaults = {k: f.default for k, f in model.model_fields.items() if not f.is_required()}
    try:
        model.model_validate({**defaults, name: value})
    except ValidationError as e:
        err = next((x for x in e.errors() if x["loc"] and x["loc"][0] == name), e.errors()[0])
        return error_text(cast("dict[str, Any]", err), f"params.{name}")  # a TypedDict, read as a dict
    return None


def _check_families(cfg: SearchSpace) -> None:
    if isinstance(cfg.family, str):
        get_family(cfg.family)
        return
    seen: dict[str, str] = {}
    for i, name in enumerate(cfg.family.values):
        try:
            inputs = get_family(name).inputs
        except UserError as e:
            raise UserError(e.message.replace("set family to", f"set family.values.{i} to"),
                            key=f"family.values.{i}") from None
        if name in seen:
            raise UserError(f"family '{name}' is listed twice; list each once", key=f"family.values.{i}")
        first = next(iter(seen.items()), None)
        if first and get_family(first[0]).inputs != inputs:
            raise UserError(f"'{name}' takes {inputs} but '{first[0]}' takes {first[1]}: one search compares "
                            f"families of one input kind (the data file holds one); remove '{name}' or "
                            f"'{first[0]}' from family.values", key=f"family.values.{i}")
        seen[name] = inputs


def _listed(wanted: Any) -> list[Any]:
    return list(wanted) if isinstance(wanted, list) else [wanted]


def _families_of(dim: Any) -> set[str] | None:
    """The families a ``when: {family: ...}`` condition gives a parameter to (None: no such condition)."""
    when = dim.when or {}
    return set(_listed(when["family"])) if "family" in when else None


def _check_conditions(name: str, dim: Any, dims: dict[str, Any], fields: dict[str, list]) -> None:
    """A condition must name a parameter of the search, and values that parameter's schema accepts (a value
    it cannot take at all is a typo). A valid value it merely no longer takes (a --set narrowed it) is not an
    error: the parameter is then inactive (:func:`never_active`)."""
    for other, wanted in (dim.when or {}).items():
        ckey = f"params.{name}.when.{other}"
        if other == "family" and other not in dims:
            raise UserError("a condition on family needs a search over families (family: {type: choice, values: "
                            "[...]}); remove the condition or make family a choice", key=ckey)
        if other not in dims:
            raise UserError(f"condition on '{other}', which is not in params{did_you_mean(other, dims)}; add "
                            f"params.{other} or fix the name in the condition", key=ckey)
        odim = dims[other]
        if not isinstance(odim, ChoiceDim | GridDim | FixedDim):
            raise UserError(f"conditions must name a choice, grid or fixed parameter; '{other}' is {odim.type}: "
                            f"make params.{other} a choice or remove the condition", key=ckey)
        for w in _listed(wanted):
            if other == "family":
                possible = w in family_names()  # a YAML may name families a --set has taken out of the list
            else:
                owners = fields.get(other, [])
                possible = not owners or any(_check_value(m, other, w) is None for m, _, _ in owners)
            if not possible:
                values = family_names() if other == "family" else dim_values(odim)
                hint = did_you_mean(str(w), [str(v) for v in values]) if isinstance(w, str) else ""
                raise UserError(f"'{other}' never takes the value {w!r}{hint} (its values: {values}); fix the "
                                f"value in the condition", key=ckey)


def never_active(cfg: SearchSpace) -> dict[str, tuple[str, str]]:
    """Conditional parameters whose condition can no longer hold (a ``--set`` narrowed the parameter it names,
    e.g. ``attention=softmax`` under ``window_size: {when: {attention: window}}``), each with the reason. They
    are never drawn: the family default applies. name -> (the condition's parameter, why)."""
    dims = search_dims(cfg)
    fields = param_owners(cfg)
    out: dict[str, tuple[str, str]] = {}
    for name in cfg.params:
        if name not in fields:  # only of families a --set took out of the list (check_params refuses others)
            owners = [f for f in family_names() if name in get_family(f).params.model_fields]
            out[name] = ("family", f"it is a parameter of {', '.join(owners)}, which this search no longer includes")
    for name in condition_order(dims):  # conditions first
        if name in out:
            continue
        for other, wanted in (dims[name].when or {}).items():
            if other in out:
                out[name] = (other, f"its condition's parameter '{other}' is itself ignored")
                break
            values = dim_values(dims[other])
            if not any(w in values for w in _listed(wanted)):
                shown = wanted if not isinstance(wanted, list) or len(wanted) > 1 else wanted[0]
                out[name] = (other, f"its condition {other}: {shown} never holds ('{other}' takes {values})")
                break
    return out


def check_params(cfg: SearchSpace) -> list[tuple[str, str]]:
    """Check ``params`` against the families and training schema; returns notes (inactive parameters) as
    (the key that caused it, text)."""
    _check_families(cfg)
    fields = param_owners(cfg)
    dims = search_dims(cfg)
    multi = not isinstance(cfg.family, str)
    fam_text = f"family '{cfg.family}'" if not multi else f"any of the families {cfg.families}"
    for name, dim in cfg.params.items():
        _check_param(name, dim, dims, fields, multi, fam_text)
    _check_loss(cfg)
    _check_pretrained(cfg)
    _check_pretrain_epochs(cfg)
    condition_order(dims)
    _check_grid_size(cfg)
    return _inactive_notes(cfg)


def _check_param(name: str, dim: Any, dims: dict[str, Any], fields: dict[str, list], multi: bool,
                 fam_text: str) -> None:
    """One entry of ``params``: its name, its values against each schema that takes it, its conditions."""
    key = f"params.{name}"
    if name == "family":
        raise UserError("'family' is searched through the top-level family key "
                        "(family: {type: choice, values: [...]}); remove it from params", key=key)
    if name not in fields and multi and any(name in get_family(f).params.model_fields for f in family_names()):
        return  # a parameter of a family a --set took out of the list: never drawn (never_active says so)
    if name not in fields:
        raise UserError(f"'{name}' is not a parameter of {fam_text} or of training{did_you_mean(name, fields)}; "
                        "remove it or fix its name (docs/search_space.md lists each family's parameters)", key=key)
    _check_dim_values(name, dim, fields[name], multi)
    _check_conditions(name, dim, dims, fields)


def _check_dim_values(name: str, dim: Any, owners: list, multi: bool) -> None:
    """Every value ``dim`` can give ``name`` must be valid in each schema (training's, a family's) it is given to."""
    key = f"params.{name}"
    given_to = _families_of(dim)
    for model, field, fam in owners:
        if fam is not None and given_to is not None and fam not in given_to:
            continue  # when: {family: ...} keeps it from this family's trials
        if isinstance(dim, QUniformDim) and field.annotation is int and not (
                float(dim.q).is_integer() and float(dim.low).is_integer()):
            raise UserError(f"'{name}' takes whole numbers, but quniform steps from {dim.low:g} by q {dim.q:g} "
                            f"give fractions; set q and low to whole numbers (or use randint)", key=f"{key}.q")
        for v in dim_values(dim):
            if isinstance(dim, RandIntDim | UniformDim | LogUniformDim | QUniformDim) and field.annotation is int:
                v = int(v) if float(v).is_integer() else v
            reason = _check_value(model, name, v)
            if reason:
                raise UserError(_value_refused(name, v, reason, fam, owners, multi), key=key)


def _value_refused(name: str, v: Any, reason: str, fam: str | None, owners: list, multi: bool) -> str:
    """The message for value ``v`` of ``name`` refused by the schema of ``fam`` (None: training) for ``reason``."""
    if "(got " not in reason:
        reason = f"{reason} (got {v!r})"
    if fam is not None and multi:  # each family has its own schema of this name
        fits = [o for m, _, o in owners if o not in (None, fam) and _check_value(m, name, v) is None]
        reason = f"family '{fam}' does not take {v!r}: {reason}" + (
            f", or give params.{name} only to the families it fits ({', '.join(fits)}) with "
            f"when: {{family: [...]}}" if fits else "")
    return reason


def _check_loss(cfg: SearchSpace) -> None:
    loss = cfg.params.get("loss")
    losses = {"classification": {"auto", "cross_entropy"}, "regression": {"auto", "mse", "huber", "relative"},
              "joint": {"auto", "mse", "huber", "relative"}}[cfg.task.type]
    for v in dim_values(loss) if loss is not None else []:
        if v not in losses:
            raise UserError(f"loss '{v}' does not fit a {cfg.task.type} task; set params.loss to one of "
                            f"{sorted(losses)}", key="params.loss")


def _check_pretrained(cfg: SearchSpace) -> None:
    """Every ``pretrained`` checkpoint must exist; their paths are made absolute in ``cfg``."""
    pretrained = cfg.params.get("pretrained")
    for v in dim_values(pretrained) if pretrained is not None else []:
        if v is not None and not Path(v).is_file():
            raise UserError(f"checkpoint '{v}' not found; give the path of a checkpoint.pt (e.g. a trial's "
                            "best_checkpoint/checkpoint.pt artifact)", key="params.pretrained")
    if pretrained is not None:  # workers run elsewhere (trial folders, other nodes): absolute paths
        if isinstance(pretrained, FixedDim) and pretrained.value is not None:
            pretrained.value = str(Path(pretrained.value).resolve())
        elif isinstance(pretrained, ChoiceDim | GridDim):
            pretrained.values = [v if v is None else str(Path(v).resolve()) for v in pretrained.values]


def _check_pretrain_epochs(cfg: SearchSpace) -> None:
    pre = cfg.params.get("pretrain_epochs")
    if pre is None:  # the family's default applies
        pre = FixedDim(value=max((get_family(f).params.model_fields["pretrain_epochs"].default for f in cfg.families
                                  if "pretrain_epochs" in get_family(f).params.model_fields), default=0))
    for v in dim_values(pre):
        if int(v) >= cfg.scheduler.max_epochs:
            raise UserError(f"pretrain_epochs {v} leaves no epoch to train on the task (scheduler.max_epochs is "
                            f"{cfg.scheduler.max_epochs}); lower params.pretrain_epochs below "
                            f"{cfg.scheduler.max_epochs} or raise scheduler.max_epochs",
                            key="params.pretrain_epochs")


def _check_grid_size(cfg: SearchSpace) -> None:
    combos = len(grid_points(cfg))
    if combos > cfg.search.num_samples:
        raise UserError(
            f"{combos} grid combinations but num_samples is {cfg.search.num_samples}; raise search.num_samples to at "
            f"least {combos} (--set search.num_samples={combos}) or turn a grid into a choice",
            key="search.num_samples",
        )


def _inactive_notes(cfg: SearchSpace) -> list[tuple[str, str]]:
    """A note for each parameter that is never drawn (:func:`never_active`): (the key to widen, text)."""
    notes = []
    for n, (other, why) in never_active(cfg).items():
        widen = "family" if other == "family" else f"params.{other}"
        fix = (f"widen {widen} to use it, or remove params.{n}" if why.startswith("it is a parameter of") else
               f"remove its 'when' or widen {widen} to use it")
        notes.append((widen, f"params.{n} is ignored: {why}; {fix}"))
    return notes


def condition_order(params: dict[str, Any]) -> list[str]:
    """Parameter names ordered so every condition comes after what it depends on."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, chain: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise UserError(f"conditions form a cycle: {' -> '.join(chain + [n])}; remove one of these conditions",
                            key=f"params.{n}.when")
        state[n] = 1
        for dep in (params[n].when or {}):
            visit(dep, chain + [n])
        state[n] = 2
        order.append(n)

    for n in params:
        visit(n, [])
    return order


def grid_points(cfg: SearchSpace) -> list[dict[str, Any]]:
    """Every combination of the ``grid`` dimensions (queued before the sampler's picks). A grid parameter
    whose ``when`` names another grid parameter is left out of the combinations where that condition fails,
    and combinations that become equal are queued once: ``pretrain_epochs: grid [0, 2]`` with ``mask_ratio:
    {type: grid, values: [0.15, 0.5], when: {pretrain_epochs: 2}}`` gives 3 points, not 4."""
    ignored = never_active(cfg)
    dims = search_dims(cfg)
    grids = {n: d.values for n, d in dims.items() if isinstance(d, GridDim) and n not in ignored}
    if not grids:
        return []
    names = list(grids)
    order = [n for n in condition_order(dims) if n in grids]
    out: list[dict[str, Any]] = []
    for combo in itertools.product(*(grids[n] for n in names)):
        point = dict(zip(names, combo))
        for n in order:  # conditions first: a dropped parameter also drops what depends on it
            for other, wanted in (dims[n].when or {}).items():
                if other in grids and (other not in point or point[other] not in
                                       (wanted if isinstance(wanted, list) else [wanted])):
                    point.pop(n, None)
        point = {n: point[n] for n in names if n in point}
        if point not in out:
            out.append(point)
    return out


def is_active(dim: Any, chosen: dict[str, Any]) -> bool:
    for other, wanted in (dim.when or {}).items():
        if other not in chosen:
            return False
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if chosen[other] not in allowed:
            return False
    return True


def is_categorical(values: list[Any]) -> bool:
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in values)


class OptunaSpace:
    """An Optuna define-by-run space for ``OptunaSearch(space=...)`` (picklable: Tune saves the searcher).

    Inactive conditional parameters are never suggested, so they appear
    neither in the trial's config nor in its MLflow params.
    """

    def __init__(self, cfg: SearchSpace):
        self.params = search_dims(cfg)
        self.order = condition_order(self.params)
        schemas = param_owners(cfg)
        self.int_fields = {n for n, owners in schemas.items() if any(f.annotation is int for _, f, _ in owners)}
        # Searching over families: a family's own parameter is drawn only in that family's trials.
        self.owners = {n: {fam for _, _, fam in owners} for n, owners in schemas.items()}
        self.family = cfg.family if isinstance(cfg.family, str) else None

    def _applies(self, name: str, chosen: dict[str, Any]) -> bool:
        if name == "family":
            return True
        owners = self.owners.get(name, set())  # none: a parameter only of families not searched
        return None in owners or (self.family or chosen.get("family")) in owners

    def __call__(self, trial) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for name in self.order:
            dim = self.params[name]
            if not is_active(dim, chosen) or not self._applies(name, chosen):
                continue
            if isinstance(dim, FixedDim):
                value = fixed[name] = dim.value
            elif isinstance(dim, ChoiceDim | GridDim):
                if is_categorical(dim.values):
                    value = trial.suggest_categorical(name, dim.values)
                else:  # lists etc.: suggest the index, return the value
                    idx = trial.suggest_categorical(f"{name}__index", list(range(len(dim.values))))
                    value = fixed[name] = dim.values[idx]
            elif isinstance(dim, RandIntDim):
                value = trial.suggest_int(name, dim.low, dim.high)
            elif isinstance(dim, QUniformDim):
                steps = math.floor((dim.high - dim.low) / dim.q + 1e-9)
                value = round(dim.low + dim.q * trial.suggest_int(f"{name}__step", 0, steps), 12)
                if name in self.int_fields and float(value).is_integer():
                    value = int(value)
                fixed[name] = value
            else:
                value = trial.suggest_float(name, dim.low, dim.high, log=isinstance(dim, LogUniformDim))
                if name in self.int_fields:
                    value = fixed[name] = int(round(value))
            chosen[name] = value
        return fixed








