"""Every registered family, every task: one training step through the loop's own model/loss builders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables.core.checkpoint import checkpoint_score
from trainables.core.model import build_model, task_loss
from trainables.data.setup import DataSetup
from trainables.data.targets import encode_labels
from trainables.metrics import regression_metrics, rejection_at, task_metrics
from trainables.registry import family_names, get_family

IMAGE_SHAPES = {"125x125x3": (3, 125, 125), "32x32x2": (2, 32, 32), "125x125x8": (8, 125, 125)}
OBJECT_SHAPES = {"6x4": (6, 4), "20x7": (20, 7)}
TASKS = {"binary": ("classification", 2), "3class": ("classification", 3), "regression": ("regression", 0),
         "joint": ("joint", 2)}
IMAGE_FAMILIES = [f for f in family_names() if get_family(f).inputs == "image"]
OBJECT_FAMILIES = [f for f in family_names() if get_family(f).inputs == "objects"]


def _setup(task: str, classes: int, in_chans: int, size: tuple[int, int], kind: str = "images") -> DataSetup:
    return DataSetup(path="-", image_key="x", label_key="y", layout="channels_first", channels=list(range(in_chans)),
                     in_chans=in_chans, img_size=size, task=task, num_classes=classes, train=[], val=[], test=[],
                     mean=None, std=None, target_mean=100.0, target_std=30.0, kind=kind,
                     target_key="m" if task == "joint" else None)


def _labels(s: DataSetup, n: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % max(s.num_classes, 2)
    mass = rng.uniform(50, 200, n)
    raw = labels if s.task == "classification" else mass if s.task == "regression" else labels
    return torch.as_tensor(encode_labels(s, raw, mass if s.task == "joint" else None))


def _step(family: str, s: DataSetup, x, n: int) -> None:
    torch.manual_seed(0)
    model = build_model(family, {}, s)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    y = _labels(s, n)
    inputs = x if isinstance(x, tuple) else (x,)
    out = model(*inputs)
    width = {"classification": s.num_classes, "regression": 1, "joint": s.num_classes + 1}[s.task]
    assert out.shape == (n, width)
    loss = task_loss(s, "auto", 0.5)(out, y)
    opt.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if hasattr(get_family(family).params(), "pretrain_epochs"):  # the self-supervised step too
        opt.zero_grad()
        pre = model(*inputs, pretrain=True)
        assert pre.ndim == 0 and torch.isfinite(pre)
        pre.backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("task", TASKS, ids=str)
@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=str)
@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_image_family_trains_a_step(family, shape, task):
    c, h, w = IMAGE_SHAPES[shape]
    kind, classes = TASKS[task]
    _step(family, _setup(kind, classes, c, (h, w)), torch.rand(2, c, h, w) * (torch.rand(2, c, h, w) < 0.05), 2)


@pytest.mark.parametrize("task", TASKS, ids=str)
@pytest.mark.parametrize("shape", OBJECT_SHAPES, ids=str)
@pytest.mark.parametrize("family", OBJECT_FAMILIES)
def test_object_family_trains_a_step(family, shape, task):
    n_obj, n_feat = OBJECT_SHAPES[shape]
    kind, classes = TASKS[task]
    x = torch.randn(3, n_obj, n_feat)
    mask = torch.ones(3, n_obj, dtype=torch.bool)
    mask[1, n_obj // 2:] = False  # a padded event
    _step(family, _setup(kind, classes, n_feat, (n_obj, n_feat), "objects"), (x, mask), 3)


def test_the_families_the_issue_asks_for_are_registered():
    assert {"vit", "mae", "event_transformer", "resnet15", "deepsets"} <= set(family_names())
    assert len(set(IMAGE_FAMILIES) - {"vit", "mae", "resnet15"}) >= 2  # more timm vision-transformer types


def test_joint_loss_weight_scales_only_the_regression_part():
    s = _setup("joint", 2, 1, (4, 4))
    out = torch.tensor([[2.0, 0.0, 0.5], [0.0, 1.0, -0.5]])
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    ce = torch.nn.functional.cross_entropy(out[:, :2], y[:, 0].long())
    mse = torch.nn.functional.mse_loss(out[:, 2], y[:, 1])
    assert task_loss(s, "auto", 0.0)(out, y) == pytest.approx(ce.item())
    assert task_loss(s, "mse", 2.0)(out, y) == pytest.approx((ce + 2 * mse).item())


def test_rejection_at_signal_efficiency():
    # 10 signal scored 10..19; background 0..99 scored 0..99: at 50% efficiency the cut is 14.5,
    # passing the 85 background above it.
    labels = np.r_[np.ones(10), np.zeros(100)].astype(int)
    score = np.r_[np.arange(10, 20), np.arange(100)].astype(float)
    r = rejection_at(labels, score)
    assert r["val_rej50"] == pytest.approx(100 / 85.5, rel=0.02)
    assert r["val_rej30"] >= r["val_rej50"] >= r["val_rej70"]  # more signal kept, more background passes
    perfect = rejection_at(labels, np.r_[np.full(10, 1.0), np.zeros(100)])
    assert perfect["val_rej50"] == 100.0  # no background passes: bounded by the background count


def test_regression_metrics_per_mass_bin():
    true = np.array([50.0, 60.0, 140.0, 150.0, 190.0, 200.0])
    pred = true * np.array([1.1, 1.1, 1.0, 1.0, 0.9, 0.9])
    m = regression_metrics(pred, true, bins=3)
    assert m["val_bin/50-100/bias"] == pytest.approx(0.1)
    assert m["val_bin/100-150/bias"] == pytest.approx(0.0)
    assert m["val_bin/150-200/bias"] == pytest.approx(-0.2 / 3)  # 150 falls in the last bin (bias 0)
    assert m["val_bin/50-100/mae"] == pytest.approx(5.5)


def test_joint_metrics_have_both_sets():
    y = np.array([[0, -1.0], [1, 1.0], [0, 0.5], [1, 0.0]], np.float32)
    out = np.array([[2, 0, -1.0], [0, 2, 1.0], [1, 0, 0.5], [0, 1, 0.0]], np.float32)
    m = task_metrics("joint", 2, out, y, target_mean=100, target_std=10)
    assert m["val_auc"] == 1.0 and m["val_mae"] == pytest.approx(0.0) and "val_rej50" in m


def test_checkpoint_score_orders_epochs_for_either_mode():
    assert checkpoint_score({"val_auc": 0.9}, "val_auc", "max") > checkpoint_score({"val_auc": 0.8}, "val_auc", "max")
    assert checkpoint_score({"val_mae": 5.0}, "val_mae", "min") > checkpoint_score({"val_mae": 6.0}, "val_mae", "min")
    pretraining = checkpoint_score({"pretrain_loss": 0.1}, "val_mae", "min")
    assert pretraining < checkpoint_score({"val_mae": 1e9}, "val_mae", "min")
    assert checkpoint_score({"val_auc": math.nan}, "val_auc", "max") == pretraining
    # ties: the earlier epoch wins (the best epoch MLflow records is the first reaching the best value)
    assert (checkpoint_score({"val_auc": 1.0, "epoch": 1}, "val_auc", "max")
            > checkpoint_score({"val_auc": 1.0, "epoch": 3}, "val_auc", "max")
            > checkpoint_score({"val_auc": 0.99, "epoch": 1}, "val_auc", "max"))
