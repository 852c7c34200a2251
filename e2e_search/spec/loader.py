"""The search-space YAML: loading, ``--set`` overrides, validation.

The models are :mod:`e2e_search.spec.dims` (search dimensions) and :mod:`e2e_search.spec.schema`
(sections, :class:`SearchSpace`). Everything here
runs before Ray starts and writes nothing. Errors come out as
:class:`~trainables.errors.UserError` with the file and the dotted key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml
from pydantic import BaseModel, ValidationError

from e2e_search.spec.dims import DIM_TYPES
from e2e_search.spec.params import check_params
from e2e_search.spec.schema import SearchSpace
from e2e_search.spec.search_checks import check_search
from trainables.errors import UserError, did_you_mean, error_text, source_of

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


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


def _unshared(v: Any, active: frozenset = frozenset()) -> Any:
    """``v`` with every mapping and list rebuilt: YAML aliases (``*anchor``, ``<<: *anchor``) load as the same
    object in several places, and a ``--set`` of one would change the others. A structure that contains itself
    raises ValueError."""
    if isinstance(v, (dict, list)):
        if id(v) in active:
            raise ValueError("an alias refers to a mapping or list that contains it")
        inner = active | {id(v)}
        if isinstance(v, dict):
            return {k: _unshared(x, inner) for k, x in v.items()}
        return [_unshared(x, inner) for x in v]
    return v


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (:class:`DuplicateKey`); aliases are expanded into
    independent values (:func:`_unshared`)."""
    return _unshared(yaml.load(text, Loader=UniqueKeyLoader))


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError("file not found; give the path of a search-space YAML", source=str(path))
    try:
        raw = parse_yaml(p.read_text())
    except DuplicateKey as e:
        raise UserError(f"this key is given twice, {e.where} (YAML would silently keep the last); {e.fix}",
                        source=str(path), key=e.path) from None
    except ValueError as e:  # a recursive alias
        raise UserError(f"{e}; write the value out instead of the alias", source=str(path)) from None
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
        except ValueError as e:  # a recursive alias
            raise UserError(f"{e}; write the value out in --set {key}=...", source=src, key=key) from None
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


def _explain(err: ErrorDetails) -> tuple[str, str]:
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
    return key, error_text(cast("dict[str, Any]", err), key)  # a TypedDict, read as a dict




def set_keys(sets: list[str]) -> list[str]:
    """The key paths of ``--set key.sub=value`` items (already checked by :func:`apply_overrides`)."""
    return [s.partition("=")[0].strip() for s in sets]


# What every trial reports (trainables/core/loop.py, trainables/metrics.py), by task; per-bin regression metrics
# (``val_bin/<lo>-<hi>/<name>``) come on top.
REPORTED_ANY = {"train_loss", "val_loss", "num_params", "latency_ms", "pretrain_loss", "val_pretrain_loss"}
REPORTED_CLASSIFICATION = {"val_auc", "val_acc", "val_rej30", "val_rej50", "val_rej70"}
REPORTED_REGRESSION = {"val_mae", "val_bias", "val_resolution", "val_abs_bias"}


def reported_metrics(cfg: SearchSpace) -> set[str]:
    """The metric names a trial of this task reports each epoch (the values ``search.metric`` can take)."""
    out = set(REPORTED_ANY)
    if cfg.task.classifies:
        out |= REPORTED_CLASSIFICATION if cfg.task.num_classes == 2 else {"val_auc", "val_acc"}
    if cfg.task.regresses:
        out |= REPORTED_REGRESSION
    return out


def check_metrics(cfg: SearchSpace) -> None:
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
    try:
        notes = check_params(cfg)
        notes += check_search(cfg)
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
