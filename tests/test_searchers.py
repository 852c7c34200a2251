"""Searchers, schedulers and warm starts (issue 18) without Ray where Ray adds nothing: the Optuna samplers over
the define-by-run space, PBT's initial population and range clipping, the trial core restoring another trial's
checkpoint with new training values, the MLflow record of an exploited trial, and the warm start read from a
real MLflow store. The searches themselves (real local Ray) are in tests/test_search_algorithms.py."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from e2e_search.data.inspect import inspect
from e2e_search.record.trials import MlflowTrials
from e2e_search.search.algorithms import (
    ClipToRanges,
    initial_population,
    observations,
    sampler,
    searcher,
    startup_trials,
)
from e2e_search.search.warm_start import load as load_warm
from e2e_search.search.warm_start import to_space
from e2e_search.spec.loader import validate
from e2e_search.spec.params import OptunaSpace
from e2e_search.spec.search_checks import pbt_dims
from tests.conftest import base_config, write_e2e
from trainables.core.checkpoint import TrialCheckpoint
from trainables.core.contract import TrialConfig
from trainables.core.engine import Engine
from trainables.core.loop import train_trial
from trainables.core.session import LocalSession
from trainables.errors import UserError

VIT = {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, "batch_size": 16}


def _space(tmp_path, **over):
    cfg = base_config(tmp_path, tmp_path / "d.h5", **over)
    cfg["params"]["drop_path"] = {"type": "uniform", "low": 0.0, "high": 0.2}
    cfg["params"]["pool"] = {"type": "choice", "values": ["token", "avg"]}
    cfg["params"]["mlp_ratio"] = {"type": "quniform", "low": 1.0, "high": 3.0, "q": 0.5}
    return cfg


@pytest.mark.parametrize("algorithm", ["gp", "qmc", "cmaes", "tpe"])
def test_each_sampler_draws_the_space_with_grid_points_first(tmp_path, algorithm):
    """Every sampler behind OptunaSearch fills the define-by-run space (conditions honoured), grid points
    are the first trials, and results feed back."""
    cfg = _space(tmp_path, search={"algorithm": algorithm, "num_samples": 6, "seed": 1})
    cfg["params"]["embed_dim"] = 16 if algorithm == "cmaes" else {"type": "grid", "values": [16, 32]}
    if algorithm == "cmaes":  # numeric dimensions only (check_search refuses choices)
        cfg["params"]["pool"] = "avg"
    c = validate(cfg, source="t.yaml")
    with warnings.catch_warnings():  # Optuna's "experimental" warnings are not the user's to read
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        made = sampler(c)
    study = optuna.create_study(direction="maximize", sampler=made)
    space = OptunaSpace(c)
    if algorithm != "cmaes":
        for p in ({"embed_dim": 16}, {"embed_dim": 32}):
            study.enqueue_trial(p)
    seen = []
    for _ in range(6):
        t = study.ask()
        fixed = space(t)
        params = {**t.params, **fixed}
        assert 1e-3 <= params["lr"] <= 3e-3 and 0.0 <= params["drop_path"] <= 0.2
        assert params["mlp_ratio"] in (1.0, 1.5, 2.0, 2.5, 3.0)
        seen.append(params)
        study.tell(t, params["lr"] * 100)
    if algorithm != "cmaes":
        assert [s["embed_dim"] for s in seen[:2]] == [16, 32]
    assert len(study.trials) == 6


@pytest.mark.parametrize("algorithm", ["tpe", "random", "nsga2", "gp", "cmaes", "qmc"])
def test_every_sampler_pickles_as_ray_tune_saves_it(tmp_path, algorithm):
    """Ray Tune pickles the searcher (Tuner, experiment state): every sampler must survive it (Optuna 5.1's
    NSGA-II sampler holds a threading lock) and draw the same values after it."""
    import pickle

    cfg = _space(tmp_path, search={"algorithm": algorithm, "num_samples": 4, "seed": 1})
    if algorithm == "cmaes":  # numeric dimensions only
        cfg["params"].update(pool="avg", embed_dim=16)
    c = validate(cfg, source="t.yaml")
    s = sampler(c)
    copy = pickle.loads(pickle.dumps(s))
    draws = []
    for smp in (s, copy):
        study = optuna.create_study(sampler=smp, directions=["maximize", "minimize"] if algorithm == "nsga2"
                                    else ["maximize"])
        draws.append([study.ask().suggest_float("x", 0.0, 1.0) for _ in range(2)])
    assert draws[0] == draws[1]


def test_gp_and_cmaes_note_conditional_dimensions(tmp_path):
    cfg = base_config(tmp_path, tmp_path / "d.h5", search={"algorithm": "gp"})
    cfg["params"]["drop_path"] = {"type": "uniform", "low": 0.0, "high": 0.2, "when": {"embed_dim": 32}}
    c = validate(cfg, source="t.yaml")
    assert any("params.drop_path are drawn at random" in n for n in c.notes), c.notes


def test_pbt_population_and_mutations(tmp_path):
    """PBT: the initial population comes from the sampler (grid points first); only unconditional continuous
    lr / weight_decay / drop_path are mutated; a perturbed value is clipped into its range."""
    cfg = _space(tmp_path, search={"algorithm": "tpe", "num_samples": 4},
                 scheduler={"type": "pbt", "max_epochs": 4, "perturbation_interval": 1})
    cfg["params"]["embed_dim"] = {"type": "grid", "values": [16, 32]}
    c = validate(cfg, source="t.yaml")
    pop = initial_population(c)
    assert len(pop) == 4 and [p["embed_dim"] for p in pop[:2]] == [16, 32]
    assert all(1e-3 <= p["lr"] <= 3e-3 for p in pop)
    assert set(pbt_dims(c)) == {"lr", "drop_path"}
    clip = ClipToRanges({n: (d.low, d.high) for n, d in pbt_dims(c).items()})
    assert clip({"lr": 1.0, "drop_path": -0.5, "depth": 3}) == {"lr": 3e-3, "drop_path": 0.0, "depth": 3}


def test_warm_start_maps_clips_and_drops(tmp_path):
    cfg = _space(tmp_path)
    cfg["params"]["embed_dim"] = {"type": "choice", "values": [16, 32]}
    cfg["params"]["depth"] = {"type": "randint", "low": 1, "high": 2}
    c = validate(cfg, source="t.yaml")
    point, ch = to_space(c, {"lr": 0.5, "embed_dim": 64, "depth": 5, "pool": "avg", "mlp_ratio": 2.6,
                             "drop_path": 0.1, "gone": 3}, "vit")
    assert point == {"lr": 3e-3, "depth": 2, "pool": "avg", "mlp_ratio__step": 3, "drop_path": 0.1}
    assert ch == {"clipped": {"lr", "depth"}, "dropped": {"embed_dim"}, "missing": set()}
    study = optuna.create_study(direction="maximize")
    space = OptunaSpace(c)
    # embed_dim was dropped: not a complete observation, only queued; the other is one
    full = {**point, "embed_dim": 32}
    learned = observations(space, [(point, 0.7), (full, 0.8)])
    assert len(learned) == 1
    study.add_trials(learned)
    assert study.best_value == 0.8 and study.best_params["embed_dim"] == 32


def test_warm_start_reads_the_best_finished_trials(tmp_path):
    """From a real MLflow store: the K best FINISHED trials of the experiment's family, best first; a missing
    experiment or one without such trials is refused naming search.warm_start.experiment."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    for i, (auc, fam, status) in enumerate([(0.9, "vit", "FINISHED"), (0.95, "vit", "FINISHED"),
                                            (0.99, "vit", "FAILED"), (0.97, "cait", "FINISHED")]):
        r = client.create_run(exp, tags={"e2e.kind": "trial", "e2e.family": fam})
        client.log_metric(r.info.run_id, "best_val_auc", auc)
        if auc == 0.95:  # peaked early, then overfitted: observed with its last value, ranked by its best
            client.log_metric(r.info.run_id, "final_val_auc", 0.91)
        client.log_dict(r.info.run_id, {"family": fam, "params": {"lr": 1e-3 * (i + 1), "embed_dim": 16}},
                        "config.yaml")
        client.set_terminated(r.info.run_id, status=status)
    cfg = base_config(tmp_path, tmp_path / "d.h5", search={"warm_start": {"experiment": "old", "top": 5}})
    c = validate(cfg, source="t.yaml")
    warm = load_warm(c, uri)
    assert [v for _, v in warm.observed] == [0.91, 0.9]
    assert warm.points[0] == {"lr": 2e-3, "embed_dim": 16}
    assert warm.note is None  # both in the new ranges
    # top 1: one queued point; the other finished trial is still a prior observation, unless the new ranges
    # would have to change it (then it is left out: its value belongs to another point)
    cfg["search"]["warm_start"]["top"] = 1
    warm = load_warm(validate(cfg, source="t.yaml"), uri)
    assert warm.points == [{"lr": 2e-3, "embed_dim": 16}] and [v for _, v in warm.observed] == [0.91, 0.9]
    # the searcher: both earlier trials are in the study, and TPE's random start-up comes after them and after
    # the queued point (Optuna counts every completed trial towards n_startup_trials)
    search = searcher(c := validate(cfg, source="t.yaml"), warm)
    assert [t.value for t in search._ot_study.get_trials(states=[optuna.trial.TrialState.COMPLETE])] == [0.91, 0.9]
    assert search._ot_study.sampler._n_startup_trials == startup_trials(c.search.num_samples) + 2 + 1
    # a sampler that does not learn (random) gets the queued point only: the others are not even read
    rnd = {**cfg, "search": {**cfg["search"], "algorithm": "random"}}
    warm = load_warm(validate(rnd, source="t.yaml"), uri)
    assert warm.points == [{"lr": 2e-3, "embed_dim": 16}] and [v for _, v in warm.observed] == [0.91]
    narrow = {**cfg, "params": {**cfg["params"], "lr": {"type": "loguniform", "low": 1.5e-3, "high": 3e-3}}}
    warm = load_warm(validate(narrow, source="t.yaml"), uri)
    assert len(warm.points) == 1 and [v for _, v in warm.observed] == [0.91] and warm.note is None
    cfg["search"]["warm_start"]["experiment"] = "nope"
    with pytest.raises(UserError, match="no experiment 'nope'") as e:
        load_warm(validate(cfg, source="t.yaml"), uri)
    assert e.value.key == "search.warm_start.experiment"
    cfg["search"]["warm_start"]["experiment"] = "old"
    cfg["search"]["metric"] = "val_loss"
    with pytest.raises(UserError, match="no finished trial reporting val_loss"):
        load_warm(validate(cfg, source="t.yaml"), uri)
    cait = base_config(tmp_path, tmp_path / "d.h5", family="cait", search={"warm_start": {"experiment": "old"}},
                       params={"lr": {"type": "loguniform", "low": 1e-3, "high": 3e-3}})
    warm = load_warm(validate(cait, source="t.yaml"), uri)
    assert [v for _, v in warm.observed] == [0.97] and warm.points[0]["lr"] == 3e-3
    assert warm.note == "warm start from 'old' (1 trials): clipped lr into the new ranges"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pbt")
    path = write_e2e(tmp / "d.h5", n=48, size=16)
    return inspect(validate(base_config(tmp, path), source="t.yaml"))


def _trial(data, trial_id: str, **params) -> TrialConfig:
    return TrialConfig(family="vit", params={**VIT, **params}, data=data.to_dict(), max_epochs=3, metric="val_auc",
                       mode="max", metrics=["val_auc"], trial_id=trial_id)


def test_exploited_trial_trains_on_with_its_new_values(data, tmp_path):
    """PBT without Ray: trial b restores trial a's epoch-1 checkpoint with a new lr and weight decay. It goes on
    at epoch 2 with b's values (not the checkpoint's), says where its weights came from, and its own
    checkpoints carry its own id."""
    a = LocalSession(tmp_path / "a")
    train_trial(_trial(data, "aaaa", lr=1e-3, weight_decay=0.05).model_copy(update={"stop_epoch": 1}), a)
    donor = TrialCheckpoint.load(a.reports[0][1])
    assert donor.trial_id == "aaaa" and donor.source == "aaaa@1"
    assert donor.optimizer["param_groups"][0]["lr"] != 5e-3

    b_dir = tmp_path / "b"
    b_dir.mkdir()
    import shutil

    shutil.copytree(a.reports[0][1], b_dir / "epoch_0001")  # what Tune hands the receiver: the donor's checkpoint
    b = LocalSession(b_dir, resume=True)
    cfg_b = _trial(data, "bbbb", lr=5e-3, weight_decay=0.2)
    train_trial(cfg_b, b)
    first, _ = b.reports[0]
    assert [m["epoch"] for m, _ in b.reports] == [2, 3]
    assert first["pbt_source"] == "aaaa@1" and "pbt_source" not in b.reports[1][0]
    mine = TrialCheckpoint.load(b.reports[0][1])
    assert mine.trial_id == "bbbb" and mine.params["lr"] == 5e-3
    group = mine.optimizer["param_groups"][0]
    assert group["weight_decay"] == 0.2 and group["initial_lr"] == 5e-3
    # The reported lr follows b's base lr on the shared cosine schedule (the donor's was 1e-3).
    eng = Engine(cfg_b, LocalSession(tmp_path / "c"))
    eng.restore(donor)
    factor = eng.sched.lr_lambdas[0](eng.sched.last_epoch)
    assert math.isclose(eng.opt.param_groups[0]["lr"], 5e-3 * factor)
    assert eng.sched.get_last_lr()[0] == eng.opt.param_groups[0]["lr"]
    assert torch.equal(next(iter(eng.model.state_dict().values())), next(iter(donor.model.values())))


def test_trial_exploited_from_a_finished_donor_says_so(data, tmp_path):
    """PBT hands a trial the last checkpoint of a donor that has finished (its epoch is the last one): the trial
    trains nothing more, and its one report, the donor's final metrics, still names the source (once it did
    not, and the trial's MLflow run lost the donor's epochs)."""
    a = LocalSession(tmp_path / "a")
    train_trial(_trial(data, "aaaa"), a)
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    import shutil

    shutil.copytree(a.reports[-1][1], b_dir / "epoch_0003")
    b = LocalSession(b_dir, resume=True)
    train_trial(_trial(data, "bbbb", lr=5e-3), b)
    assert len(b.reports) == 1
    assert b.reports[0][0]["pbt_source"] == "aaaa@3" and b.reports[0][0]["epoch"] == 3
    own = LocalSession(tmp_path / "a", resume=True)  # its own last checkpoint (a restart after the end): no source
    train_trial(_trial(data, "aaaa"), own)
    assert len(own.reports) == 1 and "pbt_source" not in own.reports[0][0]


def _pbt_callback(tmp_path):
    """(MlflowClient, MlflowTrials) on a new SQLite store: a search run of 4 epochs whose PBT mutates ``lr``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("pbt", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"e2e.kind": "search"}).info.run_id
    cb = MlflowTrials(client, exp, parent, search_name="s", family="vit", metric="val_auc", mode="max",
                      max_epochs=4, mutable=("lr",))
    return client, cb


def test_mlflow_keeps_an_exploited_trials_whole_history(tmp_path):
    """The receiver's run: one run with every epoch, the epochs after the source epoch logged again with the
    new weights, the mutated values as pbt/<name> metrics per epoch and e2e.pbt.<name> tags, and the source."""
    from ray.tune.experiment import Trial

    client, cb = _pbt_callback(tmp_path)
    old, new = {"lr": 1e-3, "depth": 1}, {"lr": 1.2e-3, "depth": 2}
    trial = Trial("fn", config=dict(old), trial_id="bbbb0001", stub=True)
    for epoch in (1, 2):
        if epoch == 2:  # Tune calls PBT's on_trial_result before the callbacks: PBT sets the next config first
            trial.set_config(dict(new))  # donor aaaa's epoch-1 weights and depth, lr x 1.2
        # Ray puts the config the trainable ran with into each result
        cb.on_trial_result(0, [], trial, {"epoch": epoch, "val_auc": 0.5 + epoch / 100, "config": dict(old)})
    for epoch in (2, 3, 4):
        cb.on_trial_result(0, [], trial, {"epoch": epoch, "val_auc": 0.7 + epoch / 100, "config": dict(new),
                                          **({"pbt_source": "aaaa0001@1"} if epoch == 2 else {})})
    cb.on_trial_complete(0, [], trial)
    cb.drain()
    run = client.get_run(cb.runs["bbbb0001"])
    steps = [(m.step, round(m.value, 2)) for m in client.get_metric_history(run.info.run_id, "val_auc")]
    assert sorted(steps) == [(1, 0.51), (2, 0.52), (2, 0.72), (3, 0.73), (4, 0.74)]
    lrs = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "pbt/lr"))
    assert lrs == [(1, 1e-3), (2, 1e-3), (2, 1.2e-3), (3, 1.2e-3), (4, 1.2e-3)]
    tags = run.data.tags
    assert tags["e2e.pbt_source"] == "aaaa0001@1" and tags["e2e.pbt_sources"] == "aaaa0001@1>2"
    assert float(tags["e2e.pbt.lr"]) == 1.2e-3 and run.data.params["lr"] == "0.001"
    assert tags["e2e.pbt.depth"] == "2" and run.data.params["depth"] == "1"  # the donor's architecture
    assert run.data.metrics["epochs_run"] == 4 and run.data.metrics["best_val_auc"] == pytest.approx(0.74)


def test_a_trial_exploited_from_a_donor_ahead_of_it_gets_the_donors_epochs_in_between(tmp_path):
    """Asynchronous PBT: a trial after its epoch 2 takes a donor's epoch-3 weights and goes on at epoch 4. Its
    run gets the donor's epoch-3 metrics (those weights' past), so it has one value for each of epochs 1-4."""
    from ray.tune.experiment import Trial

    client, cb = _pbt_callback(tmp_path)
    donor = Trial("fn", config={"lr": 2e-3}, trial_id="aaaa0001", stub=True)
    trial = Trial("fn", config={"lr": 1e-3}, trial_id="bbbb0001", stub=True)
    for epoch in (1, 2, 3):
        cb.on_trial_result(0, [], donor, {"epoch": epoch, "val_auc": 0.8 + epoch / 100})
    for epoch in (1, 2):
        if epoch == 2:  # PBT decides on the epoch-2 result, before the callbacks see it
            trial.set_config({"lr": 2.4e-3})
        cb.on_trial_result(0, [], trial, {"epoch": epoch, "val_auc": 0.5 + epoch / 100, "config": {"lr": 1e-3}})
    cb.on_trial_result(0, [], trial, {"epoch": 4, "val_auc": 0.9, "pbt_source": "aaaa0001@3",
                                      "config": {"lr": 2.4e-3}})
    cb.on_trial_complete(0, [], trial)
    cb.on_trial_complete(0, [], donor)
    cb.drain()
    run = client.get_run(cb.runs["bbbb0001"])
    steps = sorted((m.step, round(m.value, 2)) for m in client.get_metric_history(run.info.run_id, "val_auc"))
    assert steps == [(1, 0.51), (2, 0.52), (3, 0.83), (4, 0.9)]
    lrs = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "pbt/lr"))
    assert lrs == [(1, 1e-3), (2, 1e-3), (3, 2e-3), (4, 2.4e-3)]
    assert run.data.tags["e2e.pbt_copied_epochs"] == "3-3 from aaaa0001"


def test_progress_counts_paused_trials_apart_from_those_to_go(capsys):
    """HyperBand and PBT pause part-trained trials: the progress line says so instead of counting them 'to go'."""
    from ray.tune.experiment import Trial

    from e2e_search.search.progress import Progress

    trials = [Trial("fn", config={}, trial_id=f"t{i}", stub=True) for i in range(3)]
    for t, status in zip(trials, ("RUNNING", "PAUSED", "TERMINATED")):
        t.set_status(status)
    Progress(metric="val_auc", mode="max", num_samples=4, max_epochs=4)._line(trials, "t0 epoch 1")
    assert "1 running, 1 paused, 1 done, 0 failed, 1 to go" in capsys.readouterr().out
    trials[1].set_status("RUNNING")
    Progress(metric="val_auc", mode="max", num_samples=4, max_epochs=4)._line(trials, "t1 epoch 2")
    assert "2 running, 1 done, 0 failed, 1 to go" in capsys.readouterr().out


def test_hyperband_stops_a_paused_trial_when_its_bracket_ends_by_a_completion():
    """A bracket of 2 trials, 2 epochs: A reaches the last rung first and is paused to wait for B; B's last
    epoch reaches Tune as its completion (no result first). Ray's HyperBandScheduler left A PAUSED (the
    search hung); ours stops it. The controller here does what Tune's ``stop_trial`` does for a paused trial
    (tells the scheduler, marks it TERMINATED): a race that a real search hits only now and then."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from e2e_search.search.hyperband import HyperBand

    class Controller:
        def __init__(self, sched):
            self.sched, self.stopped = sched, []

        def stop_trial(self, trial):
            if trial.status == Trial.PAUSED:
                self.sched.on_trial_remove(self, trial)
                trial.set_status(Trial.TERMINATED)
                self.stopped.append(trial.trial_id)

    sched = HyperBand(time_attr="epoch", metric="val_auc", mode="max", max_t=2, reduction_factor=2)
    ctl = Controller(sched)
    a, b = (Trial("fn", config={}, trial_id=t, stub=True) for t in ("A", "B"))
    for t in (a, b):
        sched.on_trial_add(ctl, t)
        t.set_status(Trial.RUNNING)
    for t in (a, b):
        assert sched.on_trial_result(ctl, t, {"epoch": 1, "val_auc": 0.8}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(ctl, a, {"epoch": 2, "val_auc": 0.9}) == TrialScheduler.PAUSE
    a.set_status(Trial.PAUSED)
    b.set_status(Trial.TERMINATED)
    sched.on_trial_complete(ctl, b, {"epoch": 2, "val_auc": 0.85})
    assert ctl.stopped == ["A"] and a.status == Trial.TERMINATED
    assert sched.choose_trial_to_run(ctl) is None
