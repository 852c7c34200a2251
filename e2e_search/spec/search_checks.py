"""What the chosen sampler and scheduler cannot do with a search space (``search.algorithm``,
``scheduler.type``), refused before Ray starts; the samplers and schedulers themselves are in
e2e_search/search/algorithms.py."""

from __future__ import annotations

from typing import Any

from e2e_search.spec.dims import ChoiceDim, FixedDim, GridDim, LogUniformDim, UniformDim
from e2e_search.spec.params import never_active, param_owners, search_dims
from e2e_search.spec.schema import SearchSpace
from trainables.errors import UserError

# The training parameters PBT may change mid-trial: they take effect without rebuilding the model's shape.
PBT_PARAMS = ("lr", "weight_decay", "drop_path")



def searched(cfg: SearchSpace) -> dict[str, Any]:
    """The dimensions the sampler draws (inactive conditional ones left out)."""
    ignored = never_active(cfg)
    return {n: d for n, d in search_dims(cfg).items() if n not in ignored}



def pbt_dims(cfg: SearchSpace) -> dict[str, UniformDim | LogUniformDim]:
    """The continuous training parameters PBT mutates: ``lr``, ``weight_decay``, ``drop_path`` where the YAML
    makes them uniform/loguniform dimensions without a condition that every trial of the search takes."""
    owners = param_owners(cfg)
    out = {}
    for name in PBT_PARAMS:
        dim = searched(cfg).get(name)
        if not isinstance(dim, UniformDim | LogUniformDim) or dim.when:
            continue
        fams = {fam for _, _, fam in owners.get(name, [])}
        if None in fams or set(cfg.families) <= fams:
            out[name] = dim
    return out



def check_search(cfg: SearchSpace) -> list[tuple[str, str]]:
    """What the chosen sampler and scheduler cannot do with this space, refused before Ray starts; returns notes
    as (key, text).

    Raises:
        UserError: cmaes with a categorical dimension (names it, suggests tpe); pbt with several metrics or
        without a continuous lr / weight_decay / drop_path dimension."""
    algo, sched = cfg.search.algorithm, cfg.scheduler.type
    dims = searched(cfg)
    notes: list[tuple[str, str]] = []
    if algo == "cmaes":
        # every categorical dimension at once, so that fixing them takes one edit, not one run each
        cats = {("family" if name == "family" else f"params.{name}"): dim for name, dim in dims.items()
                if isinstance(dim, ChoiceDim | GridDim) and len(dim.values) > 1}
        if cats:
            listed = ", ".join(f"{key} (a {dim.type} of {len(dim.values)} values)" for key, dim in cats.items())
            first = next(iter(cats))
            raise UserError(f"CMA-ES samples numeric dimensions only; categorical here: {listed}. Set "
                            f"search.algorithm: tpe (or gp, which takes categorical dimensions), or fix "
                            f"{'it' if len(cats) == 1 else 'each'} to one value", key=first)
    if algo in ("gp", "cmaes", "qmc"):
        cond = [n for n, d in dims.items() if getattr(d, "when", None) and not isinstance(d, FixedDim)]
        if cond:
            notes.append((f"params.{cond[0]}", f"{algo} models only the dimensions every trial has: the conditional "
                                                f"{', '.join('params.' + n for n in cond)} are drawn at random; use "
                                                "search.algorithm: tpe to model them too"))
    if cfg.search.optuna_storage and sched == "pbt":
        raise UserError("PBT draws its population up front and keeps no Optuna study to store; remove "
                        "search.optuna_storage or set scheduler.type: asha", key="search.optuna_storage")
    if sched == "pbt":
        if len(cfg.metrics) > 1:
            raise UserError("PBT ranks trials by one metric; give one search.metric (and search.algorithm: tpe) "
                            "or set scheduler.type: asha for a multi-objective search", key="scheduler.type")
        if not pbt_dims(cfg):
            raise UserError(f"PBT mutates continuous training parameters ({', '.join(PBT_PARAMS)}) and this search "
                            "has none as a uniform/loguniform dimension that every trial takes; add one (e.g. "
                            "params.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}) or set scheduler.type: asha",
                            key="scheduler.type")
        if cfg.resources.workers != 1 or cfg.resources.runner != "auto":
            raise UserError("PBT restores one trial's checkpoint into another through the Tune trial's own process; "
                            "set resources.workers: 1 and resources.runner: auto (or set scheduler.type: asha)",
                            key="resources.workers" if cfg.resources.workers != 1 else "resources.runner")
        if cfg.search.max_concurrent == 1 or cfg.search.num_samples < 2:
            raise UserError("PBT copies weights between trials that train side by side; set search.num_samples "
                            "and search.max_concurrent to 2 or more (or set scheduler.type: asha)",
                            key="search.num_samples" if cfg.search.num_samples < 2 else "search.max_concurrent")
    return notes
