"""The training core without Ray (trainables/core): epochs, checkpoints, resume, NaN/Inf stop, datasets kept
for the next trial of a process, declared family capabilities; and the commands that must not import Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from e2e_search.data.inspect import inspect
from e2e_search.spec.loader import validate
from tests.conftest import base_config, write_e2e, write_yaml
from trainables.core import layout
from trainables.core.checkpoint import CheckpointError, TrialCheckpoint
from trainables.core.contract import TrialConfig
from trainables.core.datasets import forget, open_split
from trainables.core.engine import NonFiniteLoss
from trainables.core.loop import train_trial
from trainables.core.session import LocalSession
from trainables.registry import Capabilities, register_family

VIT = {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, "batch_size": 16}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("core")
    path = write_e2e(tmp / "d.h5", n=60, size=16)
    return inspect(validate(base_config(tmp, path), source="t.yaml"))


def _cfg(setup, **over) -> TrialConfig:
    kw = {"family": "vit", "params": dict(VIT), "data": setup.to_dict(), "max_epochs": 2, "metric": "val_auc",
          "mode": "max", "metrics": ["val_auc"]}
    kw.update(over)
    return TrialConfig(**kw)


def test_epochs_report_metrics_and_checkpoints(setup, tmp_path):
    s = LocalSession(tmp_path)
    train_trial(_cfg(setup), s)
    assert [m["epoch"] for m, _ in s.reports] == [1, 2]
    for metrics, folder in s.reports:
        ckpt = TrialCheckpoint.load(folder)
        assert ckpt.epoch == metrics["epoch"] and ckpt.family == "vit" and ckpt.params == VIT
        assert "train" not in ckpt.data and ckpt.optimizer and ckpt.scheduler
        assert json.loads((folder / layout.METRICS_FILE).read_text())["epoch"] == metrics["epoch"]
        assert (folder / layout.PREDICTIONS_FILE).is_file() and (folder / layout.ATTENTION_FILE).is_file()
        assert 0.0 <= metrics["val_auc"] <= 1.0 and metrics["checkpoint_score"] > -1e29
    assert "setup_s" in s.reports[0][0] and "report_s" in s.reports[1][0]


def test_resume_trains_only_the_missing_epochs(setup, tmp_path):
    train_trial(_cfg(setup, max_epochs=1), LocalSession(tmp_path))
    first = (tmp_path / "epoch_0001" / layout.CHECKPOINT_FILE).read_bytes()
    s = LocalSession(tmp_path, resume=True)
    train_trial(_cfg(setup, max_epochs=3), s)
    assert [m["epoch"] for m, _ in s.reports] == [2, 3]
    assert (tmp_path / "epoch_0001" / layout.CHECKPOINT_FILE).read_bytes() == first
    again = LocalSession(tmp_path, resume=True)  # restarted after its last epoch: the final result, nothing trained
    train_trial(_cfg(setup, max_epochs=3), again)
    assert len(again.reports) == 1 and again.reports[0][1] is None
    assert again.reports[0][0]["val_auc"] == s.reports[-1][0]["val_auc"]


def test_nonfinite_loss_stops_the_trial_and_its_retries(setup, tmp_path):
    flag = tmp_path / "trial" / layout.NONFINITE_FILE
    cfg = _cfg(setup, params={**VIT, "lr": 1e30}, nonfinite_flag=str(flag))
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        train_trial(cfg, LocalSession(tmp_path))
    assert flag.is_file()
    s = LocalSession(tmp_path)
    with pytest.raises(NonFiniteLoss, match="not retried"):
        train_trial(cfg, s)
    assert s.reports == []


def test_a_process_keeps_the_cached_split_for_the_next_trial(setup):
    import dataclasses

    forget()
    cached = dataclasses.replace(setup, cache="memory")
    a = open_split(cached, "train", cached.train, train=True)
    assert open_split(cached, "train", cached.train, train=True) is a
    assert open_split(cached, "train", cached.train[:-1], train=True) is not a  # another split: read again
    assert open_split(dataclasses.replace(setup, cache="none"), "train", setup.train) is not a
    forget()


def test_checkpoint_load_refuses_what_is_not_a_trial_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        TrialCheckpoint.load(tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="no family, params, data"):
        TrialCheckpoint.load(tmp_path / "partial.pt")


def test_epoch_checkpoints_finds_both_runners_folders(tmp_path):
    for folder, epoch in ((layout.trial_dir(tmp_path, "t1") / "checkpoint_000000", 1),
                          (layout.train_storage(tmp_path) / layout.trial_dirname("t1") / layout.epoch_dirname(2), 2)):
        folder.mkdir(parents=True)
        (folder / layout.METRICS_FILE).write_text(json.dumps({"epoch": epoch}))
    (layout.trial_dir(tmp_path, "t1") / "checkpoint_000009").mkdir()  # no metrics.json: left out
    found = layout.epoch_checkpoints(tmp_path, "t1")
    assert sorted(found) == [1, 2] and found[2].name == "epoch_0002"


class _P(BaseModel):
    width: int = 4


@pytest.mark.parametrize("caps,build,match", [
    (Capabilities(task_heads=True), lambda p, *, in_chans, img_size, num_outputs: nn.Identity(), "task_heads=True"),
    (Capabilities(), lambda p, *, in_chans, img_size, num_outputs, tasks=None: nn.Identity(), "takes 'tasks'"),
    (Capabilities(pretraining=True), lambda p, *, in_chans, img_size, num_outputs: nn.Identity(), "pretrain_epochs"),
    (Capabilities(inputs="objects"), lambda p, *, in_chans, img_size, num_outputs: nn.Identity(), "n_objects"),
])
def test_declared_capabilities_are_checked_at_registration(caps, build, match):
    with pytest.raises(RuntimeError, match=match):
        register_family("not_registered", params=_P, capabilities=caps)(build)
    with pytest.raises(ValidationError):
        Capabilities(inputs="graph")


def test_validate_export_best_and_report_do_not_import_ray(setup, tmp_path):
    """The commands that do not run a search start without Ray (ray.tune alone takes ~1 s to import)."""
    s = LocalSession(tmp_path / "trial")
    train_trial(_cfg(setup, max_epochs=1), s)
    ckpt = s.reports[-1][1] / layout.CHECKPOINT_FILE
    yml = write_yaml(tmp_path / "s.yaml", base_config(tmp_path, Path(setup.path)))
    script = textwrap.dedent(f"""
        import sys
        from e2e_search.cli import main
        assert main(["validate", {str(yml)!r}]) == 0
        assert main(["export", {str(ckpt)!r}, "--out", {str(tmp_path / "m.onnx")!r}]) == 0
        import e2e_search.analysis.report, e2e_search.record.store  # best and report
        main(["best", "nothing_here", "--tracking-uri", "sqlite:///{tmp_path / 'mlflow.db'}"])
        loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        print("RAY_MODULES", loaded)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert "RAY_MODULES" in out.stdout, out.stderr[-3000:]
    assert "RAY_MODULES []" in out.stdout, out.stdout[-2000:]
    assert (tmp_path / "m.onnx").is_file()
