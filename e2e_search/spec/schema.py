"""The search-space YAML's sections as pydantic models, and :class:`SearchSpace`, the whole file.

Each model checks its own values (ranges, pairs, defaults that depend on other keys);
reading the file, ``--set`` overrides and the checks against the family registry are
:mod:`e2e_search.spec.loader`'s. Errors are pydantic ``ValueError`` messages ending with the fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from e2e_search.spec.dims import Dimension, StrictModel
from trainables.errors import source_of

# Metrics a trial reports; the mode of each is known so users rarely need `search.mode`.
MAXIMIZED = {"val_auc", "val_acc", "val_rej30", "val_rej50", "val_rej70"}
MINIMIZED = {"val_loss", "train_loss", "val_mae", "val_resolution", "val_abs_bias",
             "num_params", "latency_ms"}  # the last two: costs for multi-objective (nsga2) searches


# --------------------------------------------------------------------------- sections
class TaskConfig(StrictModel):
    type: Literal["classification", "regression", "joint"]
    """joint: classification and regression at once, one model with both outputs
    (the regression loss is weighted by the training parameter ``loss_weight``)."""
    num_classes: int | None = Field(default=None, ge=2)
    target: str | None = None
    """Regression: name of the target (also its HDF5 key unless data.target_key says otherwise)."""

    @model_validator(mode="after")
    def _complete(self):
        if self.type in ("classification", "joint") and self.num_classes is None:
            self.num_classes = 2
        if self.type in ("regression", "joint") and self.target is None:
            self.target = "m0"
        return self

    @property
    def classifies(self) -> bool:
        return self.type in ("classification", "joint")

    @property
    def regresses(self) -> bool:
        return self.type in ("regression", "joint")


class GenerateConfig(StrictModel):
    """A recipe that writes ``data.path`` when the file does not exist yet (then cached).

    ``toy_jets`` is a fast numpy toy; the others are Pythia 8 + FastJet processes
    (see ``e2e-search data generate``).
    """

    recipe: Literal["toy_jets", "top_vs_qcd", "quark_vs_gluon", "boosted_scalar", "event_objects"] = "toy_jets"
    n: int = Field(default=2000, gt=0)
    image_size: int | None = Field(default=None, ge=8)
    """Pixels per side: 32 for toy_jets, 125 (the E2E window) for the Pythia recipes unless given."""
    channels: int | list[str] = 3
    """toy_jets: a number of channels; Pythia recipes: names in order (default ECAL, HCAL, Tracks)."""
    seed: int = Field(default=1, ge=0, le=900_000_000)
    workers: int = Field(default=1, gt=0)
    mass_range: list[float] = [50.0, 200.0]
    decay: Literal["bb", "gammagamma"] = "bb"
    per_mass: int = Field(default=200, gt=0)

    @model_validator(mode="after")
    def _channels(self):
        if self.image_size is None:
            self.image_size = 32 if self.recipe == "toy_jets" else 125
        if self.recipe == "toy_jets":
            if not isinstance(self.channels, int) or self.channels < 1:
                raise ValueError("toy_jets takes channels as a number >= 1; set data.generate.channels: 3 (for example)")
        elif isinstance(self.channels, int):
            if not 1 <= self.channels <= 3:  # (assigning it back would re-run this validator: validate_assignment)
                raise ValueError("Pythia recipes take channels as names (ECAL, HCAL, Tracks), at most 3 as a number; "
                                 "set data.generate.channels: [ECAL, HCAL, Tracks] or a number up to 3")
            self.channels = ["ECAL", "HCAL", "Tracks"][: self.channels]
        if self.recipe != "toy_jets" and self.seed < 1:
            raise ValueError(f"Pythia seeds run from 1 to 900000000 (got {self.seed}); set data.generate.seed: 1 or more")
        return self


class DataConfig(StrictModel):
    path: str
    image_key: str = "X_jets"
    label_key: str = "y"
    target_key: str | None = None
    mask_key: str = "mask"
    """Objects families: the (N, n_objects) mask of real (1) vs padding (0) objects; all real if absent."""
    layout: Literal["channels_last", "channels_first"] = "channels_last"
    layout_confirmed: bool = False
    """True: ``layout`` is right although the shape (more channels than an image side) or the file's own
    ``layout`` attribute points to the other layout; the check that refuses it is skipped."""
    format: Literal["auto", "hdf5", "parquet", "root", "csv"] = "auto"
    """auto: from the extension of path (.h5/.hdf5, .parquet/.pq, .root); parquet and ROOT are converted once to an HDF5 cache."""
    tree: str | None = None
    """ROOT: name of the TTree (default: the file's only tree)."""
    channels: list[int] | None = None
    """Indices of the file's channels to use, in this order (default: all)."""
    val_fraction: float = Field(default=0.15, gt=0, lt=1)
    test_fraction: float = Field(default=0.15, ge=0, lt=1)
    seed: int = 0
    limit: int | None = Field(default=None, gt=0)
    """Use only this many samples (a random subset drawn with ``seed``)."""
    normalize: Literal["none", "per_channel"] = "per_channel"
    mean: list[float] | None = None
    std: list[float] | None = None
    """Per-channel statistics; computed on the training split when not given."""
    stats_samples: int = Field(default=512, gt=0)
    loader_workers: int = Field(default=0, ge=0)
    generate: GenerateConfig | None = None
    # Preprocessing (trainables/data/transforms.py), in this order, the same for every split:
    zero_suppress: float = Field(default=0.0, ge=0)
    """Pixels with |x| below this become 0 (applied first)."""
    clip: list[float] | None = None
    """[low, high]: clip pixel values (after zero_suppress, before log1p)."""
    log1p: bool = False
    """x -> log1p(max(x, 0)) per pixel, before resize and normalization."""
    resize: list[int] | None = None
    """[H, W]: target image size (the model is built for it)."""
    resize_mode: Literal["crop", "pad_crop", "avgpool"] = "crop"
    flip_augment: bool = False
    """Random flips along eta (H) and phi (W), p=0.5 each, training split only."""
    cache: Literal["auto", "none", "memory", "device", "sparse"] = "auto"
    """memory: each worker reads its split once into RAM (after the deterministic transforms);
    device: the same, then moved onto the training device (the GPU when present) and cut into
    batches there, with no DataLoader (images families); sparse: the non-zero pixels of every image,
    ingested once per dataset into e2e_runs/cache/ and shared by every trial on a node, dense batches
    built on the device (trainables/data/sparse_cache.py); auto: sparse when a sample of the images is under
    20% non-zero, else device when it fits in memory, else none (object lists: their own path)."""

    @field_validator("clip")
    @classmethod
    def _clip_pair(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 2 or not v[0] < v[1]):
            raise ValueError(f"clip needs [low, high] with low < high (got {v}); set data.clip: [low, high], e.g. [0, 1000]")
        return v

    @field_validator("resize")
    @classmethod
    def _resize_pair(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or any(n <= 0 for n in v)):
            raise ValueError(f"resize needs [H, W], two positive integers (got {v}); set data.resize: [H, W], "
                             "e.g. [64, 64], or remove it")
        return v

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(f"val_fraction + test_fraction ({self.val_fraction:g} + {self.test_fraction:g}) must "
                             "leave at least 10% for training; lower data.val_fraction or data.test_fraction")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither; set data.mean and data.std together or remove both")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0 (got {self.std}); set every data.std value above 0")
        return self


class ConfirmConfig(StrictModel):
    """``e2e-search confirm`` right after the search: the ``top`` best trials retrained with ``seeds`` seeds each
    and scored once on the test split (e2e_search/confirm/run.py)."""

    top: int = Field(default=3, ge=1)
    seeds: int = Field(default=3, ge=1)
    per_family: bool = False
    """The ``top`` best trials of each family instead of overall (a search over families)."""


class WarmStartConfig(StrictModel):
    """Start a search from an earlier one (e2e_search/search/warm_start.py): the ``top`` best finished trials of MLflow
    experiment ``experiment`` (in this search's tracking store, same family) are queued as the first trials;
    ``tpe`` and ``gp`` also get their results as prior observations."""

    experiment: str = Field(min_length=1)
    top: int = Field(default=4, ge=1)


class SearchConfig(StrictModel):
    algorithm: Literal["tpe", "random", "nsga2", "gp", "cmaes", "qmc"] = "tpe"
    """The Optuna sampler (docs/search_space.md, "Searchers and schedulers"): tpe, gp (Gaussian process),
    cmaes (CMA-ES: numeric dimensions only), qmc (quasi-random Sobol), random, nsga2 (several metrics)."""
    num_samples: int = Field(default=8, gt=0)
    max_concurrent: int | None = Field(default=None, gt=0)
    metric: str | list[str] | None = None
    mode: Literal["min", "max"] | list[Literal["min", "max"]] | None = None
    seed: int = 0
    confirm: ConfirmConfig | None = None
    warm_start: WarmStartConfig | None = None
    optuna_storage: str | None = None
    """An Optuna RDB storage URL (e.g. ``sqlite:///e2e_runs/optuna.db``): the search's study is kept there, named
    after the search run, so ``optuna-dashboard <url>`` shows it live; a resumed search continues the same study.
    Off by default (the study lives in the search driver)."""


class SchedulerConfig(StrictModel):
    type: Literal["asha", "hyperband", "pbt", "none"] = "asha"
    """asha: stop poor trials at rungs; hyperband: HyperBand brackets (pauses and resumes trials);
    pbt: Population Based Training over lr / weight_decay / drop_path; none: every trial to max_epochs."""
    max_epochs: int = Field(default=10, gt=0)
    grace_period: int = Field(default=1, gt=0)
    """asha: epochs every trial trains before it can be stopped."""
    reduction_factor: float = Field(default=2, gt=1)
    """asha and hyperband: 1 in this many trials goes on at each rung."""
    perturbation_interval: int = Field(default=2, gt=0)
    """pbt: every this many epochs the bottom trials take the weights of the top ones and perturb their
    training parameters."""
    quantile_fraction: float = Field(default=0.25, gt=0, le=0.5)
    """pbt: the share of trials in the bottom (copying) and top (copied) groups."""

    @model_validator(mode="after")
    def _grace(self):
        if self.type == "pbt" and self.perturbation_interval >= self.max_epochs:
            raise ValueError(f"perturbation_interval ({self.perturbation_interval}) leaves no perturbation before "
                             f"max_epochs ({self.max_epochs}); set scheduler.perturbation_interval below "
                             f"{self.max_epochs} or raise scheduler.max_epochs")
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) exceeds max_epochs ({self.max_epochs}); set "
                             f"scheduler.grace_period to at most {self.max_epochs} (--set scheduler.grace_period="
                             f"{self.max_epochs}) or raise scheduler.max_epochs")
        return self


class ResourcesConfig(StrictModel):
    workers: int = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    cpus_per_worker: float = Field(default=1, gt=0)
    max_failures: int = Field(default=0, ge=0)
    """Retries of a failed trial, each from its last checkpoint."""
    runner: Literal["auto", "ray_train"] = "auto"
    """How a trial runs. ``auto``: a one-worker trial trains in its own Ray Tune process, which Tune reuses for
    the next trial (torch and the data loaded once per process); several workers train through Ray Train's
    ``TorchTrainer`` (DDP). ``ray_train``: every trial through a ``TorchTrainer``, one worker included (a
    separate worker process per trial; bench/orchestration.py compares both)."""


class TrackingConfig(StrictModel):
    uri: str | None = None
    """MLflow tracking URI (default: ``sqlite:///e2e_runs/mlflow.db``)."""
    experiment: str | None = None
    """MLflow experiment (default: the search ``name``)."""
    storage: str | None = None
    """Where Ray keeps results and checkpoints (default: ``e2e_runs/ray_results``)."""
    artifacts: str | None = None
    """Artifact root of a new experiment (default: ``e2e_runs/mlartifacts``)."""


class FamilyDim(StrictModel):
    """Several families in one search: ``choice`` (the sampler picks) or ``grid`` (each is tried first)."""

    type: Literal["choice", "grid"]
    values: list[str] = Field(min_length=1)


class SearchSpace(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    family: str | FamilyDim
    """One family by name, or {type: choice|grid, values: [...]} to search over families
    (then params may carry ``when: {family: ...}``; a family's own params apply only to it)."""
    task: TaskConfig
    data: DataConfig
    params: dict[str, Dimension] = {}
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    _notes: list[str] = PrivateAttr(default_factory=list)
    _origin: tuple[str, list[str]] = PrivateAttr(default=("", []))
    """The YAML's name and its --set paths, for notes."""

    @model_validator(mode="after")
    def _defaults(self):
        s = self.search
        if s.metric is None:
            s.metric = "val_auc" if self.task.classifies else "val_mae"
        metrics = [s.metric] if isinstance(s.metric, str) else list(s.metric)
        if len(metrics) > 1 and s.algorithm != "nsga2":
            raise ValueError("several metrics need search.algorithm: nsga2; set search.algorithm: nsga2 or give one "
                             "search.metric")
        if s.mode is None:
            modes = []
            for m in metrics:
                if m in MAXIMIZED:
                    modes.append("max")
                elif m in MINIMIZED or m.startswith("val_") or m.endswith("loss"):
                    modes.append("min")
                else:
                    raise ValueError(f"cannot tell whether to maximize or minimize '{m}'; set search.mode: max or min")
            s.mode = modes[0] if isinstance(s.metric, str) else modes
        modes = [s.mode] if isinstance(s.mode, str) else list(s.mode)
        if len(modes) != len(metrics):
            raise ValueError(f"search.mode needs one entry per search.metric ({len(metrics)} metrics, {len(modes)} "
                             f"modes); set search.mode to a list of {len(metrics)} (max or min each)")
        if s.confirm is not None and self.data.test_fraction == 0:
            raise ValueError("search.confirm scores the finalists on the test split, but data.test_fraction is 0; "
                             "set data.test_fraction: 0.15 (for example) or remove search.confirm")
        if self.tracking.experiment is None:
            self.tracking.experiment = self.name
        return self

    # Convenience accessors ------------------------------------------------
    @property
    def notes(self) -> list[str]:
        """What validation noticed but accepted (e.g. a conditional parameter that can no longer be active),
        one line each, for the CLI to print once the whole setup is checked."""
        return list(self._notes)

    def note(self, key: str, text: str) -> None:
        """Add a note about ``key``, naming the file (and the ``--set`` that led there)."""
        source, set_paths = self._origin
        prefix = source_of(source, set_paths, key)
        self._notes.append(f"{prefix}: note: {text}" if prefix else f"note: {text}")

    @property
    def families(self) -> list[str]:
        return [self.family] if isinstance(self.family, str) else list(self.family.values)

    @property
    def family_label(self) -> str:
        """The family, or ``a|b|c`` when the search is over families (tags, progress)."""
        return "|".join(self.families)

    @property
    def metrics(self) -> list[str]:
        m = self.search.metric
        assert m is not None  # filled in by _defaults
        return [m] if isinstance(m, str) else list(m)

    @property
    def modes(self) -> list[str]:
        m = self.search.mode
        assert m is not None  # filled in by _defaults
        return [m] if isinstance(m, str) else list(m)

    @property
    def target_key(self) -> str | None:
        if not self.task.regresses:
            return None
        return self.data.target_key or self.task.target
