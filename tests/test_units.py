"""Fast checks of the parts a search is built from (no Ray)."""

from __future__ import annotations

import h5py
import numpy as np
import optuna
import pytest
import torch

from e2e_search.data.inspect import inspect
from e2e_search.data.splits import split_indices
from e2e_search.spec.loader import validate
from e2e_search.spec.params import OptunaSpace, grid_points
from e2e_search.spec.schema import SearchSpace
from tests.conftest import base_config, write_e2e
from trainables.data.images import H5ImageDataset
from trainables.families.vit import VitParams, build_vit
from trainables.metrics import classification_metrics, regression_metrics


def _cfg(tmp_path, **over) -> SearchSpace:
    data = write_e2e(tmp_path / "d.h5", n=40)
    return validate(base_config(tmp_path, data, **over), source="test.yaml")


def _sample(cfg: SearchSpace, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space = OptunaSpace(cfg)
    for p in grid_points(cfg):
        study.enqueue_trial(p)
    out = []
    for _ in range(n):
        t = study.ask()
        fixed = space(t)
        out.append({**t.params, **fixed})
        study.tell(t, 0.0)
    return out


def test_conditional_params_only_where_they_apply(tmp_path):
    cfg = _cfg(tmp_path, params={
        "pool": {"type": "choice", "values": ["token", "avg"]},
        "drop_path": {"type": "uniform", "low": 0.0, "high": 0.2, "when": {"pool": "avg"}},
        "depth": {"type": "randint", "low": 1, "high": 3},
        "mlp_ratio": {"type": "quniform", "low": 1, "high": 3, "q": 0.5},
        "embed_dim": {"type": "quniform", "low": 16, "high": 64, "q": 16},
    })
    samples = _sample(cfg, 30)
    pools = {s["pool"] for s in samples}
    assert pools == {"token", "avg"}
    for s in samples:
        assert ("drop_path" in s) == (s["pool"] == "avg")
        assert 1 <= s["depth"] <= 3 and isinstance(s["depth"], int)
        assert s["mlp_ratio"] in {1.0, 1.5, 2.0, 2.5, 3.0}
        assert s["embed_dim"] in {16, 32, 48, 64} and isinstance(s["embed_dim"], int)


def test_grid_combinations_are_all_tried_first(tmp_path):
    cfg = _cfg(tmp_path, params={"patch_size": {"type": "grid", "values": [4, 8]},
                                 "depth": {"type": "grid", "values": [1, 2]}},
               search={"num_samples": 5})
    assert len(grid_points(cfg)) == 4
    first = [(s["patch_size"], s["depth"]) for s in _sample(cfg, 4)]
    assert sorted(first) == [(4, 1), (4, 2), (8, 1), (8, 2)]


def test_split_is_deterministic_and_disjoint():
    a = split_indices(1000, 0.15, 0.1, seed=3)
    b = split_indices(1000, 0.15, 0.1, seed=3)
    c = split_indices(1000, 0.15, 0.1, seed=4)
    assert a == b and a != c
    train, val, test = map(set, a)
    assert len(train) + len(val) + len(test) == 1000 and not (train & val or train & test or val & test)
    assert (len(val), len(test)) == (150, 100)


def test_split_is_stratified_by_class():
    """Issue 13: 200 jets, 30 of class 1, all of them in the training rows of the unstratified default split:
    the stratified split puts class 1 in train, val and test in the fractions asked, deterministic in the seed."""
    train0, _, _ = split_indices(200, 0.2, 0.1, seed=0)
    y = np.zeros(200, np.int64)
    y[train0[:30]] = 1
    a = split_indices(200, 0.2, 0.1, seed=0, labels=y)
    assert a == split_indices(200, 0.2, 0.1, seed=0, labels=y) != split_indices(200, 0.2, 0.1, seed=1, labels=y)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (140, 40, 20)  # the same sizes as unstratified
    assert [int(y[s].sum()) for s in a] == [21, 6, 3]
    assert sorted(train + val + test) == list(range(200))
    # A rare class lands in every split from 3 samples (2 without a test split); below that, training first.
    for count, test_fraction, expect in [(3, 0.1, [1, 1, 1]), (2, 0.0, [1, 1, 0]), (2, 0.1, [1, 1, 0]),
                                         (1, 0.1, [1, 0, 0])]:
        y = np.zeros(200, np.int64)
        y[np.arange(count) * 11] = 1
        parts = split_indices(200, 0.2, test_fraction, seed=5, labels=y)
        assert [int(y[s].sum()) for s in parts] == expect, (count, test_fraction)
    # data.limit draws the same subset as before; the split within it is stratified
    y = np.arange(1000) % 4
    train, val, test = split_indices(1000, 0.15, 0.1, seed=3, limit=100, labels=y)
    assert set(train + val + test) == set(np.random.default_rng(3).permutation(1000)[:100].tolist())
    assert all(set(y[s]) == {0, 1, 2, 3} for s in (train, val, test))


def test_layouts_and_channel_order_read_the_same_pixels(tmp_path):
    last = write_e2e(tmp_path / "last.h5", n=20, size=12, channels=4, layout="channels_last")
    first = write_e2e(tmp_path / "first.h5", n=20, size=12, channels=4, layout="channels_first")
    c1 = validate(base_config(tmp_path, last, data={"path": str(last), "channels": [3, 1], "normalize": "none"}), source="t")
    c2 = validate(base_config(tmp_path, first, data={"path": str(first), "channels": [3, 1], "normalize": "none",
                                                     "layout": "channels_first"}), source="t")
    s1, s2 = inspect(c1), inspect(c2)
    assert s1.in_chans == 2 and s1.img_size == (12, 12)
    x1, y1 = H5ImageDataset(s1, s1.train)[0]
    x2, y2 = H5ImageDataset(s2, s2.train)[0]
    assert x1.shape == (2, 12, 12) and torch.equal(x1, x2) and y1 == y2


def test_per_channel_normalization_from_training_split(tmp_path):
    s = inspect(_cfg(tmp_path))
    assert len(s.mean) == 3 and all(v > 0 for v in s.std)
    ds = H5ImageDataset(s, s.train)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.2  # roughly centred


@pytest.mark.parametrize("size,chans,patch,fit,expect", [
    (125, 3, 10, "pad", 130), (125, 8, 25, "pad", 125), (32, 2, 5, "crop", 30), (32, 2, 5, "pad", 35)])
def test_vit_handles_sizes_not_divisible_by_patch(size, chans, patch, fit, expect):
    m = build_vit(VitParams(patch_size=patch, depth=1, embed_dim=30, num_heads=4, patch_fit=fit),
                  in_chans=chans, img_size=(size, size), num_outputs=3)
    assert m[0].out_size == (expect, expect)
    out = m(torch.randn(2, chans, size, size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_metrics():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-1.0, 2.0], [0.5, 0.0]])
    m = classification_metrics(logits, np.array([0, 1, 1, 0]))
    assert m["val_auc"] == 1.0 and m["val_acc"] == 1.0
    r = regression_metrics(np.array([110.0, 90.0]), np.array([100.0, 100.0]))
    assert r["val_mae"] == 10.0 and r["val_bias"] == 0.0 and r["val_resolution"] == pytest.approx(0.1)


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path("search_spaces").glob("*.yaml")), ids=str)
def test_shipped_search_spaces_validate(path, tmp_path, monkeypatch):
    from e2e_search.search.plan import plan
    from e2e_search.spec.loader import load
    from tests.conftest import write_objects
    from trainables.registry import get_family

    path = path.resolve()
    monkeypatch.chdir(tmp_path)
    shipped = load(path)
    assert shipped.data.generate is not None, "every shipped YAML must run as shipped: name a generator recipe"
    if get_family(shipped.families[0]).inputs == "objects":
        events = write_objects(tmp_path / "events.h5", n=400)  # 1% labels still hold both classes
        with h5py.File(events, "a") as f:
            f["n_b"] = (np.arange(400) % 3).astype(np.float32)  # the truth the ablation's second task reads
        cfg = load(path, [f"data.path={events}"])
        assert plan(cfg, generate=False).data.img_size == (6, 4)
    else:
        size = shipped.data.generate.image_size
        cfg = load(path, [f"data.path={write_e2e(tmp_path / 'jets.h5', n=40, size=size)}"])
        setup = plan(cfg, generate=False).data
        assert setup.img_size == (size, size) and setup.in_chans == 3
    assert not (tmp_path / "e2e_runs").exists()


def test_device_batches_shard_shuffle_and_flip():
    from trainables.core.batches import DeviceBatches

    x = torch.arange(10 * 1 * 2 * 2, dtype=torch.float32).reshape(10, 1, 2, 2)
    y = torch.arange(10)
    seen = []
    for rank in range(2):
        b = DeviceBatches(x, y, 3, "cpu", shuffle=True, rank=rank, world=2, seed=1)
        b.set_epoch(4)
        seen.append(torch.cat([yb for _, yb in b]).tolist())
        assert len(b) == 2
    assert sorted(seen[0] + seen[1]) == list(range(10))  # disjoint shards covering the split
    b = DeviceBatches(x, y, 3, "cpu", shuffle=True, seed=1)
    b.set_epoch(1)
    first = torch.cat([yb for _, yb in b]).tolist()
    b.set_epoch(2)
    assert first != torch.cat([yb for _, yb in b]).tolist()  # a new order each epoch
    assert [len(yb) for _, yb in DeviceBatches(x, y, 4, "cpu", shuffle=False, drop_last=True)] == [4, 4]
    flipped = DeviceBatches(x, y, 10, "cpu", shuffle=False, flip=True)
    torch.manual_seed(0)
    xb, yb = next(iter(flipped))
    variants = {tuple(xb[i].flatten().tolist()) for i in range(10)} - {tuple(x[i].flatten().tolist()) for i in range(10)}
    assert variants and all(sorted(v) == sorted(x[yb[i]].flatten().tolist()) for i, v in enumerate(
        tuple(xb[i].flatten().tolist()) for i in range(10)))


def test_family_as_a_search_dimension(tmp_path):
    cfg = _cfg(tmp_path, family={"type": "grid", "values": ["vit", "resnet15"]}, params={
        "patch_size": {"type": "choice", "values": [4, 8]},            # vit's own
        "width": {"type": "choice", "values": [8, 16]},                # resnet15's own
        "drop_path": {"type": "uniform", "low": 0.0, "high": 0.1, "when": {"family": "vit"}},
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},      # training: every family
    }, search={"num_samples": 12})
    assert [p["family"] for p in grid_points(cfg)] == ["vit", "resnet15"]
    samples = _sample(cfg, 12)
    assert [s["family"] for s in samples[:2]] == ["vit", "resnet15"]  # each family tried first
    for s in samples:
        assert "lr" in s
        assert ("patch_size" in s) == ("drop_path" in s) == (s["family"] == "vit")
        assert ("width" in s) == (s["family"] == "resnet15")


@pytest.mark.parametrize("family,params,key,words", [
    ({"type": "choice", "values": ["vit", "deepsets"]}, {}, "family.values.1", "one input kind"),
    ({"type": "choice", "values": ["vit", "resnte15"]}, {}, "family.values.1", "did you mean 'resnet15'"),
    ({"type": "grid", "values": ["vit", "vit"]}, {}, "family.values.1", "listed twice"),
    ("vit", {"family": {"type": "choice", "values": ["vit"]}}, "params.family", "top-level family"),
    ({"type": "choice", "values": ["vit", "resnet15"]}, {"blocks": 3, "depth": {"type": "choice", "values": [1],
                                                                                 "when": {"family": "cnn"}}},
     "params.depth.when.family", "never takes the value 'cnn'"),
    ("vit", {"width": 8}, "params.width", "not a parameter of family 'vit'"),
])
def test_family_dimension_errors(tmp_path, family, params, key, words):
    from trainables.errors import UserError

    data = write_e2e(tmp_path / "d.h5", n=40)
    raw = base_config(tmp_path, data, family=family)
    raw["params"] = {**raw["params"], **params} if family == "vit" else params
    with pytest.raises(UserError) as e:
        validate(raw, source="test.yaml")
    assert e.value.key == key and words in e.value.message, (e.value.key, e.value.message)


def test_pretrain_epochs_must_leave_task_epochs(tmp_path):
    from trainables.errors import UserError

    data = write_e2e(tmp_path / "d.h5", n=40)
    raw = base_config(tmp_path, data, family="mae", params={"pretrain_epochs": {"type": "choice", "values": [1, 2]}})
    with pytest.raises(UserError) as e:
        validate(raw, source="test.yaml")
    assert e.value.key == "params.pretrain_epochs" and "scheduler.max_epochs is 2" in e.value.message
    raw["params"] = {"pretrained": str(tmp_path / "none.pt")}
    with pytest.raises(UserError) as e:
        validate(raw, source="test.yaml")
    assert e.value.key == "params.pretrained" and "not found" in e.value.message


def test_joint_task_reads_label_and_target(tmp_path):
    data = write_e2e(tmp_path / "d.h5", n=40)
    cfg = validate(base_config(tmp_path, data, task={"type": "joint", "num_classes": 2, "target": "m0"}), source="t")
    setup = inspect(cfg)
    assert setup.task == "joint" and setup.label_key == "y" and setup.target_key == "m0"
    ds = H5ImageDataset(setup, setup.train[:4])
    x, y = ds[1]
    assert y.shape == (2,) and y.dtype == torch.float32
    import h5py

    with h5py.File(data) as f:
        label, mass = f["y"][setup.train[1]], f["m0"][setup.train[1]]
    assert y[0] == label and y[1].item() == pytest.approx((mass - setup.target_mean) / setup.target_std, rel=1e-5)
    assert cfg.search.metric == "val_auc"


def test_pareto_front_keeps_only_undominated_points():
    from e2e_search.analysis.report import pareto_front

    # (val_auc max, val_loss min): (0.9, 0.3) is beaten by (0.95, 0.2); (0.97, 0.25) and (0.95, 0.2) trade off.
    pts = [(0.9, 0.3), (0.95, 0.2), (0.97, 0.25), (0.8, 0.5)]
    assert pareto_front(pts, ("max", "min")) == [1, 2]
    assert pareto_front(pts, ("max", "max")) == [0, 2, 3]  # both up: (0.95, 0.2) is beaten by (0.97, 0.25)
