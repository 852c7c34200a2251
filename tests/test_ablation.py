"""Issue 19 without Ray: masked-object reconstruction metrics, task-attention maps of the event transformer,
conditional grids, and the report's technique-effects section on a hand-made MLflow store."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from e2e_search.analysis.effects import dims_of, factors, importances
from e2e_search.data.inspect import inspect
from e2e_search.record.figures import task_attention_plot
from e2e_search.spec.loader import load, validate
from e2e_search.spec.params import grid_points
from tests.conftest import base_config, write_objects
from trainables.attention.tasks import is_task_attention, query_means, task_attention_maps
from trainables.core import layout
from trainables.core.contract import TrialConfig
from trainables.core.loop import train_trial
from trainables.core.recon import masked_sums, recon_metrics
from trainables.core.session import LocalSession
from trainables.registry import get_family

torch.set_num_threads(1)
SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
SMALL = {"embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}


def _model(**params):
    torch.manual_seed(0)
    fam = get_family("event_transformer")
    return fam.build(fam.params(**(SMALL | params)), n_objects=6, n_features=4, num_outputs=2,
                     tasks={"classification": 2})


def _events(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 4, generator=g)
    mask = torch.ones(n, 6, dtype=torch.bool)
    mask[::2, 4:] = False                                                     # jets 3-4 absent in half the events
    return x * mask[..., None], mask


# --------------------------------------------------------------------------- reconstruction metrics
def test_recon_metrics_average_only_hidden_real_objects():
    m = _model(mask_ratio=0.5)
    x, mask = _events()
    hidden = m.sample_hidden(mask, torch.Generator().manual_seed(3))
    assert not (hidden & ~mask).any() and hidden.sum(1).tolist() == [2, 3] * 4   # ceil(0.5 * n_real), never padding
    err = m.masked_errors(x, mask, hidden)                                    # (B, N, F)
    assert (err[~hidden] == 0).all() and (err[hidden] > 0).all()
    pred = m.reconstruct_hidden(x, mask, hidden)
    assert torch.allclose(err[hidden], (pred - x).pow(2)[hidden], atol=1e-6)
    sq, cnt, mom = masked_sums(m, [((x, mask), torch.zeros(len(x)))], "cpu")
    out = recon_metrics(sq, cnt, mom)
    names = {f"val_recon_{o}_{f}" for o in ("lepton", "met", "jet1", "jet2", "jet3", "jet4")
             for f in ("pt", "eta", "phi", "btag")}
    hidden_slots = {o for i, o in enumerate(("lepton", "met", "jet1", "jet2", "jet3", "jet4")) if cnt[i] > 0}
    assert {k for k in out if k.count("_") == 3 and not k.endswith("_ratio")} == {
        n for n in names if n.split("_")[2] in hidden_slots}
    i = int(torch.nonzero(cnt)[0])
    obj = ("lepton", "met", "jet1", "jet2", "jet3", "jet4")[i]
    # the same fixed draw as masked_sums: per slot, the mean squared error over the events that hid it
    g = torch.Generator().manual_seed(20260519)
    h = m.sample_hidden(mask, g)
    e = m.masked_errors(x, mask, h)
    assert out[f"val_recon_{obj}_pt"] == pytest.approx(float(e[h[:, i], i, 0].mean()), rel=1e-5)
    assert out["val_recon"] == pytest.approx(float(e.sum() / (h.sum() * 4)), rel=1e-5)
    # issue 29: the slot's error against its own mean predictor (each feature's variance over the hidden objects)
    xs = x[h[:, i], i].double()                                               # (n hidden in slot i, F)
    var = float(((xs - xs.mean(0)) ** 2).sum())
    assert out[f"val_recon_{obj}_ratio"] == pytest.approx(float(e[h[:, i], i].sum()) / var, rel=1e-5)
    assert all(math.isfinite(v) and v >= 0 for v in out.values())


def test_recon_names_fall_back_for_other_shapes():
    out = recon_metrics(torch.ones(3, 2, dtype=torch.float64), torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    assert out["val_recon_obj0_f1"] == 0.5 and "val_recon_obj1_f0" not in out and out["val_recon_obj2"] == 1.0


# --------------------------------------------------------------------------- task attention
def test_task_attention_is_the_cross_attention_the_heads_apply():
    m = _model(task_queries=3, head_depth=1, num_heads=1)
    x, mask = _events()
    w = m.task_attention(x, mask)                                             # (B, Q, N)
    assert w.shape == (8, 3, 6)
    assert torch.allclose(w.sum(-1), torch.ones(8, 3), atol=1e-5) and (w[~mask[:, None, :].expand_as(w)] == 0).all()
    blk = m.head_blocks[0]
    tokens = m.encode(x, mask)
    q = m.queries.unsqueeze(0).expand(8, -1, -1)
    h = blk.norm_self(q)
    q = q + blk.self_attn(h, h)
    hq, hk = blk.norm_q(q), blk.norm_kv(tokens)
    v = blk.cross_attn.kv(hk).chunk(2, dim=-1)[1]                             # one head: (B, N, D)
    assert torch.allclose(blk.cross_attn(hq, hk, mask), blk.cross_attn.proj(w @ v), atol=1e-5)
    assert m.query_labels() == ["classification q1", "classification q2", "classification q3"]


def test_attention_maps_per_class_and_plot(tmp_path):
    m = _model(task_queries=2)
    x, mask = _events(10)
    y = np.arange(10) % 2
    z = task_attention_maps(m, x.numpy(), mask.numpy(), y, task="classification", num_classes=2,
                            mean=[1.0, 0, 0, 0], std=[2.0, 1, 1, 1])
    assert list(z["groups"]) == ["background (class 0)", "signal (class 1)"] and z["group_mean"].shape == (2, 2, 6)
    assert np.allclose(z["group_mean"].sum(-1), 1, atol=1e-5) and list(z["group_events"]) == [5, 5]
    assert np.allclose(z["group_presence"][:, 4], [0.0, 1.0])                 # even events (class 0) lack jet3
    assert list(z["example_titles"]) == ["background", "signal", "background", "signal"]
    assert np.allclose(z["example_features"][1, :, 0], x[1, :, 0].numpy() * 2 + 1, atol=1e-5)
    np.savez_compressed(tmp_path / "a.npz", **z)
    assert is_task_attention(tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz") as f:
        assert query_means(f)["classification"].shape == (2, 6)
    png = task_attention_plot(tmp_path / "a.npz", tmp_path / "task_attention.png")
    assert png.stat().st_size > 5000


def test_loop_logs_recon_while_pretraining_and_saves_task_attention(tmp_path):
    data = write_objects(tmp_path / "o.h5", n=80)
    cfg = base_config(tmp_path, data, family="event_transformer",
                      data={"image_key": "X_objects", "mask_key": "mask", "val_fraction": 0.25})
    cfg["params"] = {"batch_size": 16, "pretrain_epochs": 1}
    setup = inspect(validate(cfg, source="t.yaml"))
    params = {**SMALL, "batch_size": 16, "pretrain_epochs": 1, "task_queries": 2}
    s = LocalSession(tmp_path / "run")
    train_trial(TrialConfig(family="event_transformer", params=params, data=setup.to_dict(), max_epochs=3,
                            metric="val_auc", mode="max", metrics=["val_auc"]), s)
    (m1, f1), (m2, f2), (m3, f3) = s.reports
    recon = {k: v for k, v in m1.items() if k.startswith("val_recon")}
    assert "val_recon_jet1_pt" in recon and "val_recon" in recon and len(recon) == 6 * 4 + 6 + 6 + 1  # feature, slot, ratio
    assert {k: m3[k] for k in recon} == recon                                 # carried to the task epochs
    assert not (f1 / layout.ATTENTION_FILE).exists()                           # no task head trained yet
    for f in (f2, f3):
        assert is_task_attention(f / layout.ATTENTION_FILE)
    s2 = LocalSession(tmp_path / "plain")                                     # no pretraining: no recon metrics
    train_trial(TrialConfig(family="event_transformer", params={**params, "pretrain_epochs": 0},
                            data=setup.to_dict(), max_epochs=1, metric="val_auc", mode="max",
                            metrics=["val_auc"]), s2)
    assert not any(k.startswith("val_recon") for k in s2.reports[0][0])


# --------------------------------------------------------------------------- conditional grids, the shipped ablation
def test_conditional_grid_points_are_queued_once():
    """Issue 29's ablation: pretraining off/on at 1%, 10% and 100% labels, one query per task against a shared one
    (at every label, so the comparison is at both pretraining settings): 8 grid points, each queued once."""
    cfg = load(SPACES / "mae_event_ablation.yaml")
    pts = grid_points(cfg)
    assert len(pts) == 8 == cfg.search.num_samples and cfg.search.confirm.top == 8
    assert sum("query_sharing" in p for p in pts) == 4
    assert {(p["pretrain_epochs"], p["label_fraction"], p.get("query_sharing")) for p in pts} == {
        (0, 0.01, None), (0, 0.1, None), (0, 1.0, "per_task"), (0, 1.0, "shared"),
        (4, 0.01, None), (4, 0.1, None), (4, 1.0, "per_task"), (4, 1.0, "shared")}
    assert cfg.task.type == "joint" and cfg.task.target == "n_b" and cfg.data.generate.n >= 20000
    assert cfg.data.generate.n * cfg.data.test_fraction >= 4000


# --------------------------------------------------------------------------- the report section
RESOLVED = {"family": "event_transformer", "params": {
    "pretrain_epochs": {"type": "grid", "values": [0, 2]},
    "mask_ratio": {"type": "grid", "values": [0.15, 0.5], "when": {"pretrain_epochs": 2}},
    "task_queries": {"type": "grid", "values": [1, 4]}, "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    "depth": 2}}
TRIALS = [  # pretrain_epochs, mask_ratio, task_queries, lr, best val_auc
    (0, None, 1, 1e-3, 0.80), (0, None, 4, 2e-3, 0.82), (2, 0.15, 1, 3e-3, 0.85), (2, 0.15, 4, 4e-3, 0.86),
    (2, 0.5, 1, 5e-3, 0.83), (2, 0.5, 4, 6e-3, 0.84)]


def _store(root: Path, trials=TRIALS, confirm: bool = True) -> str:
    """An MLflow store with one event_transformer search as ``run`` (and ``confirm``) record it, no training."""
    import yaml

    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("abl", artifact_location=(root / "artifacts").as_uri())
    parent = c.create_run(exp, run_name="abl-1", tags={"e2e.kind": "search", "e2e.metric": "val_auc",
                                                       "e2e.mode": "max"}).info.run_id
    c.log_text(parent, yaml.safe_dump({**RESOLVED, "search": {"metric": "val_auc", "mode": "max"}}),
               "search_space.yaml")
    runs = []
    m = _model(task_queries=1)
    x, mask = _events(10)
    for k, (pre, ratio, tq, lr, auc) in enumerate(trials):
        rid = c.create_run(exp, run_name=f"abl-1-t{k}", tags={
            "mlflow.parentRunId": parent, "e2e.kind": "trial", "e2e.trial_id": f"t{k}",
            "e2e.family": "event_transformer", "e2e.status": "FINISHED"}).info.run_id
        params = {"pretrain_epochs": pre, "task_queries": tq, "lr": lr, "depth": 2}
        if ratio is not None:
            params["mask_ratio"] = ratio
        for name, v in params.items():
            c.log_param(rid, name, v)
        c.log_metric(rid, "best_val_auc", auc)
        if pre:
            for o in ("lepton", "met", "jet1", "jet2", "jet3", "jet4"):
                for f in ("pt", "eta", "phi", "btag"):
                    c.log_metric(rid, f"best_val_recon_{o}_{f}", 0.1 * (k + 1))
                c.log_metric(rid, f"best_val_recon_{o}", 0.1 * (k + 1))
            c.log_metric(rid, "best_val_recon", 0.1 * (k + 1))
        with tempfile.TemporaryDirectory() as d:
            z = task_attention_maps(_model(task_queries=tq), x.numpy(), mask.numpy(), np.arange(10) % 2,
                                    task="classification", num_classes=2)
            np.savez_compressed(Path(d) / layout.ATTENTION_FILE, **z)
            c.log_artifact(rid, str(Path(d) / layout.ATTENTION_FILE), layout.BEST_ARTIFACT)
        c.set_terminated(rid)
        runs.append(rid)
    if confirm:
        fins = [{"label": f"#{k + 1} t{k}", "source_run": rid, "val": {"val_auc": trials[k][4]},
                 "test": {"test_auc": {"mean": trials[k][4] - 0.01, "std": 0.005, "values": {"1": 0.0}}},
                 "intervals": {"test_auc": [trials[k][4] - 0.03, trials[k][4] + 0.01]}, "seed_intervals": {},
                 "num_params": 1000, "epochs": 8} for k, rid in enumerate(runs)]
        payload = {"confirm_id": "abl-1-confirm", "seeds": [1, 2], "test_events": 200,
                   "interval": "95% percentile bootstrap", "finalists": fins,
                   "rankings": [{"kind": "classifier", "model": "abl-classifier", "val_metric": "val_auc",
                                 "test_metric": "test_auc", "mode": "max", "finalists": list(range(len(runs))),
                                 "matrix_finalists": [], "matrix": [], "champion": 0, "reason": "best"}]}
        c.log_dict(parent, payload, "confirm/abl-1-confirm.json")
        c.set_tag(parent, "e2e.confirm_id", "abl-1-confirm")
    c.set_terminated(parent)
    del m
    return uri


def test_factors_label_values_bins_and_inactive():
    dims = dims_of(RESOLVED)
    assert set(dims) == {"pretrain_epochs", "mask_ratio", "task_queries", "lr"}        # depth is fixed
    params = [{"pretrain_epochs": str(p), "task_queries": str(t), "lr": str(lr),
               **({"mask_ratio": str(r)} if r is not None else {})} for p, r, t, lr, _ in TRIALS]
    facs = {f.name: f for f in factors(dims, params)}
    assert facs["mask_ratio"].labels[:3] == [None, None, "0.15"]
    assert facs["mask_ratio"].order == ["0.15", "0.5", "not active"]
    assert facs["lr"].order[0].startswith("low [") and len(facs["lr"].order) == 3      # 6 values: 3 quantile bins
    imp, note = importances(list(facs.values()), [t[-1] for t in TRIALS], "max")
    assert set(imp) <= set(facs) and abs(sum(imp.values()) - 1) < 1e-9 and "PedAnova" in note
    none, why = importances(list(facs.values()), [0.8, 0.9], "max")
    assert none == {} and "2 finished trial(s)" in why
    one = factors({"task_queries": dims["task_queries"]}, [{"task_queries": "1"}] * 4)
    none, why = importances(one, [0.8, 0.9, 0.7, 0.6], "max")
    assert none == {} and "two different values" in why


def test_report_shows_effects_importances_and_attention_with_and_without_pretraining(tmp_path):
    from e2e_search.analysis.report import build_report

    uri = _store(tmp_path)
    text, _ = build_report(uri, "abl", costs=False)
    sec = text[text.index("<h2>Technique effects</h2>"):]
    assert "below: the 6 finalists confirmed on the test split (test_auc" in sec
    assert "PedAnovaImportanceEvaluator" in sec and "over 6 finished trials" in sec
    assert "What the task heads look at" in sec and "side-by-side" not in sec
    assert sec.count("<img") == 3                                             # effects, importances, attention
    # the table: per value, the trials' val_auc and the confirmed finalists' test_auc with intervals
    assert "<td>pretrain_epochs</td><td>2</td><td>4</td>" in sec and "<b>0.835</b> mean of:" in sec
    assert "<td>mask_ratio</td><td>not active</td><td>2</td>" in sec
    assert "Masked-object reconstruction of the best pretrained trial" in sec and "<th>jet1</th><td>0.400</td>" in sec


def test_report_says_why_a_chart_is_absent(tmp_path):
    from e2e_search.analysis.report import build_report

    uri = _store(tmp_path, TRIALS[:2], confirm=False)
    text, _ = build_report(uri, "abl", costs=False)
    sec = text[text.index("<h2>Technique effects</h2>"):]
    assert "no importance chart: 2 finished trial(s)" in sec and "no test figures" in sec
    assert "Left out (one value in the finished trials): mask_ratio, pretrain_epochs" in sec
    assert "Only one pretraining setting" in sec


# --------------------------------------------------------------------------- the shipped ablation, end to end
@pytest.mark.slow  # real Ray, Optuna, MLflow: 3 grid trials and 3 confirm retrainings of tiny models
def test_ablation_yaml_runs_confirms_and_reports(tmp_path, monkeypatch, capsys, ray_local):
    from e2e_search.cli import main

    monkeypatch.chdir(tmp_path)
    data = write_objects(tmp_path / "events.h5", n=120)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"data.path={data}", "params.task_queries.values=[2]", "params.depth=1", "params.embed_dim=16",
            "params.batch_size=16", "scheduler.max_epochs=3", "search.num_samples=3", "search.confirm.top=3",
            "search.confirm.seeds=1", f"tracking.uri={uri}", f"tracking.storage={tmp_path / 'ray'}",
            f"tracking.artifacts={tmp_path / 'artifacts'}"]
    assert main(["run", str(SPACES / "mae_event_ablation.yaml"), *sum((["--set", s] for s in sets), [])]) == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mae_event_ablation")
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`e2e.kind` = 'trial'")
    combos = {(r.data.params["pretrain_epochs"], r.data.params.get("mask_ratio")) for r in trials}
    assert combos == {("0", None), ("2", "0.15"), ("2", "0.5")}
    for r in trials:
        assert "plots/task_attention.png" in {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
        assert ("best_val_recon_jet1_pt" in r.data.metrics) == (r.data.params["pretrain_epochs"] == "2")
    assert main(["report", "mae_event_ablation", "--tracking-uri", uri, "--out", str(tmp_path / "r.html")]) == 0
    sec = (tmp_path / "r.html").read_text().split("<h2>Technique effects</h2>")[1]
    assert "below: the 3 finalists confirmed on the test split (test_auc" in sec
    assert "What the task heads look at" in sec and "Only one pretraining setting" not in sec
    assert "PedAnovaImportanceEvaluator" in sec or "no importance chart" in sec
