"""2-trial smoke searches of the shipped per-family YAMLs (real Ray, Optuna, MLflow, HDF5),
shrunk through --set to a tiny file and tiny models; the full runs are `slow`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from e2e_search.cli import main
from tests.conftest import write_e2e, write_objects

SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
TINY = {
    "vit": ["params.patch_size=4", "params.depth=1", "params.embed_dim=16", "params.num_heads=2"],
    "mae": ["params.patch_size=4", "params.depth=1", "params.embed_dim=16", "params.num_heads=2",
            "params.pretrain_epochs=1", "params.decoder_dim=16"],
    "resnet15": ["params.width=8", "params.blocks=5", "params.batch_size=16"],
    "event_transformer": ["params.depth=1", "params.embed_dim=16", "params.pretrain_epochs=1",
                          "params.mask_ratio=0.3", "params.decoder_depth=0"],
}
YAML = {"vit": "vit_e2e_classification.yaml", "mae": "mae_e2e_classification.yaml",
        "resnet15": "resnet15_e2e_classification.yaml", "event_transformer": "mae_event.yaml"}


def _smoke(tmp_path: Path, family: str, extra: list[str] = (), name: str | None = None,
           trials: int = 2) -> tuple[MlflowClient, list]:
    data = (write_objects(tmp_path / "events.h5", n=60) if family == "event_transformer"
            else write_e2e(tmp_path / "jets.h5", n=48, size=16))
    name = name or f"smoke_{family}"
    sets = [f"name={name}", f"data.path={data}", f"search.num_samples={trials}", "scheduler.max_epochs=2",
            "scheduler.grace_period=2", "params.batch_size=16", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.storage={tmp_path / 'ray'}", f"tracking.artifacts={tmp_path / 'artifacts'}",
            *TINY[family], *extra]
    assert main(["run", str(SPACES / YAML[family]), *sum((["--set", s] for s in sets), [])]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("e2e.kind") == "trial"]
    assert len(runs) == trials and all(r.data.tags["e2e.status"] == "FINISHED" for r in runs)
    assert all(r.data.tags["e2e.family"] == family for r in runs)
    return client, runs


@pytest.mark.parametrize("family", ["vit", pytest.param("resnet15", marks=pytest.mark.slow)])
def test_two_trial_search(tmp_path, monkeypatch, ray_local, family):
    monkeypatch.chdir(tmp_path)
    client, runs = _smoke(tmp_path, family)
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_auc")] == [1, 2]
        assert {"val_rej30", "val_rej50", "val_rej70"} <= set(r.data.metrics)
        plots = {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
        assert ("plots/attention_rollout.png" in plots) == (family == "vit")  # a CNN has no attention map


@pytest.mark.parametrize("family", [pytest.param("mae", marks=pytest.mark.slow), "event_transformer"])
def test_two_trial_search_with_pretraining(tmp_path, monkeypatch, ray_local, family):
    """Epoch 1 pretrains (self-supervised loss, no task metric), epoch 2 trains on the task; the kept
    checkpoint is the task epoch, and a new search can start from it (``params.pretrained``)."""
    monkeypatch.chdir(tmp_path)
    # One trial on 2 DDP workers: parameters unused in one phase (decoder, heads) must not stall gradient sync.
    client, runs = _smoke(tmp_path, family, ["resources.workers=2", "resources.cpus_per_worker=0.5"], trials=1)
    for r in runs:
        rid = r.info.run_id
        assert [m.step for m in client.get_metric_history(rid, "pretrain_loss")] == [1]
        assert [m.step for m in client.get_metric_history(rid, "val_auc")] == [2]
        assert r.data.metrics["best_epoch"] == 2
        if family == "event_transformer":  # what the autoencoder learned (summed over both DDP ranks), and
            # what the task heads look at (issue 19)
            assert [m.step for m in client.get_metric_history(rid, "val_recon_jet1_pt")] == [1, 2]
            assert 0 < r.data.metrics["best_val_recon"] < 10 and "best_val_recon_lepton_eta" in r.data.metrics
            assert "plots/task_attention.png" in {a.path for a in client.list_artifacts(rid, "plots")}
            assert "best_checkpoint/attention.npz" in {a.path for a in client.list_artifacts(rid, "best_checkpoint")}
    ckpt = client.download_artifacts(runs[0].info.run_id, "best_checkpoint/checkpoint.pt", str(tmp_path / "dl"))
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2 and state["family"] == family
    if family != "mae":
        return
    # Start from that checkpoint: no pretraining, a linear probe on the transferred encoder.
    _smoke(tmp_path, family, ["params.pretrain_epochs=0", f"params.pretrained={ckpt}", "params.finetune=linear"],
           name=f"from_pretrained_{family}")


@pytest.mark.slow  # ~75 s on 2 cores
def test_compare_families_searches_over_families(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "jets.h5", n=48, size=16)
    sets = ["name=cmp", f"data.path={data}", "family.values=[vit,resnet15,mae]", "search.num_samples=3",
            "scheduler.max_epochs=2", "scheduler.grace_period=2", "params.pretrain_epochs=1",
            "params.patch_size=4", "params.depth=1", "params.embed_dim=16", "params.width=8", "params.batch_size=16",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.storage={tmp_path / 'ray'}",
            f"tracking.artifacts={tmp_path / 'artifacts'}"]
    assert main(["run", str(SPACES / "compare_families.yaml"), *sum((["--set", s] for s in sets), [])]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    trials = {r.data.params["family"]: r for r in runs if r.data.tags.get("e2e.kind") == "trial"}
    assert set(trials) == {"vit", "resnet15", "mae"}  # the grid tries every family
    assert "width" in trials["resnet15"].data.params and "patch_size" not in trials["resnet15"].data.params
    assert "mask_ratio" in trials["mae"].data.params and "width" not in trials["mae"].data.params
    assert trials["vit"].data.tags["e2e.family"] == "vit"


@pytest.mark.slow
def test_mae_event_as_shipped(tmp_path, monkeypatch, capsys, ray_local):
    """The headline YAML with no other step: events generated with Pythia (progress shown), then the search."""
    import re

    monkeypatch.chdir(tmp_path)
    assert main(["run", str(SPACES / "mae_event.yaml")]) == 0
    out, err = capsys.readouterr()
    assert "generating it with recipe 'event_objects'" in err and "event_objects: [" in err
    assert (tmp_path / "e2e_runs/data/event_objects_2k.h5").is_file()
    m = re.search(r"search done: (\d+) trials, (\d+) stopped early by the scheduler, 0 failed", out)
    assert m and int(m.group(1)) == 8


def test_hit_transformer_search_as_shipped_then_export_and_report(tmp_path, monkeypatch, ray_local, capsys):
    """search_spaces/hit_transformer.yaml shrunk to 2 trials on a tiny file (hit lists from the sparse cache): both
    trials finish, the class token's attention over the hits is logged, the best trial exports to ONNX with a
    hit-list input (parity checked by export) and the report shows the map."""
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "jets.h5", n=48, size=16)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = ["name=smoke_hits", f"data.path={data}", "search.num_samples=2", "scheduler.max_epochs=2",
            "scheduler.grace_period=2", "params.batch_size=16", f"tracking.uri={uri}",
            f"tracking.storage={tmp_path / 'ray'}", f"tracking.artifacts={tmp_path / 'artifacts'}",
            "params.depth=1", "params.embed_dim=16", "params.num_heads=2", "params.pool=class_attention",
            "params.max_hits=32", "data.zero_suppress=0.5"]  # the toy file is dense noise: suppress it
    assert main(["run", str(SPACES / "hit_transformer.yaml"), *sum((["--set", s] for s in sets), [])]) == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("smoke_hits")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("e2e.kind") == "trial"]
    assert len(runs) == 2 and all(r.data.tags["e2e.status"] == "FINISHED" for r in runs)
    assert {r.data.params["pair_features"] for r in runs} == {"True", "False"}  # the grid: both
    for r in runs:
        assert "plots/attention_rollout.png" in {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
    best = max(runs, key=lambda r: r.data.metrics["best_val_auc"])
    capsys.readouterr()
    assert main(["export", best.info.run_id, "--format", "onnx", "--out", str(tmp_path / "hits.onnx"),
                 "--runs", "0", "--tracking-uri", uri]) == 0
    assert "hits (batch, 32, 4) float32 + mask (batch, 32) bool" in capsys.readouterr().out
    assert main(["report", "smoke_hits", "--tracking-uri", uri]) == 0
    html = (tmp_path / "e2e_runs/reports/smoke_hits.html").read_text()
    assert "the class token&#x27;s attention over the hits" in html
