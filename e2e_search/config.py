"""The search-space YAML: pydantic models, loading, ``--set`` overrides.

Everything here runs before Ray starts and writes nothing. Errors come out as
:class:`~e2e_search.errors.UserError` with the file and the dotted key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    PrivateAttr,
    model_validator,
)

from .errors import UserError, did_you_mean

# Metrics a trial reports; the mode of each is known so users rarely need `search.mode`.
MAXIMIZED = {"val_auc", "val_acc", "val_rej30", "val_rej50", "val_rej70"}
MINIMIZED = {"val_loss", "train_loss", "val_mae", "val_resolution", "val_abs_bias",
             "num_params", "latency_ms"}  # the last two: costs for multi-objective (nsga2) searches
DEFAULT_WORKDIR = Path("e2e_runs")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- params
class FixedDim(_Strict):
    """A constant (what a bare YAML value means), optionally conditional."""

    type: Literal["fixed"] = "fixed"
    value: Any
    when: dict[str, Any] | None = None


class ChoiceDim(_Strict):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)
    when: dict[str, Any] | None = None


class GridDim(_Strict):
    """Every value is tried: each combination of grid values is queued first."""

    type: Literal["grid"]
    values: list[Any] = Field(min_length=1)
    when: dict[str, Any] | None = None


class _Range(_Strict):
    low: float
    high: float
    when: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _ordered(self):
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be smaller than high ({self.high:g}); set low below high "
                             "(for a single value write the value itself, without type)")
        return self


class UniformDim(_Range):
    type: Literal["uniform"]


class LogUniformDim(_Range):
    type: Literal["loguniform"]

    @field_validator("low")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {v:g}); use uniform for ranges that include 0")
        return v


class RandIntDim(_Range):
    """Integers from low to high, both included."""

    type: Literal["randint"]
    low: int
    high: int


class QUniformDim(_Range):
    """Uniform, rounded to a multiple of ``q`` (steps from ``low``)."""

    type: Literal["quniform"]
    q: float = Field(gt=0)


DIM_TYPES = ("fixed", "choice", "grid", "uniform", "loguniform", "randint", "quniform")


def _as_dim(v: Any) -> Any:
    if isinstance(v, dict):
        if "type" not in v:
            raise ValueError(
                "a search dimension needs 'type'; add type: one of " + ", ".join(DIM_TYPES[1:])
                + " (or write a fixed value without braces)"
            )
        if v["type"] not in DIM_TYPES:
            raise ValueError(f"unknown type '{v['type']}'{did_you_mean(str(v['type']), DIM_TYPES)}; "
                             f"set type to one of {', '.join(DIM_TYPES)}")
        return v
    return {"type": "fixed", "value": v}


Dimension = Annotated[
    Union[FixedDim, ChoiceDim, GridDim, UniformDim, LogUniformDim, RandIntDim, QUniformDim],
    Field(discriminator="type"),
    BeforeValidator(_as_dim),
]


def dim_values(dim: Any) -> list[Any]:
    """Representative values of a dimension (used to type-check it)."""
    if isinstance(dim, FixedDim):
        return [dim.value]
    if isinstance(dim, (ChoiceDim, GridDim)):
        return list(dim.values)
    return [dim.low, dim.high]


# --------------------------------------------------------------------------- sections
class TaskConfig(_Strict):
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


class GenerateConfig(_Strict):
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


class DataConfig(_Strict):
    path: str
    image_key: str = "X_jets"
    label_key: str = "y"
    target_key: str | None = None
    mask_key: str = "mask"
    """Objects families: the (N, n_objects) mask of real (1) vs padding (0) objects; all real if absent."""
    layout: Literal["channels_last", "channels_first"] = "channels_last"
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
    # Preprocessing (e2e_search/transforms.py), in this order, the same for every split:
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
    cache: Literal["none", "memory", "device"] = "none"
    """memory: each worker reads its split once into RAM (after the deterministic transforms);
    device: the same, then moved onto the training device (the GPU when present) and cut into
    batches there, with no DataLoader (images families)."""

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


class SearchConfig(_Strict):
    algorithm: Literal["tpe", "random", "nsga2"] = "tpe"
    num_samples: int = Field(default=8, gt=0)
    max_concurrent: int | None = Field(default=None, gt=0)
    metric: str | list[str] | None = None
    mode: Literal["min", "max"] | list[Literal["min", "max"]] | None = None
    seed: int = 0


class SchedulerConfig(_Strict):
    type: Literal["asha", "none"] = "asha"
    max_epochs: int = Field(default=10, gt=0)
    grace_period: int = Field(default=1, gt=0)
    reduction_factor: float = Field(default=2, gt=1)

    @model_validator(mode="after")
    def _grace(self):
        if self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) exceeds max_epochs ({self.max_epochs}); set "
                             f"scheduler.grace_period to at most {self.max_epochs} (--set scheduler.grace_period="
                             f"{self.max_epochs}) or raise scheduler.max_epochs")
        return self


class ResourcesConfig(_Strict):
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


class TrackingConfig(_Strict):
    uri: str | None = None
    """MLflow tracking URI (default: ``sqlite:///e2e_runs/mlflow.db``)."""
    experiment: str | None = None
    """MLflow experiment (default: the search ``name``)."""
    storage: str | None = None
    """Where Ray keeps results and checkpoints (default: ``e2e_runs/ray_results``)."""
    artifacts: str | None = None
    """Artifact root of a new experiment (default: ``e2e_runs/mlartifacts``)."""


class FamilyDim(_Strict):
    """Several families in one search: ``choice`` (the sampler picks) or ``grid`` (each is tried first)."""

    type: Literal["choice", "grid"]
    values: list[str] = Field(min_length=1)


class SearchSpace(_Strict):
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
        return [m] if isinstance(m, str) else list(m)

    @property
    def modes(self) -> list[str]:
        m = self.search.mode
        return [m] if isinstance(m, str) else list(m)

    @property
    def target_key(self) -> str | None:
        if not self.task.regresses:
            return None
        return self.data.target_key or self.task.target


# --------------------------------------------------------------------------- loading
class DuplicateKey(Exception):
    """A mapping names the same key twice (plain ``yaml.safe_load`` keeps the last one silently)."""

    def __init__(self, path: str, first: Any, second: Any):
        self.path = path
        self.columns = f"columns {first.column + 1} and {second.column + 1}"
        if first.line == second.line:
            self.where = f"on line {first.line + 1} ({self.columns})"
            self.fix = f"remove one of them from line {first.line + 1}"
        else:
            self.where = f"on lines {first.line + 1} and {second.line + 1}"
            self.fix = f"keep one: delete line {first.line + 1} or line {second.line + 1}"
        super().__init__(f"{path}: {self.where}")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics (the same safe constructors), but a key given twice in one mapping is
    an error naming the key's path and both lines. Keys pulled in by a merge (``<<: *anchor``) may still be
    overridden, as YAML intends."""

    def construct_document(self, node):
        self._paths: dict[int, tuple] = {}
        stack = [(node, ())]
        while stack:  # the dotted path of every mapping, for the message
            n, path = stack.pop()
            if id(n) in self._paths:
                continue
            self._paths[id(n)] = path
            if isinstance(n, yaml.MappingNode):
                stack += [(v, path + (k.value if isinstance(k, yaml.ScalarNode) else "?",)) for k, v in n.value]
            elif isinstance(n, yaml.SequenceNode):
                stack += [(v, path + (i,)) for i, v in enumerate(n.value)]
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    path = getattr(self, "_paths", {}).get(id(node), ())
                    raise DuplicateKey(".".join(str(p) for p in path + (key,)), seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (:class:`DuplicateKey`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError("file not found; give the path of a search-space YAML", source=str(path))
    try:
        raw = parse_yaml(p.read_text())
    except DuplicateKey as e:
        raise UserError(f"this key is given twice, {e.where} (YAML would silently keep the last); {e.fix}",
                        source=str(path), key=e.path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"YAML syntax error: {problem}; fix the YAML there", source=str(path), key=where) from None
    if not isinstance(raw, dict):
        raise UserError("expected a mapping of keys (name, family, task, data, ...) at the top; write the YAML as "
                        "'key: value' lines (see search_spaces/quickstart.yaml)", source=str(path))
    return raw


def apply_overrides(raw: dict, sets: list[str], source: str | None = None) -> list[str]:
    """Apply ``key.sub=value`` overrides in place; values are parsed as YAML."""
    src = f"{source} (--set)" if source else "--set"
    paths = []
    for item in sets:
        if "=" not in item:
            raise UserError(f"expected key.sub=value, got '{item}'; write it as --set key.sub=value "
                            "(e.g. --set data.path=jets.h5)", source=src)
        key, _, text = item.partition("=")
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
            raise UserError(f"'{key}' is not a dotted key path like data.path (got '{item}'); write it as "
                            "--set section.key=value (e.g. --set data.path=jets.h5)", source=src)
        try:
            value = parse_yaml(text)
        except DuplicateKey as e:
            raise UserError(f"the value gives '{e.path}' twice ({e.columns}); give each key once in --set {key}=...",
                            source=src, key=key) from None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                if parts[0] == "params" and i == 1:  # params.lr.low on a fixed lr: start a dimension
                    nxt = node[part] = {}
                else:
                    above = ".".join(parts[: i + 1])
                    raise UserError(f"'{above}' is a value, not a section; set it as a whole (--set {above}=...)",
                                    source=src, key=key)
            node = nxt
        old = node.get(parts[-1])
        if key == "family" and isinstance(value, str) and isinstance(old, dict) and old.get("type") in ("choice", "grid"):
            value = {"type": old["type"], "values": [value]}  # narrowing a family search: still one, of one family
        node[parts[-1]] = value
        paths.append(key)
    return paths


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last element of ``loc`` (for suggestions)."""
    model: Any = SearchSpace
    for part in loc[:-1]:
        if model is None or not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = candidates[0] if candidates else None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "FamilyDim"}


def _dotted(loc: tuple) -> str:
    parts = []
    for i, p in enumerate(loc):
        if i >= 2 and loc[0] == "params" and p in DIM_TYPES and i == 2:
            continue  # the discriminator tag pydantic inserts
        if isinstance(p, str) and (p.startswith("function-") or "[" in p or p in _UNION_TAGS):
            continue  # the member of a union pydantic tried (e.g. literal['min','max'], str, list[str])
        parts.append(str(p))
    return ".".join(parts)


def _explain(err: dict) -> tuple[str, str]:
    loc = tuple(err["loc"])
    key = _dotted(loc)
    kind = err["type"]
    if not key:  # a check across sections (SearchSpace's own validator): the section its message names first
        named = re.search(r"\b(" + "|".join(SearchSpace.model_fields) + r")\.[a-z_]+", err.get("msg", ""))
        key = named.group(1) if named else ""
    if kind == "extra_forbidden":
        model = _model_at(loc)
        if loc and loc[0] == "params" and len(loc) >= 3:
            options = ["type", "values", "low", "high", "q", "when", "value"]
        else:
            options = list(model.model_fields) if model else []
        return key, f"unknown key '{loc[-1]}'{did_you_mean(str(loc[-1]), options)}; remove or rename it"
    if kind == "missing":
        return key, "required key is missing; add it"
    return key, error_text(err, key)


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def fix_for(err: dict, key: str) -> str:
    """What to write instead, for one of pydantic's own errors (``err`` from ``ValidationError.errors()``)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        limit = ctx.get(name)
        return f"set {key} to a number {op} {limit:g}" if isinstance(limit, float) else f"set {key} to a number {op} {limit}"
    if kind == "literal_error":
        return f"set {key} to one of {ctx.get('expected')}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"set {key} to a whole number"
    if kind in ("float_parsing", "float_type"):
        return f"set {key} to a number"
    if kind in ("bool_parsing", "bool_type"):
        return f"set {key} to true or false"
    if kind == "string_type":
        return f"set {key} to a text value (quote it)"
    if kind in ("list_type", "tuple_type"):
        return f"write {key} as a list, e.g. [a, b]"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"write {key} as a section of 'key: value' lines"
    if kind == "too_short":
        return f"give {key} at least {ctx.get('min_length')} value(s)"
    if kind == "too_long":
        return f"give {key} at most {ctx.get('max_length')} value(s)"
    if kind == "string_pattern_mismatch":
        return f"set {key} to letters, digits, '_', '.' and '-', starting with a letter or digit"
    if kind == "union_tag_invalid":
        return f"set {key}.{ctx.get('discriminator', 'type').strip(chr(39))} to one of {ctx.get('expected_tags')}"
    return f"set {key} to a valid value"


def error_text(err: dict, key: str) -> str:
    """A pydantic error as one line: the reason, the value given and (for pydantic's own checks) the fix.

    Our validators' ``ValueError`` messages already end with their fix."""
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err["type"] in ("value_error", "assertion_error"):
        return msg
    if "input" in err and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return f"{msg}; {fix_for(err, key)}"


def source_of(source: str, set_paths: list[str] | None, key: str | None) -> str:
    """The YAML path, plus the ``--set`` override that wrote ``key`` (or a section above or below it)."""
    for p in set_paths or []:
        if key and (key == p or key.startswith(p + ".") or p.startswith(key + ".")):
            return f"{source} (--set {p})"
    return source


def set_keys(sets: list[str]) -> list[str]:
    """The key paths of ``--set key.sub=value`` items (already checked by :func:`apply_overrides`)."""
    return [s.partition("=")[0].strip() for s in sets]


# What every trial reports (e2e_search/core/loop.py, e2e_search/metrics.py), by task; per-bin regression metrics
# (``val_bin/<lo>-<hi>/<name>``) come on top.
REPORTED_ANY = {"train_loss", "val_loss", "num_params", "latency_ms", "pretrain_loss", "val_pretrain_loss"}
REPORTED_CLASSIFICATION = {"val_auc", "val_acc", "val_rej30", "val_rej50", "val_rej70"}
REPORTED_REGRESSION = {"val_mae", "val_bias", "val_resolution", "val_abs_bias"}


def reported_metrics(cfg: "SearchSpace") -> set[str]:
    """The metric names a trial of this task reports each epoch (the values ``search.metric`` can take)."""
    out = set(REPORTED_ANY)
    if cfg.task.classifies:
        out |= REPORTED_CLASSIFICATION if cfg.task.num_classes == 2 else {"val_auc", "val_acc"}
    if cfg.task.regresses:
        out |= REPORTED_REGRESSION
    return out


def check_metrics(cfg: "SearchSpace") -> None:
    """Every ``search.metric`` is one the trials report (else Tune fails every trial inside Ray).

    Raises:
        UserError: naming ``search.metric``, the unknown name and the names this task reports."""
    known = reported_metrics(cfg)
    for m in cfg.metrics:
        if m not in known and not (cfg.task.regresses and m.startswith("val_bin/")):
            raise UserError(f"'{m}' is not a metric a {cfg.task.type} trial reports{did_you_mean(m, known)}; "
                            f"set search.metric to one of {', '.join(sorted(known))}", key="search.metric")


def validate(raw: dict, *, source: str, set_paths: list[str] | None = None) -> SearchSpace:
    try:
        cfg = SearchSpace.model_validate(raw)
    except ValidationError as e:
        errs = e.errors()  # an unknown key first: it is usually the misspelling of a "missing" one
        first = errs[0]  # of a union's members (family: a name or a mapping), the one the input got furthest into
        first = max((x for x in errs if x["loc"][:1] == first["loc"][:1]), key=lambda x: len(x["loc"]))
        key, msg = _explain(next((x for x in errs if x["type"] == "extra_forbidden"), first))
        raise UserError(msg, source=source_of(source, set_paths, key), key=key or None) from None
    try:
        check_metrics(cfg)
    except UserError as e:
        raise e.with_source(source_of(source, set_paths, e.key)) from None
    from .params import check_params  # needs the family registry

    try:
        notes = check_params(cfg)
    except UserError as e:
        raise e.with_source(source_of(source, set_paths, e.key)) from None
    cfg._origin = (source, list(set_paths or []))
    for key, text in notes:
        cfg.note(key, text)
    return cfg


def load(path: str | Path, sets: list[str] | None = None) -> SearchSpace:
    """Read, override and validate a search-space YAML (writes nothing)."""
    raw = read_yaml(path)
    own = raw.get("data", {}).get("path") if isinstance(raw.get("data"), dict) else None
    set_paths = apply_overrides(raw, list(sets or []), source=str(path))
    _generate_only_own_path(raw, own, set_paths)
    return validate(raw, source=str(path), set_paths=set_paths)


def _generate_only_own_path(raw: dict, own_path: Any, set_paths: list[str]) -> None:
    """A ``data.generate`` recipe writes only the ``data.path`` its YAML names.

    When ``--set data.path=...`` points elsewhere, the recipe is dropped (a mistyped path of one's own file is
    then "file not found", never a freshly simulated file) unless ``--set`` gave the recipe too
    (``data.generate...`` or the whole ``data`` section).
    """
    data = raw.get("data")
    if not isinstance(data, dict) or "generate" not in data or data.get("path") == own_path:
        return
    if any(p in ("data", "data.generate") or p.startswith("data.generate.") for p in set_paths):
        return
    del data["generate"]


def dump(cfg: SearchSpace) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
