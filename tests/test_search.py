"""End-to-end searches with a real local Ray, Optuna, MLflow (SQLite in tmp_path) and HDF5."""

from __future__ import annotations

import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from e2e_search.cli import main
from tests.conftest import base_config, write_e2e, write_yaml


def _runs(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("e2e.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("e2e.kind") == "trial"]
    return client, parents, children


@pytest.mark.parametrize("resources", [
    {"workers": 1, "cpus_per_worker": 1},  # each trial in its (reused) Tune process
    pytest.param({"workers": 2, "cpus_per_worker": 0.5}, marks=pytest.mark.slow),  # DDP through Ray Train
], ids=["in_process", "ddp"])
def test_two_trials_recorded_in_mlflow(tmp_path, monkeypatch, capsys, ray_local, resources):
    """Every trial's MLflow run: params, per-epoch metrics at absolute steps, timing, best checkpoint and
    plots; the champion registered; ``best`` ranks the trials."""
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "jets.h5", n=64)
    cfg = base_config(tmp_path, data, name="ddp", resources=resources)
    yml = write_yaml(tmp_path / "s.yaml", cfg)
    assert main(["run", str(yml)]) == 0
    out = capsys.readouterr().out
    assert "best trial: run" in out and "2 trials, 0 stopped early by the scheduler, 0 failed" in out

    uri = cfg["tracking"]["uri"]
    client, parents, children = _runs(uri, "ddp")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert "search_space.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert parent.data.metrics["tracking_s"] > 0  # driver time in MLflow logging
    for run in children:
        rid = run.info.run_id
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["e2e.status"] == "FINISHED"
        assert {"lr", "embed_dim", "patch_size"} <= set(run.data.params)
        history = client.get_metric_history(rid, "val_auc")
        assert sorted(m.step for m in history) == [1, 2]  # step = absolute epoch
        for key in ("best_val_auc", "final_val_auc", "best_epoch", "epochs_run", "val_loss", "train_loss"):
            assert key in run.data.metrics, key
        assert run.data.metrics["best_val_auc"] == max(m.value for m in history)
        # Where the trial's time went: worker start and set-up once, checkpoint writing each epoch and
        # the previous epoch's report from epoch 2.
        timing = {k: client.get_metric_history(rid, k) for k in ("startup_s", "setup_s", "save_s", "report_s")}
        assert [m.step for m in timing["startup_s"]] == [1] and [m.step for m in timing["setup_s"]] == [1]
        assert sorted(m.step for m in timing["save_s"]) == [1, 2] and [m.step for m in timing["report_s"]] == [2]
        assert all(0 < m.value < 120 for ms in timing.values() for m in ms)
        files = [a.path for a in client.list_artifacts(rid, "best_checkpoint")]
        assert files == ["best_checkpoint/attention.npz", "best_checkpoint/checkpoint.pt",
                         "best_checkpoint/metrics.json", "best_checkpoint/predictions.npz"]
        plots = {a.path for a in client.list_artifacts(rid, "plots")}
        assert plots == {"plots/learning_curves.png", "plots/roc.png", "plots/scores.png",
                         "plots/attention_rollout.png"}
        assert "config.yaml" in {a.path for a in client.list_artifacts(rid)}
        local = client.download_artifacts(rid, "best_checkpoint/checkpoint.pt", str(tmp_path / rid))
        state = torch.load(local, weights_only=True)
        assert state["epoch"] == int(run.data.metrics["best_epoch"])
        assert state["family"] == "vit" and "model" in state and "optimizer" in state

    # `best` reads MLflow only and names the trial with the highest best_val_auc.
    expected = max(children, key=lambda r: r.data.metrics["best_val_auc"]).info.run_id
    champion = client.get_model_version_by_alias("ddp-classifier", "champion")
    assert champion.run_id == parent.data.tags["e2e.best_run_id"] and champion.tags["e2e.family"] == "vit"
    assert client.get_run(champion.run_id).data.metrics["best_val_auc"] == max(
        r.data.metrics["best_val_auc"] for r in children)
    assert main(["best", "ddp", "--tracking-uri", uri, "--top", "2"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if re.match(r"\s+\d+\s+[0-9a-f]{32}", ln)]
    assert len(rows) == 2 and rows[0].split()[1] == expected


@pytest.mark.parametrize(
    "fmt",
    [
        dict(image_key="X_jets", size=125, channels=3, layout="channels_last", sets=[]),
        # labels as physicists store them (issue 13): float 0.0/1.0 (the electron/photon release), one-hot, bool
        dict(image_key="X", size=32, channels=2, layout="channels_last", sets=["data.image_key=X"], labels="float"),
        dict(image_key="X_jets", size=20, channels=4, layout="channels_first",
             sets=["data.layout=channels_first", "data.channels=[3,0]"], labels="onehot"),
        dict(image_key="X_jets", size=16, channels=3, layout="channels_last",
             sets=["data.cache=device", "data.flip_augment=true"], labels="bool"),
    ],  # mass regression through --set: test_regression_target_in_mev_is_recorded_under_valid_names
    ids=["e2e_125x125x3", "photon_32x32x2", "channels_first_subset", "device_cache"],
)
def test_same_search_runs_on_other_formats_through_set(tmp_path, monkeypatch, capsys, ray_local, fmt):
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "in.h5", n=40, size=fmt["size"], channels=fmt["channels"], layout=fmt["layout"],
                     image_key=fmt["image_key"])
    if fmt.get("labels"):
        import h5py
        import numpy as np

        with h5py.File(data, "a") as f:
            y = f["y"][...]
            del f["y"]
            f["y"] = {"float": y.astype(np.float32), "onehot": np.eye(2, dtype=np.float32)[y],
                      "bool": y.astype(bool)}[fmt["labels"]]
    # One YAML for every format; patch 10 does not divide 125/32: padded explicitly.
    cfg = base_config(tmp_path, tmp_path / "elsewhere.h5", name="fmt",
                      params={"patch_size": 10, "depth": 1, "embed_dim": 16, "num_heads": 2, "batch_size": 8},
                      search={"num_samples": 1}, scheduler={"type": "none", "max_epochs": 1})
    yml = write_yaml(tmp_path / "s.yaml", cfg)
    sets = [f"data.path={data}", *fmt["sets"]]
    args = ["run", str(yml)] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    _, parents, children = _runs(cfg["tracking"]["uri"], "fmt")
    assert len(children) == 1 and children[0].data.tags["e2e.status"] == "FINISHED"
    regression = "task.type=regression" in fmt["sets"]
    for key in (["val_mae", "val_resolution", "best_val_mae"] if regression else ["val_auc", "val_acc"]):
        assert key in children[0].data.metrics, key
        assert children[0].data.metrics[key] == children[0].data.metrics[key], key  # not NaN
    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    plots = {a.path for a in client.list_artifacts(children[0].info.run_id, "plots")}
    assert ({"plots/mass_pred_vs_true.png", "plots/mass_response.png"} if regression
            else {"plots/roc.png", "plots/scores.png"}) <= plots
    if regression:
        assert any(k.startswith("val_bin/") and k.endswith("/resolution") for k in children[0].data.metrics)
    kind = "regressor" if regression else "classifier"
    assert client.get_model_version_by_alias(f"fmt-{kind}", "champion").run_id == children[0].info.run_id
    assert "search_space.yaml" in [a.path for a in MlflowClient(cfg["tracking"]["uri"]).list_artifacts(parents[0].info.run_id)]


@pytest.mark.parametrize("fmt", ["parquet", "root"])
def test_same_search_runs_on_parquet_and_root(tmp_path, monkeypatch, capsys, ray_local, fmt):
    """A parquet file (nested lists, channels-first) and a ROOT TTree (float[3][16][16]) through --set data.path."""
    from tests.test_formats import reference, source

    monkeypatch.chdir(tmp_path)
    _, arrays = reference(tmp_path)
    data = source(tmp_path, fmt, arrays)
    cfg = base_config(tmp_path, tmp_path / "elsewhere.h5", name=f"fmt-{fmt}",
                      params={"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, "batch_size": 8},
                      search={"num_samples": 1}, scheduler={"type": "none", "max_epochs": 1})
    yml = write_yaml(tmp_path / "s.yaml", cfg)
    assert main(["run", str(yml), "--set", f"data.path={data}"]) == 0
    caches = list((tmp_path / "e2e_runs" / "cache").glob("jets-*.h5"))
    assert len(caches) == 1
    _, parents, children = _runs(cfg["tracking"]["uri"], f"fmt-{fmt}")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert children[0].data.tags["e2e.status"] == "FINISHED" and "val_auc" in children[0].data.metrics
    assert parents[0].data.params["data_path"] == str(data)  # MLflow records the user's file, not the cache


@pytest.mark.slow  # ~65 s on 2 cores; the core's resume runs in tests/test_core.py, a killed trial's in test_faults.py
def test_trial_resumes_from_its_latest_checkpoint(tmp_path, ray_local):
    """A Train run refitted under the same name continues after its last epoch (what a restarted multi-worker
    trial does; a restart after the last epoch: tests/test_core.py)."""
    import hashlib

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from e2e_search.data.inspect import inspect
    from e2e_search.spec.loader import validate
    from trainables.core.contract import TrialConfig
    from trainables.core.layout import CHECKPOINT_FILE
    from trainables.trial import train_worker

    data = write_e2e(tmp_path / "d.h5", n=40)
    setup = inspect(validate(base_config(tmp_path, data), source="t.yaml"))
    params = {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, "batch_size": 8}
    store = tmp_path / "store"

    def fit(max_epochs: int):
        config = TrialConfig(family="vit", params=params, data=setup.to_dict(), max_epochs=max_epochs)
        return TorchTrainer(train_worker, train_loop_config=config.model_dump(),
                            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                            run_config=RunConfig(name="trial_x", storage_path=str(store))).fit()

    first = fit(1)
    ckpt1 = store / "trial_x" / "epoch_0001" / CHECKPOINT_FILE
    digest = hashlib.sha256(ckpt1.read_bytes()).hexdigest()
    second = fit(3)
    assert first.metrics["epoch"] == 1 and second.metrics["epoch"] == 3
    assert hashlib.sha256(ckpt1.read_bytes()).hexdigest() == digest  # epoch 1 was not trained again
    assert torch.load(store / "trial_x" / "epoch_0003" / CHECKPOINT_FILE, weights_only=True)["epoch"] == 3


def test_nsga2_over_quality_and_cost(tmp_path, monkeypatch, capsys, ray_local):
    """nsga2 over val_auc (max) and the parameter count (min, from the YAML's mode defaults); every trial
    also reports its batch-1 latency; the report marks and plots the Pareto front."""
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "jets.h5", n=40)
    cfg = base_config(tmp_path, data, name="pareto",
                      search={"algorithm": "nsga2", "num_samples": 2, "metric": ["val_auc", "num_params"]},
                      scheduler={"type": "asha", "max_epochs": 2, "grace_period": 1})
    cfg["params"]["embed_dim"] = {"type": "grid", "values": [8, 32]}
    yml = write_yaml(tmp_path / "s.yaml", cfg)
    assert main(["run", str(yml)]) == 0
    client, parents, children = _runs(cfg["tracking"]["uri"], "pareto")
    assert parents[0].data.tags["e2e.metric"] == "val_auc"
    assert len(children) == 2 and all(r.data.tags["e2e.status"] == "FINISHED" for r in children)
    assert len({r.data.metrics["num_params"] for r in children}) == 2  # two sizes: a real trade-off to plot
    for r in children:
        assert r.data.metrics["num_params"] > 0 and r.data.metrics["best_latency_ms"] > 0
    from e2e_search.analysis.report import build_report

    text, _ = build_report(cfg["tracking"]["uri"], "pareto", costs=False)
    assert "<figcaption>Pareto front</figcaption>" in text
    assert text.count(" ★") >= 1 and "latency ms" in text


@pytest.mark.slow
def test_quickstart_as_shipped(tmp_path, monkeypatch, capsys, ray_local):
    """README command 1's search: >= 4 trials, ASHA stops at least one early, best trial printed."""
    from pathlib import Path

    yml = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(yml)]) == 0
    out = capsys.readouterr().out
    m = re.search(r"search done: (\d+) trials, (\d+) stopped early by the scheduler, 0 failed", out)
    assert m and int(m.group(1)) >= 4 and int(m.group(2)) >= 1
    assert "best trial: run" in out
    assert (tmp_path / "e2e_runs" / "data" / "toy_jets_32.h5").is_file()


def test_regression_target_in_mev_is_recorded_under_valid_names(tmp_path, monkeypatch, capsys, ray_local):
    """Issue 13 case 1: a target from 1e3 to 2.1e5 (MeV) made per-bin names like `val_bin/1000-4.692e+04/mae`,
    which MLflow refuses: the search died with a traceback (exit 1) and left the trial's run RUNNING. Now: exit 0,
    the per-bin metrics are in MLflow under valid names, and no run is left RUNNING."""
    import h5py
    import numpy as np

    monkeypatch.chdir(tmp_path)
    r = np.random.default_rng(0)
    n = 40
    with h5py.File(tmp_path / "mev.h5", "w") as f:
        f["X_jets"] = r.exponential(0.1, (n, 8, 8, 3)).astype(np.float32)
        f["y"] = np.arange(n) % 2
        f["m0"] = r.uniform(1e3, 2.1e5, n)
    cfg = base_config(tmp_path, tmp_path / "mev.h5", name="mev",
                      params={"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, "batch_size": 8},
                      search={"num_samples": 1}, scheduler={"type": "none", "max_epochs": 1})
    cfg["data"]["val_fraction"] = 0.5
    sets = ["task.type=regression", "task.target=m0", "search.metric=val_mae"]  # as the command
    assert main(["run", str(write_yaml(tmp_path / "s.yaml", cfg))] + [a for s in sets for a in ("--set", s)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "MLflow tracking failed" not in err
    client, parents, children = _runs(cfg["tracking"]["uri"], "mev")
    assert [r.info.status for r in parents + children] == ["FINISHED", "FINISHED"]
    assert children[0].data.tags["e2e.status"] == "FINISHED"
    binned = sorted(k for k in children[0].data.metrics if k.startswith("val_bin/"))
    assert len(binned) >= 6 and all(k.count("/") == 2 for k in binned), binned
    num = r"\d+(\.\d+)?(e-?\d+)?"
    assert all(re.fullmatch(rf"val_bin/{num}-{num}/(mae|bias|resolution)", k) for k in binned), binned
    assert any("e4/" in k or "e5/" in k for k in binned), binned  # exponents, written without '+'
    assert any(k.startswith("best_val_bin/") for k in children[0].data.metrics)
    assert {"val_mae", "val_resolution", "best_val_mae"} <= set(children[0].data.metrics)
    rid = children[0].info.run_id
    assert {"plots/mass_pred_vs_true.png", "plots/mass_response.png"} <= {a.path for a in client.list_artifacts(rid, "plots")}
    assert client.get_model_version_by_alias("mev-regressor", "champion").run_id == rid


@pytest.mark.parametrize("trials, says, not_says", [
    ({"a": "FINISHED", "b": "FINISHED"}, ["no trial reported a finite val_auc", "all 2 ended with val_auc NaN"],
     ["errors above", "e2e.error"]),
    ({"a": "FAILED", "b": "FINISHED"}, ["1 failed (see the errors above", "1 ended with val_auc NaN or missing"], []),
    ({"a": "FAILED"}, ["no trial finished: see the errors above and in MLflow (tag e2e.error)"], []),
    ({}, ["no trial ran"], ["errors above"]),
], ids=["all-nan", "failed-and-nan", "all-failed", "none"])
def test_outcome_without_a_best_trial_says_what_happened(tmp_path, capsys, trials, says, not_says):
    """Issue 13: the final line points at errors only when a trial failed (no Ray: the outcome as execute returns it)."""
    from e2e_search.cli import _report_outcome
    from e2e_search.search.run import Outcome
    from e2e_search.spec.loader import validate

    cfg = validate(base_config(tmp_path, tmp_path / "x.h5"), source="t")
    rc = _report_outcome(cfg, Outcome("t", "0" * 32, "sqlite:///x.db", None, None, trials))
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1
    for text in says:
        assert text in err, err
    for text in not_says:
        assert text not in err, err
