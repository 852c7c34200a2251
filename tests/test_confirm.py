"""``e2e-search confirm``: test scores of the finalists, repeated seeds, bootstrap intervals, champions by the
test mean (issue 17).

Ray-free: the bootstrap (agreement with trainables/metrics.py, coverage, paired probabilities), the champion
rule, the file hash, the core's seeded retraining and test scoring (reproducible on the CPU), and bad input
against an MLflow store built here (one line, exit 2, nothing written). One real end-to-end test: a 2-trial
search through a real local Ray, then ``confirm --top 2 --seeds 2``, and the MLflow record it leaves.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from e2e_search.analysis.bootstrap import (
    View,
    count_blocks,
    interval,
    prob_better,
    resampled,
    seed_mean,
    view,
    weighted,
    win_matrix,
)
from e2e_search.cli import main
from e2e_search.confirm.plan import Candidate, champion_metric, choose_champion, prepare
from e2e_search.data.fileid import file_hash
from e2e_search.data.inspect import inspect
from e2e_search.spec.loader import dump, validate
from tests.conftest import base_config, write_e2e, write_yaml
from trainables.core import layout
from trainables.core.contract import TrialConfig
from trainables.core.loop import train_trial
from trainables.core.scoring import load_scored
from trainables.core.session import LocalSession
from trainables.metrics import classification_metrics, regression_metrics, softmax

VIT = {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, "batch_size": 16}


# --------------------------------------------------------------------------- bootstrap
def _binary(n: int, shift: float, rng, rounding: int | None = None):
    y = rng.integers(0, 2, n)
    logits = rng.normal(size=(n, 2))
    logits[:, 1] += shift * y
    return (np.round(logits, rounding) if rounding is not None else logits), y


@pytest.mark.parametrize("rounding", [None, 1], ids=["distinct", "ties"])
def test_weighted_metrics_equal_the_trial_metrics_and_explicit_resamples(rounding):
    """All counts 1: exactly metrics.py's value; counts of a resample: the metric of that resample."""
    rng = np.random.default_rng(3)
    logits, y = _binary(300, 1.0, rng, rounding)
    v = View(prob=softmax(logits), labels=y)
    ones = np.ones((1, len(y)))
    ref = classification_metrics(logits, y)
    for k in ("auc", "acc", "rej30", "rej50", "rej70"):
        assert weighted(k, v, ones)[0] == pytest.approx(ref[f"val_{k}"], rel=1e-12), k
    idx = rng.integers(0, len(y), (4, len(y)))
    counts = np.stack([np.bincount(i, minlength=len(y)) for i in idx]).astype(float)
    for k in ("auc", "rej50"):
        expect = [classification_metrics(logits[i], y[i])[f"val_{k}"] for i in idx]
        assert weighted(k, v, counts) == pytest.approx(expect, rel=1e-12), k
    y3 = rng.integers(0, 3, 200)
    l3 = rng.normal(size=(200, 3))
    l3[np.arange(200), y3] += 1
    ref3 = classification_metrics(l3, y3)
    v3 = View(prob=softmax(l3), labels=y3)
    assert weighted("auc", v3, np.ones((1, 200)))[0] == pytest.approx(ref3["val_auc"], rel=1e-12)  # OvR macro
    true = rng.uniform(50, 200, 200)
    pred = true + rng.normal(0, 10, 200)
    refr = regression_metrics(pred, true)
    vr = View(pred=pred, true=true)
    for k in ("mae", "bias", "abs_bias", "resolution"):
        assert weighted(k, vr, np.ones((1, 200)))[0] == pytest.approx(refr[f"val_{k}"], rel=1e-9), k


def test_interval_covers_the_true_auc_95_percent_of_the_time():
    """Scores N(mu, 1) for signal, N(0, 1) for background: the true AUC is Phi(mu / sqrt 2). Over 200 test
    samples of 300 events, the 95% percentile interval holds it about 95% of the time."""
    rng = np.random.default_rng(0)
    mu = 1.0
    true_auc = 0.5 * (1 + math.erf(mu / 2))  # Phi(mu / sqrt 2)
    hits = 0
    for i in range(200):
        y = np.arange(300) % 2
        s = rng.normal(size=300) + mu * y
        prob = np.stack([1 - 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-s))], axis=1)
        [[stats]] = resampled([[View(prob=prob, labels=y)]], "test_auc", replicates=400, seed=i)
        lo, hi = interval(stats)
        hits += lo <= true_auc <= hi
    assert 0.89 <= hits / 200 <= 0.99, hits


def test_paired_bootstrap_probability():
    """A clearly better model beats the other on ~every replicate; identical models tie (exactly 0.5); the
    matrix is complementary."""
    rng = np.random.default_rng(1)
    y = np.arange(400) % 2
    good = np.stack([np.zeros(400), 3.0 * y + rng.normal(size=400)], axis=1)
    weak = np.stack([np.zeros(400), 0.3 * y + rng.normal(size=400)], axis=1)
    views = [[View(prob=softmax(good), labels=y)], [View(prob=softmax(weak), labels=y)],
             [View(prob=softmax(good), labels=y)]]
    (g,), (w,), (g2,) = resampled(views, "test_auc", replicates=500)
    assert prob_better(g, w, "max") > 0.99 and prob_better(w, g, "max") < 0.01
    assert prob_better(g, g2, "max") == 0.5
    m = win_matrix([g, w], "max")
    assert m[0][0] is None and m[0][1] + m[1][0] == pytest.approx(1.0)
    assert prob_better(np.array([1.0, 2.0]), np.array([2.0, 2.0]), "min") == 0.75  # lower is better; a tie is half


def test_seed_variance_widens_the_finalist_interval():
    rng = np.random.default_rng(2)
    y = np.arange(600) % 2
    views = []
    for shift in (1.0, 1.6):  # two seeds of unequal quality
        views.append(View(prob=softmax(np.stack([np.zeros(600), shift * y + rng.normal(size=600)], 1)), labels=y))
    [stats] = resampled([views], "test_auc", replicates=800)
    one = interval(stats[0])
    both = interval(seed_mean(stats, seed=0))
    assert (both[1] - both[0]) > (one[1] - one[0])
    assert np.array_equal(seed_mean(stats[:1]), stats[0])
    assert sum(len(c) for c in count_blocks(1000, 1000, block=250_000)) == 1000  # replicates cut in blocks


def test_view_aligns_events_by_file_index():
    out = np.array([[0.0, 2.0], [0.0, -1.0], [0.0, 0.5]])
    pred = {"out": out, "y": np.array([1, 0, 1]), "index": np.array([7, 3, 5]), "task": "classification",
            "num_classes": 2, "target_mean": 0.0, "target_std": 1.0}
    v = view(pred, "test_auc")
    assert list(v.labels) == [0, 1, 1] and v.prob[0, 1] < 0.5
    joint = {**pred, "out": np.c_[out, [1.0, 2.0, 3.0]], "y": np.c_[[1, 0, 1], [0.5, 1.0, 1.5]], "task": "joint",
             "target_mean": 100.0, "target_std": 10.0}
    r = view(joint, "test_mae")
    assert list(r.pred) == [120.0, 130.0, 110.0] and list(r.true) == [110.0, 115.0, 105.0]


# --------------------------------------------------------------------------- champion rule
def test_champion_is_the_best_mean_without_overlap():
    c = [Candidate("#1 vit", 0.95, 0.94, 0.96, 10_000), Candidate("#2 swin", 0.90, 0.89, 0.91, 100)]
    pick, why = choose_champion(c, "max", "test_auc")
    assert pick == 0 and "no other finalist's 95% interval overlaps" in why


def test_overlapping_intervals_prefer_fewer_parameters_and_say_so():
    c = [Candidate("#1 vit", 0.950, 0.93, 0.97, 10_000), Candidate("#2 swin", 0.945, 0.92, 0.96, 2_000),
         Candidate("#3 cait", 0.80, 0.78, 0.82, 10)]
    pick, why = choose_champion(c, "max", "test_auc")
    assert pick == 1 and why.startswith("fewer parameters: #2 swin (2,000 parameters")
    assert "#1 vit (10,000 parameters" in why and "intervals overlap" in why
    c[1].num_params = 50_000  # the overlapping one is larger: the best mean stays
    pick, why = choose_champion(c, "max", "test_auc")
    assert pick == 0 and "none has fewer parameters" in why
    # lower is better (a regressor's test_mae); NaN means are never chosen
    r = [Candidate("#1", 5.0, 4.0, 6.0, 900), Candidate("#2", 5.5, 4.5, 6.5, 300), Candidate("#3", math.nan,
                                                                                            math.nan, math.nan, 1)]
    assert choose_champion(r, "min", "test_mae")[0] == 1
    assert choose_champion([Candidate("#1", math.nan, math.nan, math.nan, 1)], "max", "test_auc") == (
        None, "no finalist has a finite test mean")


def test_champion_metric_follows_the_search_metric():
    assert champion_metric("classifier", "val_auc") == ("test_auc", "max")
    assert champion_metric("classifier", "val_rej50") == ("test_rej50", "max")
    assert champion_metric("classifier", "val_loss") == ("test_auc", "max")  # no bootstrap for a loss
    assert champion_metric("regressor", "val_resolution") == ("test_resolution", "min")
    assert champion_metric("regressor", "val_loss") == ("test_mae", "min")


def test_file_hash_follows_the_bytes(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 5000)
    h = file_hash(f)
    assert h.startswith("blake2b:") and file_hash(f) == h
    f.write_bytes(b"x" * 4999 + b"y")
    assert file_hash(f) != h
    big = file_hash(f, full_limit=100)  # a file over the limit: size and sampled blocks
    assert big.startswith("blake2b-sampled:") and big != file_hash(f)


# --------------------------------------------------------------------------- the core: seeded retraining, scoring
@pytest.fixture(scope="module")
def split(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("confirm_core")
    path = write_e2e(tmp / "d.h5", n=80, size=16)
    return tmp, path


def _setup(split, **data):
    tmp, path = split
    return inspect(validate(base_config(tmp, path, data={"val_fraction": 0.25, "test_fraction": 0.25, **data}),
                            source="t.yaml"))


def _retrain(setup, folder: Path, seed: int, **over):
    kw = {"family": "vit", "params": {**VIT, "seed": seed, "drop_path": 0.1}, "data": setup.to_dict(),
          "max_epochs": 3, "stop_epoch": 2, "score_split": "test", "metric": "val_auc", "mode": "max",
          "metrics": ["val_auc"]}
    kw.update(over)
    s = LocalSession(folder)
    train_trial(TrialConfig(**kw), s)
    return s


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_seeded_retraining_gives_identical_test_scores(split, tmp_path, cache):
    """Model initialization, data order, flips and drop-path follow the seed: two runs with the same seed give
    the same test scores and predictions bit for bit on the CPU; another seed gives others. The run stops at
    stop_epoch on the schedule of max_epochs and scores the test split once."""
    setup = _setup(split, flip_augment=True, cache=cache)
    a = _retrain(setup, tmp_path / "a", 1)
    b = _retrain(setup, tmp_path / "b", 1)
    c = _retrain(setup, tmp_path / "c", 2)
    assert [m["epoch"] for m, _ in a.reports] == [1, 2]
    assert "test_auc" not in a.reports[0][0]  # scored once, after the last epoch
    last = a.reports[-1][0]
    assert {"test_loss", "test_auc", "test_acc", "test_rej30", "test_rej50", "test_rej70"} <= set(last)
    assert last["lr"] > 0  # the cosine schedule spans 3 epochs: not at its end
    pa, pb, pc = (load_scored(s.reports[-1][1] / layout.TEST_PREDICTIONS_FILE) for s in (a, b, c))
    assert sorted(pa["index"].tolist()) == sorted(setup.test) and pa["out"].shape == (len(setup.test), 2)
    assert np.array_equal(pa["out"], pb["out"]) and last["test_loss"] == b.reports[-1][0]["test_loss"]
    assert not np.array_equal(pa["out"], pc["out"])


def test_regression_scores_resolution_and_bias_per_bin(split, tmp_path):
    tmp, path = split
    cfg = base_config(tmp, path, task={"type": "regression", "target": "m0"},
                      data={"val_fraction": 0.25, "test_fraction": 0.25}, search={"metric": "val_mae"})
    setup = inspect(validate(cfg, source="t.yaml"))
    s = _retrain(setup, tmp_path, 1, metric="val_mae", mode="min", metrics=["val_mae"], stop_epoch=1)
    last = s.reports[-1][0]
    assert {"test_mae", "test_bias", "test_resolution", "test_abs_bias"} <= set(last)
    assert any(k.startswith("test_bin/") and k.endswith("/resolution") for k in last)


# --------------------------------------------------------------------------- bad input: one line, exit 2, nothing written
FAKE_TRIALS = [("t1", 0.90, 2, 5000), ("t2", 0.80, 1, 3000), ("t3", 0.85, 2, 4000)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store holding searches as ``e2e-search run`` records them (no training): experiment ``fake``
    (a finished search of 3 trials on jets.h5 with its data hash), ``running`` (only an unfinished search)
    and ``notest`` (a finished search with data.test_fraction 0). Tests copy it."""
    root = tmp_path_factory.mktemp("store")
    write_e2e(root / "jets.h5", n=64)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    for exp_name, status, test_fraction in (("fake", "FINISHED", 0.25), ("running", "RUNNING", 0.25),
                                            ("notest", "FINISHED", 0.0)):
        cfg = base_config(root, Path("jets.h5"), name=exp_name, data={"val_fraction": 0.25,
                                                                     "test_fraction": test_fraction})
        cfg["tracking"] = {}
        resolved = validate(cfg, source="t.yaml")
        exp = client.create_experiment(exp_name, artifact_location=(root / "artifacts" / exp_name).as_uri())
        run_name = f"{exp_name}-20260101-000000"
        parent = client.create_run(exp, run_name=run_name, tags={
            "e2e.kind": "search", "e2e.metric": "val_auc", "e2e.mode": "max",
            "e2e.data_hash": file_hash(root / "jets.h5")}).info.run_id
        client.log_text(parent, dump(resolved), "search_space.yaml")
        for tid, auc, epoch, n in FAKE_TRIALS:
            rid = client.create_run(exp, run_name=f"{run_name}-{tid}", tags={
                "mlflow.parentRunId": parent, "e2e.kind": "trial", "e2e.trial_id": tid, "e2e.family": "vit",
                "e2e.status": "FINISHED"}).info.run_id
            client.log_dict(rid, {"family": "vit", "params": {**VIT, "lr": 0.001}}, "config.yaml")
            for k, v in (("best_val_auc", auc), ("best_epoch", epoch), ("num_params", n), ("best_lr", 0.1)):
                client.log_metric(rid, k, v)
            client.set_terminated(rid)
        client.set_terminated(parent, status=status)
    return root


@pytest.fixture
def ws(store, tmp_path, monkeypatch):
    """A working directory with a copy of the store and the data file."""
    for name in ("mlflow.db", "jets.h5"):
        shutil.copy(store / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _uri(ws: Path) -> str:
    return f"sqlite:///{ws / 'mlflow.db'}"


def _state(ws: Path) -> dict[str, str]:
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in ws.rglob("*")}


def _refused(ws: Path, capsys, argv: list[str], *names: str) -> str:
    before = _state(ws)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and "Traceback" not in err, (rc, out, err)
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert _state(ws) == before  # nothing written: not a file, not a byte of the store
    return lines[0]


def test_prepare_picks_the_best_finished_trials(ws):
    cp = prepare(_uri(ws), "fake", top=2, seeds=3)
    assert [f.trial_id for f in cp.finalists] == ["t1", "t3"] and cp.seeds == [1, 2, 3]
    assert [f.epochs for f in cp.finalists] == [2, 2] and cp.finalists[0].num_params == 5000
    assert cp.finalists[0].params == {**VIT, "lr": 0.001} and cp.finalists[0].val == {"val_auc": 0.90}
    assert len(cp.plan.data.test) == 16 and cp.rankings[0].test_metric == "test_auc"
    cp = prepare(_uri(ws), "fake", top=5, seeds=1)  # fewer trials than asked: all of them, with a note
    assert len(cp.finalists) == 3 and "fewer than 5" in cp.notes[0]


@pytest.mark.parametrize("argv,names", [
    (["--top", "0"], ["--top", "1 or more"]),
    (["--seeds", "0"], ["--seeds", "1 or more"]),
], ids=["top_0", "seeds_0"])
def test_bad_flags_are_refused(ws, capsys, argv, names):
    _refused(ws, capsys, ["confirm", "fake", "--tracking-uri", _uri(ws), *argv], *names)


def test_experiment_without_a_finished_search_is_refused(ws, capsys):
    _refused(ws, capsys, ["confirm", "running", "--tracking-uri", _uri(ws)], "holds no finished search",
             "e2e-search resume running")
    _refused(ws, capsys, ["confirm", "nosuch", "--tracking-uri", _uri(ws)], "no experiment 'nosuch'")


def test_unfinished_or_wrong_search_run_is_refused(ws, capsys):
    client = MlflowClient(tracking_uri=_uri(ws))
    running = client.search_runs([client.get_experiment_by_name("running").experiment_id],
                                 filter_string="tags.`e2e.kind` = 'search'")[0].info.run_id
    exp = client.get_experiment_by_name("fake").experiment_id
    trial = client.search_runs([exp], filter_string="tags.`e2e.kind` = 'trial'")[0].info.run_id
    _refused(ws, capsys, ["confirm", "running", "--tracking-uri", _uri(ws), "--search", running],
             "--search", "has not finished")
    _refused(ws, capsys, ["confirm", "fake", "--tracking-uri", _uri(ws), "--search", trial], "a trial's run")


def test_changed_data_file_is_refused(ws, capsys):
    write_e2e(ws / "jets.h5", n=64, seed=1)  # other events under the same name
    _refused(ws, capsys, ["confirm", "fake", "--tracking-uri", _uri(ws)], "data.path", "jets.h5 changed since search")
    (ws / "jets.h5").unlink()
    _refused(ws, capsys, ["confirm", "fake", "--tracking-uri", _uri(ws)], "data.path", "is gone")


def test_search_without_test_split_is_refused(ws, capsys):
    _refused(ws, capsys, ["confirm", "notest", "--tracking-uri", _uri(ws)], "data.test_fraction",
             "held out no test split")


def test_yaml_confirm_needs_a_test_split_and_positive_counts(ws, capsys):
    cfg = base_config(ws, ws / "jets.h5", data={"test_fraction": 0.0}, search={"confirm": {"top": 2}})
    y = write_yaml(ws / "c.yaml", cfg)
    _refused(ws, capsys, ["validate", str(y)], "search.confirm", "data.test_fraction is 0")
    cfg = base_config(ws, ws / "jets.h5", data={"test_fraction": 0.2}, search={"confirm": {"top": 0}})
    y = write_yaml(ws / "c.yaml", cfg)
    _refused(ws, capsys, ["validate", str(y)], "search.confirm.top", ">= 1")


# --------------------------------------------------------------------------- end to end: real Ray, MLflow, HDF5
def test_search_then_confirm_records_test_scores_intervals_and_champion(tmp_path, monkeypatch, capsys, ray_local):
    """A 2-trial search, then ``confirm --top 2 --seeds 2``: 4 seed runs with every test metric and its interval,
    2 finalist runs with mean, std and the interval over seeds, the champion alias at the finalist the rule
    picks, the matrix and intervals in ``report``."""
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "jets.h5", n=96)
    cfg = base_config(tmp_path, data, name="conf", data={"val_fraction": 0.25, "test_fraction": 0.25})
    yml = write_yaml(tmp_path / "s.yaml", cfg)
    uri = cfg["tracking"]["uri"]
    assert main(["run", str(yml)]) == 0
    assert main(["confirm", "conf", "--tracking-uri", uri, "--top", "2", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 retrainings finished" in out and "P(row beats column)" in out

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("conf").experiment_id
    runs = client.search_runs([exp], max_results=100)
    search = next(r for r in runs if r.data.tags.get("e2e.kind") == "search")
    seeds = [r for r in runs if r.data.tags.get("e2e.kind") == "confirm_seed"]
    fins = sorted((r for r in runs if r.data.tags.get("e2e.kind") == "confirm_finalist"),
                  key=lambda r: int(r.data.tags["e2e.finalist"]))
    assert len(seeds) == 4 and len(fins) == 2
    cid = search.data.tags["e2e.confirm_id"]
    for r in seeds + fins:
        assert r.info.status == "FINISHED" and r.data.tags["e2e.phase"] == "confirm"
        assert r.data.tags["mlflow.parentRunId"] == search.info.run_id and r.data.tags["e2e.confirm_id"] == cid
    for r in seeds:
        m = r.data.metrics
        assert {"test_auc", "test_acc", "test_rej30", "test_rej50", "test_rej70", "test_auc_lo", "test_auc_hi"} <= set(m)
        assert m["test_auc_lo"] <= m["test_auc"] <= m["test_auc_hi"]
        assert r.data.params["seed"] == r.data.tags["e2e.seed"] in ("1", "2")
        arts = {a.path for a in client.list_artifacts(r.info.run_id, "best_checkpoint")}
        assert "best_checkpoint/test_predictions.npz" in arts and "best_checkpoint/checkpoint.pt" in arts
    for f in fins:
        m = f.data.metrics
        mine = [s for s in seeds if s.data.tags["e2e.finalist"] == f.data.tags["e2e.finalist"]]
        vals = [s.data.metrics["test_auc"] for s in mine]
        assert m["test_auc_mean"] == pytest.approx(np.mean(vals)) and m["test_auc_std"] == pytest.approx(np.std(vals, ddof=1))
        assert {"test_rej50_mean", "test_acc_std", "best_val_auc", "num_params"} <= set(m)
        assert m["test_auc_lo"] <= m["test_auc_mean"] <= m["test_auc_hi"]
        source = client.get_run(f.data.tags["e2e.source_run_id"])
        assert int(f.data.params["epochs"]) == int(source.data.metrics["best_epoch"])

    # The champion: the rule applied to what MLflow holds.
    cands = [Candidate(f"#{f.data.tags['e2e.finalist']} vit", f.data.metrics["test_auc_mean"], f.data.metrics["test_auc_lo"],
                       f.data.metrics["test_auc_hi"], int(f.data.metrics["num_params"])) for f in fins]
    pick, reason = choose_champion(cands, "max", "test_auc")
    champ = client.get_model_version_by_alias("conf-classifier", "champion")
    assert champ.tags["e2e.phase"] == "confirm" and champ.tags["e2e.finalist_run"] == fins[pick].info.run_id
    assert champ.tags["e2e.champion_reason"] == reason == fins[pick].data.tags["e2e.champion.classifier"]
    # a real MLflow Model (issue 28), logged beside the run's best_checkpoint/ that export and report read
    assert champ.source.endswith("/model") and "e2e.model_error" not in champ.tags
    assert champ.tags["e2e.metric"] == "test_auc"
    payload = json.loads(Path(client.download_artifacts(search.info.run_id, f"confirm/{cid}.json",
                                                        str(tmp_path))).read_text())
    [rk] = payload["rankings"]
    assert rk["champion"] == pick and len(rk["matrix"]) == 2
    assert rk["matrix"][0][1] + rk["matrix"][1][0] == pytest.approx(1.0)

    assert main(["report", "conf", "--tracking-uri", uri, "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "Confirmation on the test split" in html and "P(row beats column)" in html
    assert html.count("<tr>") >= 3 and "test_auc (confirm) mean [95% interval]" in html


@pytest.mark.slow
def test_joint_search_with_yaml_confirm_moves_both_champions(tmp_path, monkeypatch, capsys, ray_local):
    """``search.confirm`` in the YAML runs confirm after the search; a joint task moves the classifier (test
    AUC) and the regressor (test MAE, its own finalists by val_mae). A second confirm of the same finalist and
    seed, through Ray again (warm Tune processes), gives the same test scores."""
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "jets.h5", n=96)
    cfg = base_config(tmp_path, data, name="joint", task={"type": "joint", "num_classes": 2, "target": "m0"},
                      data={"val_fraction": 0.25, "test_fraction": 0.25},
                      search={"num_samples": 2, "seed": 0, "confirm": {"top": 1, "seeds": 2}})
    yml = write_yaml(tmp_path / "s.yaml", cfg)
    assert main(["run", str(yml)]) == 0
    out = capsys.readouterr().out
    assert "confirm (search.confirm: top 1, seeds 2)" in out
    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    for model, metric in (("joint-classifier", "test_auc"), ("joint-regressor", "test_mae")):
        v = client.get_model_version_by_alias(model, "champion")
        assert v.tags["e2e.phase"] == "confirm" and v.tags["e2e.metric"] == metric
    seeds = client.search_runs([client.get_experiment_by_name("joint").experiment_id],
                               filter_string="tags.`e2e.kind` = 'confirm_seed'")
    assert all({"test_auc", "test_mae", "test_resolution", "test_mae_lo", "test_auc_hi"} <= set(r.data.metrics)
               for r in seeds)
    assert yaml.safe_load(dump(validate(cfg, source="s.yaml")))["search"]["confirm"] == {
        "top": 1, "seeds": 2, "per_family": False}
    first = next(s for s in seeds if s.data.tags["e2e.finalist"] == "1" and s.data.tags["e2e.seed"] == "1")
    assert main(["confirm", "joint", "--tracking-uri", cfg["tracking"]["uri"], "--top", "1", "--seeds", "1"]) == 0
    again = [r for r in client.search_runs([first.info.experiment_id], max_results=100,
                                           filter_string="tags.`e2e.kind` = 'confirm_seed'")
             if r.data.tags["e2e.confirm_id"] != first.data.tags["e2e.confirm_id"]
             and r.data.tags["e2e.finalist"] == "1"]
    assert len(again) == 1
    for k in ("test_auc", "test_loss", "test_mae", "test_resolution"):
        assert again[0].data.metrics[k] == first.data.metrics[k], k
