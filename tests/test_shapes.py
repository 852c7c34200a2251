"""The shape check before Ray (e2e_search/spec/shapes.py): every family built on the meta device for every value
its shape parameters can take. Its soundness rests on two claims tested here: the meta build fails exactly
where a real build fails, and a family's other parameters never decide whether the model builds."""

from __future__ import annotations

import itertools
import time
import typing
from pathlib import Path

import pytest
import torch

from e2e_search.spec.loader import load
from e2e_search.spec.shapes import DataShape, candidates, check_shapes, combinations, try_build
from trainables.registry import family_names, get_family

SHIPPED = sorted(Path("search_spaces").glob("*.yaml"))
IMAGE = DataShape("images", (3, 7, 9), (("classification", 2),))
OBJECTS = DataShape("objects", (5, 3), (("classification", 2), ("regression", 1)))


def _extremes(field) -> list:
    """A field's boundary values (and one odd one): what could break a build if anything does."""
    ann = field.annotation
    if typing.get_origin(ann) is typing.Literal:
        return list(typing.get_args(ann))
    if ann is bool:
        return [True, False]
    lo = hi = None
    for m in field.metadata:
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
        if getattr(m, "gt", None) is not None:
            lo = m.gt + (1 if ann is int else 1e-3)
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
        if getattr(m, "lt", None) is not None:
            hi = m.lt - (1 if ann is int else 1e-3)
    if ann is int:
        lo = 0 if lo is None else lo
        return sorted({lo, lo + 1, lo + 4 if hi is None else hi})
    if ann is float:
        return [v for v in (lo, hi if hi is not None else 8.0) if v is not None]
    return []


@pytest.mark.parametrize("family", family_names())
def test_parameters_outside_shape_params_never_break_a_build(family):
    fam = get_family(family)
    shape = OBJECTS if fam.inputs == "objects" else IMAGE
    assert try_build(family, {}, shape) is None  # the defaults fit
    others = {n: _extremes(f) for n, f in fam.params.model_fields.items() if n not in fam.shape_params}
    others = {n: v for n, v in others.items() if v}
    tried = [{n: v} for n, vals in others.items() for v in vals]  # each alone
    for dim, heads in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads")):  # widths split over heads
        if dim in others and heads in others:
            tried += [{dim: d, heads: h} for d, h in itertools.product([9, 33], [2, 3, 8])]
    worst = {n: max(v) if all(isinstance(x, int | float) for x in v) else v[-1] for n, v in others.items()}
    tried.append(worst)  # everything at once
    failures = [(p, r) for p in tried if (r := try_build(family, p, shape))]
    assert not failures, f"{family}: declare these in shape_params or make them fit any shape: {failures[:3]}"


def _real(family: str, params: dict, shape: DataShape, batch: int) -> str | None:
    """The same build and one training step's forward on the CPU with real tensors."""
    fam = get_family(family)
    from trainables.params import split_params

    _, fp = split_params(family, params)
    n_out = sum(n for _, n in shape.tasks)
    try:
        if fam.inputs == "objects":
            m = fam.build(fp, n_objects=shape.dims[0], n_features=shape.dims[1], num_outputs=n_out)
            m.train()(torch.randn(batch, *shape.dims), torch.ones(batch, shape.dims[0], dtype=torch.bool))
        else:
            m = fam.build(fp, in_chans=shape.dims[0], img_size=tuple(shape.dims[1:]), num_outputs=n_out)
            m.train()(torch.randn(batch, *shape.dims))
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None


@pytest.mark.parametrize("family, params, dims, fails", [
    ("vit", {"patch_size": 32, "patch_fit": "crop"}, (3, 16, 16), True),
    ("vit", {"patch_size": 32, "patch_fit": "pad"}, (3, 16, 16), False),
    ("vit", {"patch_size": 4, "attention": "linear", "pool": "map"}, (2, 16, 12), False),  # no autocast on meta
    ("vit", {"patch_size": 3, "attention": "window", "window_size": 4}, (1, 10, 7), False),
    ("mae", {"patch_size": 8, "mask_ratio": 0.9}, (3, 16, 16), True),
    ("mae", {"patch_size": 8, "mask_ratio": 0.9, "pretrain_epochs": 0}, (3, 16, 16), False),
    ("mae", {"patch_size": 8, "mask_ratio": 0.7}, (3, 16, 16), False),
    ("resnet15", {"batch_size": 1}, (3, 4, 4), True),
    ("resnet15", {"batch_size": 1}, (3, 5, 5), False),
    ("resnet15", {"batch_size": 2}, (3, 1, 1), False),
    ("hybrid_vit", {"batch_size": 1, "stem_stride": 8, "patch_size": 1}, (3, 8, 8), True),
    ("hybrid_vit", {"stem_stride": 8, "patch_size": 4}, (3, 7, 9), False),
    ("swin", {"patch_size": 1, "stages": 4, "window_size": 7}, (3, 13, 11), False),
    ("cait", {"patch_size": 25}, (3, 7, 9), False),
    ("event_transformer", {"num_heads": 3, "embed_dim": 8}, (1, 1), False),
    ("deepsets", {"set_pool": "max"}, (4, 21), False),
])
def test_the_meta_build_fails_exactly_where_a_real_build_fails(family, params, dims, fails):
    kind = "objects" if get_family(family).inputs == "objects" else "images"
    shape = DataShape(kind, dims, (("classification", 2),))
    batch = max(1, min(params.get("batch_size", 64), 2))
    meta, real = try_build(family, params, shape), _real(family, params, shape, batch)
    assert (meta is not None) == (real is not None) == fails, (meta, real)


def test_candidates_are_every_value_a_trial_can_get():
    from e2e_search.spec.dims import ChoiceDim, FixedDim, LogUniformDim, QUniformDim, RandIntDim, UniformDim

    assert candidates(RandIntDim(type="randint", low=3, high=7), True) == [3, 4, 5, 6, 7]
    assert candidates(RandIntDim(type="randint", low=3, high=7), True, ends_only=True) == [3, 7]
    assert candidates(QUniformDim(type="quniform", low=2, high=4, q=0.5), False) == [2, 2.5, 3, 3.5, 4]
    assert candidates(UniformDim(type="uniform", low=0.1, high=0.9), False) == [0.1, 0.9]
    assert candidates(UniformDim(type="uniform", low=1.6, high=4.4), True) == [2, 4]  # what OptunaSpace rounds to
    assert candidates(LogUniformDim(type="loguniform", low=1e-4, high=1e-2), False) == [1e-4, 1e-2]
    assert candidates(ChoiceDim(type="choice", values=["a", "b"]), False) == ["a", "b"]
    assert candidates(FixedDim(value=5), True) == [5]


def _cfg(tmp_path, family, params, **over) -> object:
    import yaml

    raw = {"name": "shapes", "family": family, "task": {"type": "classification"},
           "data": {"path": str(tmp_path / "later.h5"), "generate": {"recipe": "toy_jets", "image_size": 16}},
           "params": params, "search": {"num_samples": 8}, "scheduler": {"max_epochs": 3}, **over}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    return load(tmp_path / "s.yaml")


def test_combinations_vary_shape_params_only_and_follow_conditions(tmp_path):
    cfg = _cfg(tmp_path, "vit", {
        "patch_size": {"type": "choice", "values": [4, 8, 16]},
        "patch_fit": {"type": "choice", "values": ["pad", "crop"]},
        "depth": {"type": "randint", "low": 2, "high": 6},                 # not a shape parameter: its cheapest
        "attention": {"type": "choice", "values": ["softmax", "window"]},
        "window_size": {"type": "choice", "values": [2, 3], "when": {"attention": "window"}},
        "batch_size": {"type": "choice", "values": [16, 8]},
    })
    combos, varied = combinations(cfg, "vit")
    assert set(varied) == {"patch_size", "patch_fit"} and len(combos) == 6
    assert {c["depth"] for c in combos} == {2} and {c["batch_size"] for c in combos} == {8}
    assert all("window_size" not in c for c in combos)  # attention is held at softmax: the window never applies


def test_combinations_in_a_family_search(tmp_path):
    cfg = _cfg(tmp_path, {"type": "grid", "values": ["vit", "mae", "resnet15"]}, {
        "patch_size": {"type": "choice", "values": [4, 8], "when": {"family": ["vit", "mae"]}},
        "mask_ratio": {"type": "uniform", "low": 0.5, "high": 0.9},
        "width": {"type": "choice", "values": [8, 16]},
        "pretrain_epochs": 1,
    })
    vit, _ = combinations(cfg, "vit")
    mae, _ = combinations(cfg, "mae")
    cnn, _ = combinations(cfg, "resnet15")
    assert [c["patch_size"] for c in vit] == [4, 8] and all("mask_ratio" not in c for c in vit)
    assert sorted((c["patch_size"], c["mask_ratio"]) for c in mae) == [(4, 0.5), (4, 0.9), (8, 0.5), (8, 0.9)]
    assert cnn == [{"family": "resnet15", "width": 8}]


@pytest.mark.parametrize("path", SHIPPED, ids=str)
def test_shipped_search_spaces_pass_with_few_builds(path, tmp_path, monkeypatch):
    path = path.resolve()
    monkeypatch.chdir(tmp_path)  # the data is not generated yet: the recipe's shape is checked
    cfg = load(path)
    builds = sum(len(combinations(cfg, f)[0]) for f in cfg.families)
    assert builds <= 24, builds  # about 0.1 s each on one core (compare_families.yaml: 17, eight families)
    t0 = time.perf_counter()
    check_shapes(cfg, None)
    print(f"{path.name}: {builds} builds, {time.perf_counter() - t0:.2f} s")
    assert not list(tmp_path.iterdir())
