"""Registry of model families (timm-style ``register_family`` + ``get_family``).

A family lives in one module under ``trainables/`` and registers itself once::

    @register_family("vit", params=VitParams)
    def build_vit(p: VitParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int) -> nn.Module:
        ...

``params`` is a pydantic model of the family's hyperparameters (with defaults);
the search YAML may name its fields under ``params``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from .errors import UserError, did_you_mean


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[..., Any]
    params: type[BaseModel]
    description: str = ""
    inputs: str = "image"
    """``image``: build(p, *, in_chans, img_size, num_outputs), forward(x (B, C, H, W));
    ``objects``: build(p, *, n_objects, n_features, num_outputs), forward(x (B, N, F), mask (B, N))."""
    shape_params: tuple[str, ...] = ()
    """The parameters whose values decide whether the model can be built for a data shape (patch and window
    sizes, stage counts, ...): e2e_search/shapes.py builds the model for every value they can take, before
    Ray starts. A build must raise ValueError with a fix when a value does not fit. Any other parameter must
    fit every data shape (tests/test_shapes.py checks this over extreme values)."""


_FAMILIES: dict[str, Family] = {}
NOT_FAMILIES = {"loop", "batches", "rollout"}  # modules of trainables/ that hold training functions, not families
_LOADED = False


def register_family(name: str, *, params: type[BaseModel], inputs: str = "image", shape_params: tuple[str, ...] = ()):
    def deco(build: Callable[..., Any]) -> Callable[..., Any]:
        if name in _FAMILIES and _FAMILIES[name].build is not build:
            raise RuntimeError(f"family '{name}' registered twice")
        unknown = set(shape_params) - set(params.model_fields)
        if unknown:
            raise RuntimeError(f"family '{name}': shape_params {sorted(unknown)} are not fields of {params.__name__}")
        doc = (build.__doc__ or "").strip().splitlines()
        _FAMILIES[name] = Family(name, build, params, doc[0] if doc else "", inputs, tuple(shape_params))
        return build

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import trainables

    for mod in pkgutil.iter_modules(trainables.__path__):
        if mod.name not in NOT_FAMILIES and not mod.name.startswith("_"):
            importlib.import_module(f"trainables.{mod.name}")
    _LOADED = True


def get_family(name: str) -> Family:
    _load_all()
    if name not in _FAMILIES:
        raise UserError(f"unknown family '{name}'{did_you_mean(name, _FAMILIES)}; set family to one of "
                        f"{', '.join(sorted(_FAMILIES))}", key="family")
    return _FAMILIES[name]


def family_names() -> list[str]:
    _load_all()
    return sorted(_FAMILIES)
