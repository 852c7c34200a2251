"""Registry of model families (timm-style ``register_family`` + ``get_family``).

A family lives in one module under ``trainables/families/`` and registers itself once, declaring what it
can do (:class:`Capabilities`)::

    @register_family("vit", params=VitParams, shape_params=("patch_size",),
                     capabilities=Capabilities(task_heads=True, rollout=True))
    def build_vit(p: VitParams, *, in_chans: int, img_size: tuple[int, int], num_outputs: int,
                  tasks: dict[str, int] | None = None) -> nn.Module:
        ...

``params`` is a pydantic model of the family's hyperparameters (with defaults); the search YAML may name
its fields under ``params``. The training core, export and the checks before Ray starts read the declared
capabilities; nothing is guessed from signatures or attributes. A declaration that does not hold (a
``task_heads`` family whose build takes no ``tasks``, a ``pretraining`` family without a
``pretrain_epochs`` field) raises ``RuntimeError`` when the module is imported.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from trainables.errors import UserError, did_you_mean


class Capabilities(BaseModel):
    """What a family declares about itself when it registers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: Literal["image", "objects"] = "image"
    """``image``: ``build(p, *, in_chans, img_size, num_outputs)``, ``forward(x (B, C, H, W))``;
    ``objects``: ``build(p, *, n_objects, n_features, num_outputs)``, ``forward(x (B, N, F), mask (B, N))``."""
    task_heads: bool = False
    """``build`` also takes ``tasks`` ({"classification": C, "regression": 1}, in output-column order) and gives
    each task its own head (joint tasks)."""
    pretraining: bool = False
    """Self-supervised pretraining first: ``params`` has ``pretrain_epochs`` and ``forward(..., pretrain=True)``
    returns the scalar pretraining loss. Epochs count across both phases."""
    unused_parameters: bool = False
    """Some parameters get no gradient in some epochs (pretraining decoders, a linearly probed encoder): DDP
    must look for them (``find_unused_parameters``). Implied by ``pretraining``."""
    rollout: bool = False
    """Attention rollout maps over the input image (trainables/attention/rollout.py) are saved with each checkpoint."""
    task_attention: bool = False
    """Objects families with query heads: the model has ``task_attention(x (B, N, F), mask (B, N)) -> (B, Q, N)``
    (each task query's attention over the objects) and ``query_labels() -> list[str]`` (Q labels); the maps are
    saved with each checkpoint (trainables/attention/tasks.py)."""
    masked_objects: bool = False
    """Objects families that pretrain by hiding objects: the model has ``sample_hidden(mask (B, N), generator)
    -> (B, N) bool`` and ``masked_errors(x, mask, hidden) -> (B, N, F)`` squared errors; pretraining epochs
    log the ``val_recon_*`` metrics (trainables/core/recon.py)."""
    empty_pixel: bool = False
    """``build`` also takes ``empty_pixel``: per channel, the value an empty detector cell (0 in the file) holds
    after the data's preprocessing (e.g. -mean/std after per-channel normalization), for models that tell
    empty patches from hits. Builders called without it (the shape check) take 0."""
    pixel_std: bool = False
    """``build`` also takes ``pixel_std``: the per-channel std of the data's normalization (None without one), so
    that with ``empty_pixel`` a model can recover each pixel's energy, (x - empty) * std (pair features)."""
    hits: bool = False
    """Image families whose tokens are the detector hits (trainables/families/hit_transformer.py; needs
    ``empty_pixel`` and ``pixel_std``): ``forward`` takes either images (B, C, H, W) or a hit list
    ``(hits (B, K, 4), mask (B, K))`` with hits = (channel, row, column, energy above the empty value, not normalized).
    With ``data.cache: sparse`` the training core feeds hit lists built from the cache, never a dense image
    (trainables/core/batches.py)."""


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[..., Any]
    params: type[BaseModel]
    description: str = ""
    capabilities: Capabilities = field(default_factory=Capabilities)
    shape_params: tuple[str, ...] = ()
    """The parameters whose values decide whether the model can be built for a data shape (patch and window
    sizes, stage counts, ...): e2e_search/spec/shapes.py builds the model for every value they can take, before
    Ray starts. A build must raise ValueError with a fix when a value does not fit. Any other parameter must
    fit every data shape (tests/test_shapes.py checks this over extreme values)."""

    @property
    def inputs(self) -> str:
        return self.capabilities.inputs


_FAMILIES: dict[str, Family] = {}
_LOADED = False


def _check_declared(name: str, build: Callable[..., Any], params: type[BaseModel], caps: Capabilities,
                    shape_params: tuple[str, ...]) -> None:
    """RuntimeError when the declaration does not match the builder or the params model."""
    unknown = set(shape_params) - set(params.model_fields)
    if unknown:
        raise RuntimeError(f"family '{name}': shape_params {sorted(unknown)} are not fields of {params.__name__}")
    takes = set(inspect.signature(build).parameters)
    need = {"in_chans", "img_size", "num_outputs"} if caps.inputs == "image" else {"n_objects", "n_features",
                                                                                    "num_outputs"}
    if need - takes:
        raise RuntimeError(f"family '{name}' declares inputs={caps.inputs!r}: its build must take "
                           f"{', '.join(sorted(need))} (missing {', '.join(sorted(need - takes))})")
    if caps.task_heads != ("tasks" in takes):
        raise RuntimeError(f"family '{name}': task_heads={caps.task_heads} but its build "
                           f"{'does not take' if caps.task_heads else 'takes'} 'tasks'")
    if caps.empty_pixel and "empty_pixel" not in takes:
        raise RuntimeError(f"family '{name}' declares empty_pixel: its build must take 'empty_pixel'")
    if caps.pixel_std and "pixel_std" not in takes:
        raise RuntimeError(f"family '{name}' declares pixel_std: its build must take 'pixel_std'")
    if caps.hits and (caps.inputs != "image" or not caps.empty_pixel or not caps.pixel_std):
        raise RuntimeError(f"family '{name}' declares hits: it must take images and declare empty_pixel and pixel_std")
    if (caps.task_attention or caps.masked_objects) and caps.inputs != "objects":
        raise RuntimeError(f"family '{name}': task_attention and masked_objects are for inputs='objects'")
    if caps.masked_objects and not caps.pretraining:
        raise RuntimeError(f"family '{name}' declares masked_objects: it must declare pretraining too")
    if caps.pretraining and "pretrain_epochs" not in params.model_fields:
        raise RuntimeError(f"family '{name}' declares pretraining: {params.__name__} needs a pretrain_epochs field")


def register_family(name: str, *, params: type[BaseModel], capabilities: Capabilities | None = None,
                    shape_params: tuple[str, ...] = ()):
    """Decorator registering ``build`` as family ``name``; raises RuntimeError on a second registration under
    the same name or a declaration that does not hold."""
    caps = capabilities or Capabilities()
    if caps.pretraining and not caps.unused_parameters:
        caps = caps.model_copy(update={"unused_parameters": True})

    def deco(build: Callable[..., Any]) -> Callable[..., Any]:
        if name in _FAMILIES and _FAMILIES[name].build is not build:
            raise RuntimeError(f"family '{name}' registered twice")
        _check_declared(name, build, params, caps, tuple(shape_params))
        doc = (build.__doc__ or "").strip().splitlines()
        _FAMILIES[name] = Family(name, build, params, doc[0] if doc else "", caps, tuple(shape_params))
        return build

    return deco


FAMILIES_PACKAGE = "trainables.families"
"""Every module of this package is a family (one file each, registered on import)."""


def _load_all() -> None:
    """Import every module of trainables/families/ (each registers its family)."""
    global _LOADED
    if _LOADED:
        return
    # By name, not by import: the families import this module (to register) and the registry sits below them.
    package = importlib.import_module(FAMILIES_PACKAGE)
    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{FAMILIES_PACKAGE}.{mod.name}")
    _LOADED = True


def get_family(name: str) -> Family:
    """The registered family ``name``; UserError (key ``family``) naming the known ones otherwise."""
    _load_all()
    if name not in _FAMILIES:
        raise UserError(f"unknown family '{name}'{did_you_mean(name, _FAMILIES)}; set family to one of "
                        f"{', '.join(sorted(_FAMILIES))}", key="family")
    return _FAMILIES[name]


def family_names() -> list[str]:
    _load_all()
    return sorted(_FAMILIES)
