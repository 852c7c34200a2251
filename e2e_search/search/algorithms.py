"""Which sampler draws the trials and which scheduler stops, pauses or perturbs them (``search.algorithm``,
``scheduler.type``); docs/search_space.md, "Searchers and schedulers", says when to use which.

Everything a searcher or scheduler cannot handle is refused by :func:`check_search` before Ray starts (one
line naming the key and the fix). The samplers are Optuna's, behind Ray's ``OptunaSearch``; the schedulers
are Ray Tune's. ``scheduler.type: pbt`` cannot run with a Tune searcher (Ray refuses the pair): its initial
population is drawn up front by the same Optuna sampler (:func:`initial_population`, grid points first) and
handed to Tune as fixed configurations; PBT then mutates the continuous training parameters
(:data:`PBT_PARAMS`) within their YAML ranges.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from e2e_search.spec.dims import LogUniformDim
from e2e_search.spec.params import OptunaSpace, grid_points
from e2e_search.spec.schema import SearchSpace
from e2e_search.spec.search_checks import pbt_dims
from trainables.params import ABSENT, MEMBER

if TYPE_CHECKING:
    import optuna

# Samplers that learn from finished trials and so can take an earlier search's results as prior observations.
LEARNING_SAMPLERS = {"tpe", "gp"}


def startup_trials(num_samples: int) -> int:
    """Random trials before a model-based sampler (tpe, gp) starts modelling: a third of the search, 2 to 10."""
    return min(10, max(2, num_samples // 3))


def _picklable(cls: type) -> type:
    """``cls`` (an Optuna sampler) with a pickle that leaves out its ``_thread_lock`` and makes a new one when
    unpickled: Optuna 5.1's NSGA-II sampler holds a threading lock, and Ray Tune pickles the searcher (``Tuner``,
    its experiment state). Samplers without one pickle as before."""
    import threading

    def getstate(self):
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def setstate(self, state):
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()

    return type(f"Picklable{cls.__name__}", (cls,), {"__getstate__": getstate, "__setstate__": setstate,
                                                       "__module__": __name__})


def __getattr__(name: str):
    """``PicklableNSGAIISampler``, made on first use (Optuna is imported only when a search needs it); pickles
    find it here by name in any process."""
    if name == "PicklableNSGAIISampler":
        import optuna

        if name not in globals():
            globals()[name] = _picklable(optuna.samplers.NSGAIISampler)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sampler(cfg: SearchSpace, after: int = 0):
    """The Optuna sampler of ``search.algorithm``, seeded with ``search.seed``.

    ``after``: how many trials the study holds or runs before this search's own draws (a warm start's prior
    observations and queued points). tpe and gp still draw their :func:`startup_trials` random trials after
    those, as a cold search does: Optuna counts every completed trial of the study towards ``n_startup_trials``,
    and a sampler that starts modelling at once keeps to the earlier search's best region, blind spots included.

    gp, cmaes and qmc model only the dimensions every trial has: conditional (``when``) ones are drawn at random
    (Optuna's independent sampler; :func:`check_search` notes it); their per-trial warnings are turned off."""
    import optuna

    seed = cfg.search.seed
    startup = startup_trials(cfg.search.num_samples) + after
    make = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "nsga2": lambda: __getattr__("PicklableNSGAIISampler")(seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup,
                                                warn_independent_sampling=False),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "qmc": lambda: optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                                  warn_independent_sampling=False),
    }
    with warnings.catch_warnings():  # QMCSampler (and, by Optuna version, others) warns it is experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return make[cfg.search.algorithm]()








# --------------------------------------------------------------------------- searcher
def searcher(cfg: SearchSpace, warm=None, study_name: str | None = None):
    """Ray's ``OptunaSearch`` over the define-by-run :class:`OptunaSpace`: grid points first, then ``warm``'s
    points (a :class:`~e2e_search.search.warm_start.WarmStart`), then the sampler's picks. For tpe and gp ``warm``'s
    earlier results are also added to the study as completed trials (prior observations). With
    ``search.optuna_storage`` the study is kept in that RDB storage as ``study_name``."""
    from e2e_search.search.optuna_search import ResumableOptunaSearch

    assert cfg.search.metric is not None and cfg.search.mode is not None  # filled in by SearchSpace's validator
    metric = cfg.search.metric if isinstance(cfg.search.metric, str) else list(cfg.search.metric)
    mode: str | list[str] = cfg.search.mode if isinstance(cfg.search.mode, str) else list(cfg.search.mode)
    points = grid_points(cfg) + (list(warm.points) if warm is not None else [])
    learned = observations(OptunaSpace(cfg), warm.observed) \
        if warm is not None and cfg.search.algorithm in LEARNING_SAMPLERS else []
    after = len(learned) + len(warm.points) if learned else 0
    storage = None
    if cfg.search.optuna_storage:
        import optuna
        from sqlalchemy.engine import make_url

        url = make_url(cfg.search.optuna_storage)
        if url.get_backend_name() == "sqlite" and url.database:  # its folder, checked writable before Ray
            Path(url.database).resolve().parent.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.RDBStorage(cfg.search.optuna_storage)
    search = ResumableOptunaSearch(space=OptunaSpace(cfg), metric=metric, mode=mode, sampler=sampler(cfg, after),
                          points_to_evaluate=points or None, storage=storage,
                          study_name=study_name if storage is not None else None)
    # The study exists once OptunaSearch has a space; Ray types the attribute by its initial None.
    cast("optuna.study.Study", search._ot_study).add_trials(learned)
    return search


def observations(space: OptunaSpace, observed: list[tuple[dict[str, Any], float]]) -> list:
    """Earlier (point, value) results as completed Optuna trials, to add to a study as prior observations
    (``OptunaSearch(evaluated_rewards=)`` refuses define-by-run spaces); a point lacking a value the space needs
    is left out (it is only queued)."""
    import optuna
    from optuna.trial import FixedTrial, create_trial

    out = []
    for point, value in observed:
        fixed = FixedTrial(point)
        try:
            space(fixed)
        except ValueError:  # a dimension the earlier search did not have: only queued, not observed
            continue
        out.append(create_trial(params=fixed.params, distributions=fixed.distributions, value=float(value),
                                state=optuna.trial.TrialState.COMPLETE))
    return out


def initial_population(cfg: SearchSpace, warm=None) -> list[dict[str, Any]]:
    """PBT's ``num_samples`` starting configurations, drawn by ``search.algorithm``'s sampler without results
    (model-based samplers are then in their start-up phase): grid points first, then ``warm``'s points."""
    import optuna

    space = OptunaSpace(cfg)
    study = optuna.create_study(direction="maximize" if cfg.modes[0] == "max" else "minimize", sampler=sampler(cfg))
    for point in grid_points(cfg) + (list(warm.points) if warm is not None else []):
        study.enqueue_trial(point)
    out = []
    for _ in range(cfg.search.num_samples):
        trial = study.ask()
        fixed = space(trial)  # suggests first: trial.params is filled by it
        out.append({**trial.params, **fixed})
    return out




class _Member:
    """``tune.sample_from``: parameter ``key`` of population member ``config[MEMBER]`` (picklable)."""

    def __init__(self, population: list[dict[str, Any]], key: str):
        self.population, self.key = population, key

    def __call__(self, config):
        return self.population[config[MEMBER]].get(self.key, ABSENT)


def pbt_param_space(population: list[dict[str, Any]]) -> dict[str, Any]:
    """Tune's ``param_space`` for PBT: one grid point per member of ``population`` (so ``num_samples`` is 1),
    every parameter resolved from it. Ray refuses a searcher with PBT, and its ``points_to_evaluate`` need every
    key (and list element) declared in the space, which conditional dimensions and list values do not give."""
    from ray import tune

    keys = list(dict.fromkeys(k for member in population for k in member))
    return {MEMBER: tune.grid_search(list(range(len(population)))),
            **{k: tune.sample_from(_Member(population, k)) for k in keys}}




# --------------------------------------------------------------------------- schedulers
class ClipToRanges:
    """PBT's ``custom_explore_fn``: a perturbed value (x0.8 / x1.2) is clipped into its YAML range
    (picklable: Tune saves the scheduler with the experiment)."""

    def __init__(self, ranges: dict[str, tuple[float, float]]):
        self.ranges = ranges

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for name, (low, high) in self.ranges.items():
            if name in config and isinstance(config[name], int | float) and math.isfinite(config[name]):
                config[name] = min(max(float(config[name]), low), high)
        return config


def scheduler(cfg: SearchSpace, metric: str, mode: str):
    """The Tune scheduler of ``scheduler.type``; epochs are its time unit (``epoch`` in every report)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = cfg.scheduler
    if s.type == "asha":
        return ASHAScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=s.max_epochs,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.type == "hyperband":
        from e2e_search.search.hyperband import HyperBand

        return HyperBand(time_attr="epoch", metric=metric, mode=mode, max_t=s.max_epochs,
                         reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        dims = pbt_dims(cfg)
        mutations = {n: (tune.loguniform if isinstance(d, LogUniformDim) else tune.uniform)(d.low, d.high)
                     for n, d in dims.items()}
        return PopulationBasedTraining(
            time_attr="epoch", metric=metric, mode=mode, perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=mutations, quantile_fraction=s.quantile_fraction, resample_probability=0.25,
            custom_explore_fn=ClipToRanges({n: (d.low, d.high) for n, d in dims.items()}), log_config=False,
            synch=False)
    return FIFOScheduler()
