"""Trial parameters: the training schema, checks against a family, the Optuna space.

``params`` in the YAML mixes training hyperparameters (``TrainParams``) and the
family's own (``Family.params``). Each name must belong to one of them; fixed
values and the ends/values of every dimension are type-checked up front.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ChoiceDim, FixedDim, GridDim, LogUniformDim, QUniformDim, RandIntDim, SearchSpace, UniformDim, dim_values
from .errors import UserError, did_you_mean
from .registry import get_family


class TrainParams(BaseModel):
    """Training hyperparameters every family shares."""

    model_config = ConfigDict(extra="ignore")

    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    batch_size: int = Field(default=64, gt=0)
    warmup_epochs: int = Field(default=0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)
    """Max gradient norm (0 turns clipping off)."""
    loss: Literal["auto", "cross_entropy", "mse", "huber", "relative"] = "auto"
    """auto: cross_entropy for classification, mse for regression."""
    seed: int = 0


def _schemas(cfg: SearchSpace) -> dict[str, Any]:
    fam = get_family(cfg.family)
    fields: dict[str, Any] = {}
    for model in (TrainParams, fam.params):
        for name, f in model.model_fields.items():
            fields[name] = (model, name, f)
    return fields


def _check_value(model: type[BaseModel], name: str, value: Any) -> str | None:
    """None when ``value`` is valid for field ``name`` of ``model``, else the reason."""
    defaults = {k: f.default for k, f in model.model_fields.items() if not f.is_required()}
    try:
        model.model_validate({**defaults, name: value})
    except ValidationError as e:
        for err in e.errors():
            if err["loc"] and err["loc"][0] == name:
                return err["msg"].removeprefix("Value error, ")
        return e.errors()[0]["msg"]
    return None


def check_params(cfg: SearchSpace) -> None:
    fields = _schemas(cfg)
    for name, dim in cfg.params.items():
        key = f"params.{name}"
        if name not in fields:
            raise UserError(
                f"'{name}' is not a parameter of family '{cfg.family}' or of training{did_you_mean(name, fields)}",
                key=key,
            )
        model, _, _ = fields[name]
        for v in dim_values(dim):
            if isinstance(dim, RandIntDim | UniformDim | LogUniformDim | QUniformDim) and model.model_fields[name].annotation is int:
                v = int(v) if float(v).is_integer() else v
            reason = _check_value(model, name, v)
            if reason:
                raise UserError(f"{reason} (got {v!r}); fix the value", key=key)
        for other, wanted in (dim.when or {}).items():
            ckey = f"{key}.when.{other}"
            if other not in cfg.params:
                raise UserError(f"condition on '{other}', which is not in params{did_you_mean(other, cfg.params)}", key=ckey)
            odim = cfg.params[other]
            if not isinstance(odim, ChoiceDim | GridDim | FixedDim):
                raise UserError(f"conditions must name a choice, grid or fixed parameter; '{other}' is {odim.type}", key=ckey)
            allowed = dim_values(odim)
            for w in wanted if isinstance(wanted, list) else [wanted]:
                if w not in allowed:
                    raise UserError(f"'{other}' never takes the value {w!r} (its values: {allowed})", key=ckey)
    loss = cfg.params.get("loss")
    fits = {"classification": {"auto", "cross_entropy"}, "regression": {"auto", "mse", "huber", "relative"}}[cfg.task.type]
    for v in dim_values(loss) if loss is not None else []:
        if v not in fits:
            raise UserError(f"loss '{v}' does not fit a {cfg.task.type} task; use one of {sorted(fits)}", key="params.loss")
    _condition_order(cfg.params)
    combos = len(grid_points(cfg))
    if combos > cfg.search.num_samples:
        raise UserError(
            f"{combos} grid combinations but num_samples is {cfg.search.num_samples}; raise num_samples to at least {combos}",
            key="search.num_samples",
        )


def _condition_order(params: dict[str, Any]) -> list[str]:
    """Parameter names ordered so every condition comes after what it depends on."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, chain: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise UserError(f"conditions form a cycle: {' -> '.join(chain + [n])}", key=f"params.{n}.when")
        state[n] = 1
        for dep in (params[n].when or {}):
            visit(dep, chain + [n])
        state[n] = 2
        order.append(n)

    for n in params:
        visit(n, [])
    return order


def grid_points(cfg: SearchSpace) -> list[dict[str, Any]]:
    """Every combination of the ``grid`` dimensions (queued before the sampler's picks)."""
    grids = {n: d.values for n, d in cfg.params.items() if isinstance(d, GridDim)}
    if not grids:
        return []
    names = list(grids)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grids[n] for n in names))]


def _active(dim: Any, chosen: dict[str, Any]) -> bool:
    for other, wanted in (dim.when or {}).items():
        if other not in chosen:
            return False
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if chosen[other] not in allowed:
            return False
    return True


def _categorical(values: list[Any]) -> bool:
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in values)


class OptunaSpace:
    """An Optuna define-by-run space for ``OptunaSearch(space=...)`` (picklable: Tune saves the searcher).

    Inactive conditional parameters are never suggested, so they appear
    neither in the trial's config nor in its MLflow params.
    """

    def __init__(self, cfg: SearchSpace):
        self.params = dict(cfg.params)
        self.order = _condition_order(self.params)
        self.int_fields = {n for n, (m, _, f) in _schemas(cfg).items() if f.annotation is int}

    def __call__(self, trial) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for name in self.order:
            dim = self.params[name]
            if not _active(dim, chosen):
                continue
            if isinstance(dim, FixedDim):
                value = fixed[name] = dim.value
            elif isinstance(dim, ChoiceDim | GridDim):
                if _categorical(dim.values):
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


def split_params(cfg_family: str, params: dict[str, Any]) -> tuple[TrainParams, BaseModel]:
    """Trial params → (training params, family params), defaults filled in."""
    fam = get_family(cfg_family)
    clean = {k: v for k, v in params.items() if "__" not in k}
    return TrainParams.model_validate(clean), fam.params.model_validate(
        {k: v for k, v in clean.items() if k in fam.params.model_fields}
    )


def public_params(params: dict[str, Any]) -> dict[str, Any]:
    """The trial's parameters without Optuna's helper entries (``name__index`` ...)."""
    return {k: v for k, v in params.items() if "__" not in k}


