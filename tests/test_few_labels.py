"""Issue 29: pretraining on every training event, the task heads on a labelled fraction (``label_fraction``);
its refusals before Ray; a second task from the generator's truth."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from e2e_search.cli import main
from e2e_search.data.inspect import inspect
from e2e_search.spec.loader import validate
from tests.conftest import base_config, write_objects, write_yaml
from trainables.core.contract import TrialConfig
from trainables.core.engine import Engine
from trainables.core.session import LocalSession
from trainables.data.labelled import cycled, label_order, labelled_events

SMALL = {"embed_dim": 16, "depth": 1, "num_heads": 2, "batch_size": 16}


def test_label_order_is_stratified_nested_and_fixed():
    train = list(range(0, 3000, 3))
    y = np.r_[np.zeros(900, int), np.ones(100, int)]
    lab = dict(zip(train, y))
    order = label_order(train, y, seed=5)
    assert sorted(order) == train and order == label_order(train, y, seed=5) != label_order(train, y, seed=6)
    for f, want in ((0.01, [9, 1]), (0.1, [90, 10]), (0.5, [450, 50]), (1.0, [900, 100])):
        ev = labelled_events(order, f)
        assert np.bincount([lab[e] for e in ev]).tolist() == want        # each class in its share of the split
    assert set(labelled_events(order, 0.01)) <= set(labelled_events(order, 0.1))  # 1% among the 10%
    c = cycled(labelled_events(order, 0.01), 1000, seed=0)
    assert len(c) == 1000 and set(np.bincount(c)[np.bincount(c) > 0]) == {100}  # each labelled event 100 times


def _objects_cfg(tmp_path, n=80, **params):
    data = write_objects(tmp_path / "o.h5", n=n)
    cfg = base_config(tmp_path, data, family="event_transformer",
                      data={"image_key": "X_objects", "mask_key": "mask", "val_fraction": 0.25})
    cfg["params"] = {**SMALL, "pretrain_epochs": 0, **params}
    return cfg


def test_task_epochs_read_only_the_labelled_events(tmp_path):
    """Pretraining epochs read every training event; task epochs the labelled ones, cycled to as many batches."""
    cfg = _objects_cfg(tmp_path, label_fraction=0.1, pretrain_epochs=1)
    setup = inspect(validate(cfg, source="t.yaml"))
    assert setup.label_order is not None and sorted(setup.label_order) == setup.train
    params = {**SMALL, "label_fraction": 0.1, "pretrain_epochs": 1}
    eng = Engine(TrialConfig(family="event_transformer", params=params, data=setup.to_dict(), max_epochs=2,
                             metric="val_auc", mode="max", metrics=["val_auc"]), LocalSession(tmp_path / "run"))
    assert eng.labelled_loader is not None and len(eng.labelled_loader) == len(eng.train_loader)
    assert len(labelled_events(setup.label_order, 0.1)) == 6                  # 10% of the 60 training events
    rows = lambda loader: {tuple(np.round(x[0][i].numpy().ravel(), 5)) for (x, _) in loader  # noqa: E731
                           for i in range(len(x[0]))}
    assert len(rows(eng.labelled_loader)) == 6 and len(rows(eng.train_loader)) > 40
    assert eng.train_epoch(1, pretraining=True).samples > 40                  # pretraining: every training event
    assert eng.train_epoch(2, pretraining=False).samples == eng.train_epoch(3, pretraining=True).samples
    full = Engine(TrialConfig(family="event_transformer", params=SMALL, data=setup.to_dict(), max_epochs=1,
                              metric="val_auc", mode="max", metrics=["val_auc"]), LocalSession(tmp_path / "full"))
    assert full.labelled_loader is None


@pytest.mark.parametrize("value,says", [(0, "label_fraction"), (1.5, "label_fraction"),
                                        ({"type": "grid", "values": [0.5, 2.0]}, "label_fraction")])
def test_label_fraction_outside_0_1_is_one_line(tmp_path, capsys, value, says):
    cfg = _objects_cfg(tmp_path)
    cfg["params"]["label_fraction"] = value
    code = main(["validate", str(write_yaml(tmp_path / "s.yaml", cfg))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0] and "Traceback" not in err[0], err


def test_a_fraction_that_leaves_a_class_unlabelled_is_refused_before_ray(tmp_path, capsys):
    cfg = _objects_cfg(tmp_path, n=80, label_fraction={"type": "grid", "values": [0.02, 1.0]})
    code = main(["validate", str(write_yaml(tmp_path / "s.yaml", cfg))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "params.label_fraction" in err[0] and "class" in err[0] and "no labelled training event" in err[0]
    assert "raise params.label_fraction to at least" in err[0]


def test_a_regression_task_whose_truth_the_file_lacks_is_one_line(tmp_path, capsys):
    cfg = _objects_cfg(tmp_path)
    cfg["task"] = {"type": "joint", "num_classes": 2, "target": "n_b"}
    code = main(["validate", str(write_yaml(tmp_path / "s.yaml", cfg))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "n_b" in err[0] and "Traceback" not in err[0], err


def test_joint_task_on_the_generators_truth(tmp_path):
    """A second task from the truth ``event_objects`` writes (n_b: jets holding a b hadron), one query per task."""
    data = write_objects(tmp_path / "o.h5", n=80)
    with h5py.File(data, "a") as f:
        f["n_b"] = (np.arange(80) % 3).astype(np.float32)
    cfg = base_config(tmp_path, data, family="event_transformer", task={"type": "joint", "num_classes": 2,
                                                                           "target": "n_b"},
                      data={"image_key": "X_objects", "mask_key": "mask", "val_fraction": 0.25})
    cfg["params"] = {**SMALL, "pretrain_epochs": 0}
    setup = inspect(validate(cfg, source="t.yaml"))
    assert setup.target_key == "n_b" and setup.task == "joint"


def test_pairs_table_pretraining_per_labelled_fraction():
    """The report's table: finalists that differ only in pretrain_epochs, per label_fraction, with P from the
    confirm record's paired win matrix; the shared-query finalists pair on query_sharing instead."""
    from e2e_search.analysis.paired import pairs, pairs_table

    arms = [("0", "0.1", None), ("4", "0.1", None), ("0", "1.0", "per_task"), ("4", "1.0", "per_task"),
            ("4", "1.0", "shared")]
    params_of = {f"r{i}": {"pretrain_epochs": p, "label_fraction": lf, "lr": "0.001",
                           **({"query_sharing": q} if q else {})} for i, (p, lf, q) in enumerate(arms)}
    fins = [{"label": f"#{i + 1}", "source_run": f"r{i}", "test": {"test_auc": {"mean": 0.8 + 0.01 * i}},
             "intervals": {"test_auc": [0.79 + 0.01 * i, 0.81 + 0.01 * i]}} for i in range(5)]
    matrix = [[None if i == j else (0.95 if i > j else 0.05) for j in range(5)] for i in range(5)]
    confirmed = {"finalists": fins, "rankings": [{"test_metric": "test_auc", "finalists": list(range(5)),
                                                  "matrix_finalists": list(range(5)), "matrix": matrix}]}
    searched = ["pretrain_epochs", "label_fraction", "query_sharing"]
    defaults = {"query_sharing": "per_task"}
    rows = pairs(confirmed, params_of, searched, "pretrain_epochs", "0", "label_fraction", defaults)
    assert [(r["stratum"], r["baseline"]["label"], r["technique"]["label"], r["p"]) for r in rows] == [
        ("0.1", "#1", "#2", 0.95), ("1.0", "#3", "#4", 0.95)]
    html = pairs_table(rows, factor="pretrain_epochs", baseline_name="from scratch", technique_name="pretrained",
                       stratum="label_fraction")
    assert "<td>0.1</td><td>0.8000 [0.7900, 0.8100]</td><td>0.8100 [0.8000, 0.8200] (4)</td><td>+0.0100</td>" \
        "<td>0.95</td>" in html
    shared = pairs(confirmed, params_of, searched, "query_sharing", "shared", "pretrain_epochs", defaults)
    assert [(r["baseline"]["label"], r["technique"]["label"], r["p"]) for r in shared] == [("#5", "#4", 0.05)]
