"""Build-time constraints of the model families, checked against the data's shape before Ray starts.

A family's model may not fit the data for some parameter values (a patch larger than a
cropped image, a mask ratio that hides every patch, a batch of one through batch norm on
a 1x1 feature map, ...). Rather than restating each family's rules here, every family
is *built* for the data's shape on PyTorch's meta device (shapes only: no memory, no
arithmetic) and runs one forward pass on a meta batch, for every combination of the
values its **shape parameters** (``register_family(shape_params=...)``) can take:

* choice/grid: every value; randint and quniform: every value in the range;
  uniform/loguniform: both ends; conditional parameters only where their condition holds;
* every other parameter at its cheapest value (smallest number, first choice): by the
  family's declaration it never decides whether the model builds (tests/test_shapes.py
  checks that declaration over extreme values); the batch is the smallest ``batch_size``.

A combination that fails is reported as one line naming ``params.<name>``, the value(s)
and the family's reason, before any trial could fail with it inside Ray.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_search.spec.dims import ChoiceDim, FixedDim, GridDim, QUniformDim, RandIntDim
from e2e_search.spec.schema import SearchSpace
from trainables.errors import UserError

MAX_BUILDS = 256
"""Most combinations checked per family; beyond it, ranges are reduced to their ends (and a note says so)."""
_INIT_OPS = {"uniform_", "normal_", "erfinv_", "clamp_", "mul_", "add_", "zero_", "fill_"}
"""In-place ops of weight initialization: skipped while building on the meta device (they cannot change a shape)."""


@dataclass(frozen=True)
class DataShape:
    """What a model sees: images (C, H, W) after preprocessing, or events (n_objects, n_features)."""

    kind: str
    dims: tuple[int, ...]
    tasks: tuple[tuple[str, int], ...]
    origin: str = "data"

    def describe(self) -> str:
        if self.kind == "objects":
            text = f"events of {self.dims[0]} objects x {self.dims[1]} features"
        else:
            c, h, w = self.dims
            text = f"{h}x{w} images with {c} channel{'s' if c != 1 else ''}, after preprocessing"
        return text if self.origin == "data" else f"{text}, as data.generate will write them"


def _tasks(cfg: SearchSpace) -> tuple[tuple[str, int], ...]:
    """The model's output blocks (trainables/core/model.task_outputs, without importing torch-heavy modules)."""
    t = cfg.task
    out = []
    if t.classifies:
        out.append(("classification", int(t.num_classes or 2)))
    if t.regresses:
        out.append(("regression", 1))
    return tuple(out)


def data_shape(cfg: SearchSpace, data: Any) -> DataShape | None:
    """The shape from the inspected data (``DataSetup``), else from the ``data.generate`` recipe that will
    write the file; None when neither is known without writing (a parquet/ROOT file not converted yet)."""
    if data is not None:
        dims = tuple(data.img_size) if data.kind == "objects" else (data.in_chans, *data.img_size)
        return DataShape(data.kind, tuple(int(d) for d in dims), _tasks(cfg))
    g, d = cfg.data.generate, cfg.data
    if g is None or Path(d.path).exists():
        return None
    if g.recipe == "event_objects":
        from trainables.data.object_names import EVENT_FEATURES, EVENT_OBJECTS  # the generator's layout

        return DataShape("objects", (len(EVENT_OBJECTS), len(EVENT_FEATURES)), _tasks(cfg), "recipe")
    chans = g.channels if isinstance(g.channels, int) else len(g.channels)
    if d.channels is not None:
        chans = len(d.channels)
    assert g.image_size is not None  # GenerateConfig's validator fills it in
    h, w = d.resize if d.resize else (g.image_size, g.image_size)
    return DataShape("images", (int(chans), int(h), int(w)), _tasks(cfg), "recipe")


# --------------------------------------------------------------------------- values to check
def _is_int(fields: dict, name: str) -> bool:
    return any(f.annotation is int for _, f, _ in fields.get(name, []))


def candidates(dim: Any, as_int: bool, ends_only: bool = False) -> list[Any]:
    """Every value a dimension can give a trial: all choices, every integer of a randint (its ends when
    ``ends_only``), every quniform step, both ends of a continuous range (rounded for an integer field)."""
    if isinstance(dim, FixedDim):
        return [dim.value]
    if isinstance(dim, ChoiceDim | GridDim):
        return list(dim.values)
    if isinstance(dim, RandIntDim):  # (past MAX_BUILDS values the caller falls back to the ends anyway)
        return [dim.low, dim.high] if ends_only else list(range(dim.low, min(dim.high, dim.low + MAX_BUILDS) + 1))
    if isinstance(dim, QUniformDim) and not ends_only:
        steps = min(math.floor((dim.high - dim.low) / dim.q + 1e-9), MAX_BUILDS)
        vals = [round(dim.low + dim.q * i, 12) for i in range(steps + 1)]
    else:
        vals = [dim.low, dim.high]
    if as_int:
        vals = [int(round(v)) for v in vals]
    return list(dict.fromkeys(vals))


def _cheapest(values: list[Any]) -> Any:
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return min(nums) if nums else values[0]


def combinations(cfg: SearchSpace, family: str, ends_only: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Trial parameters to build ``family`` with (every value of its shape parameters, the cheapest of the
    rest; conditions applied as the sampler applies them) and the names varied. Stops past MAX_BUILDS."""
    from e2e_search.spec.params import condition_order, is_active, never_active, param_owners, search_dims
    from trainables.registry import get_family

    fam = get_family(family)
    dims = search_dims(cfg)
    fields = param_owners(cfg)
    ignored = never_active(cfg)
    order = condition_order(dims)
    varied = set(fam.shape_params) & set(dims)
    for name in list(varied):  # what a varied parameter's condition depends on varies too
        stack = [name]
        while stack:
            for dep in dims[stack.pop()].when or {}:
                if dep not in varied and dep in dims:
                    varied.add(dep)
                    stack.append(dep)
    owners = {n: {f for _, _, f in o} for n, o in fields.items()}
    combos: list[dict[str, Any]] = [{"family": family}] if "family" in dims else [{}]
    for name in order:
        if name == "family" or name in ignored:
            continue
        if None not in owners.get(name, set()) and family not in owners.get(name, set()):
            continue  # another family's parameter
        vals = candidates(dims[name], _is_int(fields, name), ends_only)
        vals = vals if name in varied else [_cheapest(vals)]
        nxt = []
        for c in combos:
            if is_active(dims[name], c):
                nxt += [{**c, name: v} for v in vals]
            else:
                nxt.append(c)
            if len(nxt) > MAX_BUILDS:
                break
        combos = nxt
    return combos, [n for n in order if n in varied]


# --------------------------------------------------------------------------- building on the meta device
def _skip_init():
    """A torch function mode that skips weight initialization on meta tensors (in-place fills with scalars:
    random fills are most of a meta build's time, and they cannot change a shape)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipInit(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if (getattr(func, "__name__", "") in _INIT_OPS and args and getattr(args[0], "is_meta", False)
                    and not any(isinstance(a, torch.Tensor) for a in (*args[1:], *(kwargs or {}).values()))):
                return args[0]
            return func(*args, **(kwargs or {}))

    return SkipInit()


def try_build(family: str, params: dict[str, Any], shape: DataShape, sizes: list[int] | None = None) -> str | None:
    """None when the family's model builds for ``shape`` and runs a forward pass (training mode, a batch of
    the smallest batch size, on the meta device); else the reason. Errors of the meta device itself (an op
    it cannot run) count as fitting: only the family's own constraints are reported. ``sizes`` gets the
    parameter count of each model built."""
    import torch

    from trainables.params import split_params
    from trainables.registry import get_family

    fam = get_family(family)
    try:
        tp, fp = split_params(family, params)
    except Exception as e:  # noqa: BLE001 - a value the schema refuses (check_params has refused it already)
        return " ".join(str(e).split())
    import inspect

    kw: dict[str, Any] = {"num_outputs": sum(n for _, n in shape.tasks)}
    if "tasks" in inspect.signature(fam.build).parameters:
        kw["tasks"] = dict(shape.tasks)
    batch = max(1, min(tp.batch_size, 2))
    try:
        with torch.device("meta"):
            with _skip_init():
                if fam.inputs == "objects":
                    model = fam.build(fp, n_objects=shape.dims[0], n_features=shape.dims[1], **kw)
                else:
                    model = fam.build(fp, in_chans=shape.dims[0], img_size=tuple(shape.dims[1:]), **kw)
            model.train()
            if sizes is not None:
                sizes.append(sum(p.numel() for p in model.parameters()))
            x = torch.zeros(batch, *shape.dims)
            out = model(x, torch.ones(batch, shape.dims[0], dtype=torch.bool)) if fam.inputs == "objects" else model(x)
            if tuple(out.shape) != (batch, kw["num_outputs"]):
                return f"the model gives outputs of shape {tuple(out.shape)}, expected {(batch, kw['num_outputs'])}"
    except NotImplementedError:
        return None
    except Exception as e:  # noqa: BLE001 - any failure to build is what this check is for
        text = " ".join(str(e).split()) or type(e).__name__
        if "meta" in text.lower():
            return None  # the meta device cannot run it: no verdict
        if "Expected more than 1 value per channel when training" in text:  # torch's batch norm
            return (f"batch norm needs more than one value per channel, but a batch of {batch} reaches it as a "
                    f"1x1 feature map ({text}); use a batch_size of 2 or more, or larger images")
        return text
    return None


def _pattern(reason: str) -> str:
    return re.sub(r"[0-9.]+", "#", reason)


def _show(values: list[Any]) -> str:
    """Values for a message, runs of 3 or more consecutive integers as ``a..b``."""
    parts: list[str] = []
    i = 0
    while i < len(values):
        v = values[i]
        j = i
        while (isinstance(v, int) and not isinstance(v, bool) and j + 1 < len(values)
               and isinstance(values[j + 1], int) and values[j + 1] == values[j] + 1):
            j += 1
        if j - i >= 2:
            parts.append(f"{v}..{values[j]}")
        else:
            parts += [repr(x) if isinstance(x, str) else f"{x:g}" if isinstance(x, float) else str(x)
                      for x in values[i:j + 1]]
        i = j + 1
    return ", ".join(parts)


def check_shapes(cfg: SearchSpace, data: Any, sizes: list[int] | None = None) -> float:
    """Refuse (UserError naming ``params.<name>`` and the value) any parameter value a trial's model cannot be
    built with for this data; returns the seconds it took. Writes nothing. ``sizes`` gets the parameter count
    of every model built."""
    shape = data_shape(cfg, data)
    if shape is None:
        return 0.0
    from trainables.registry import get_family

    t0 = time.perf_counter()
    for family in cfg.families:
        if (get_family(family).inputs == "objects") != (shape.kind == "objects"):
            continue  # the data's kind is checked by data.inspect
        combos, varied = combinations(cfg, family)
        if len(combos) > MAX_BUILDS:
            combos, varied = combinations(cfg, family, ends_only=True)
            names = ", ".join("params." + n for n in varied)
            cfg.note(f"params.{varied[0]}" if varied else "family",
                     f"family {family}: more than {MAX_BUILDS} combinations of {names} to build; checked "
                     f"{min(len(combos), MAX_BUILDS)} with the ends of each range only (narrow the ranges to have "
                     "every value checked before the search starts)")
            combos = combos[:MAX_BUILDS]
        failed = []
        for c in combos:
            reason = try_build(family, c, shape, sizes)
            if reason:
                failed.append((c, reason))
        if failed:
            raise _explain(cfg, family, shape, failed, varied)
    return time.perf_counter() - t0


def _explain(cfg: SearchSpace, family: str, shape: DataShape, failed: list, varied: list[str]) -> UserError:
    """The parameter to blame for the first failing combination: one whose change (to another of its values,
    preferably one the YAML gives, else the family's default) makes the model build."""
    from e2e_search.spec.params import param_owners, search_dims

    combo, reason = failed[0]
    dims = search_dims(cfg)
    fields = param_owners(cfg)
    given = [n for n in combo if n != "family"]
    names = sorted(given, key=lambda n: (n not in varied, given.index(n)))
    blame = None
    for own in (True, False):
        for n in names:
            alts = [v for v in candidates(dims[n], _is_int(fields, n)) if v != combo[n]] if own else []
            if not own:
                default = next((f.default for m, f, o in fields.get(n, []) if o in (None, family)), None)
                alts = [default] if default is not None and default != combo[n] else []
            if any(try_build(family, {**combo, n: a}, shape) is None for a in alts):
                blame = n
                break
        if blame:
            break
    same = [c for c, r in failed if _pattern(r) == _pattern(reason)]
    if blame is None:
        context = ", ".join(f"{n}={combo[n]}" for n in names if n in varied) or "its defaults"
        return UserError(f"family {family} cannot be built for the data ({shape.describe()}) with {context}: "
                         f"{reason}; choose other parameter values or another family", key="family")
    bad = list(dict.fromkeys(c[blame] for c in same if blame in c))
    others = ", ".join(f"{n}={combo[n]}" for n in names if n != blame and n in varied)
    dim = dims[blame]
    if isinstance(dim, ChoiceDim | GridDim) and len(set(map(repr, dim.values))) > len(bad):
        fix = f"; or remove {_show(bad)} from params.{blame}"
    elif isinstance(dim, FixedDim):
        fix = "" if ";" in reason else f"; set params.{blame} to a value that fits"
    else:
        fix = f"; or narrow params.{blame} to leave out {_show(bad)}"
    verb = "does" if len(bad) == 1 else "do"
    where = f" in family {family}" if not isinstance(cfg.family, str) else ""
    return UserError(f"{_show(bad)} {verb} not fit the data ({shape.describe()}){where}"
                     f"{' with ' + others if others else ''}: {reason}{fix}", key=f"params.{blame}")
