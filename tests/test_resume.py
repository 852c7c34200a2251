"""Interrupted searches: the driver SIGKILLed mid-search, then ``e2e-search resume`` (real Ray, Optuna, MLflow)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from e2e_search.cli import main
from tests.conftest import base_config, write_e2e, write_yaml

REPO = Path(__file__).resolve().parent.parent


def trial_runs(client: MlflowClient, experiment: str) -> tuple[list, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return ([r for r in runs if r.data.tags.get("e2e.kind") == "search"],
            [r for r in runs if r.data.tags.get("e2e.kind") == "trial"])


def start_search(yml: Path, cwd: Path, address: str, log: Path, *extra: str) -> subprocess.Popen:
    """``e2e-search run`` as its own process (the driver), joined to the test's Ray."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    # SIGINT as in a terminal: a shell without job control starts background jobs (here: a test suite run with
    # `&`) with SIGINT ignored, and their children inherit that, so a Ctrl-C test would send a signal nobody hears.
    return subprocess.Popen([sys.executable, "-m", "e2e_search.cli", "run", str(yml), "--address", address, *extra],
                            cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(cond, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None,
             poll: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the search ended before the kill point:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout}s:\n{log.read_text()[-3000:] if log else ''}")


def kill_driver_when(tmp_path: Path, cfg: dict, ready, address: str, poll: float = 0.5, sig=signal.SIGKILL):
    """Start ``e2e-search run`` of ``cfg`` as its own driver, send it ``sig`` (SIGKILL) once ``ready(trial_runs)``
    returns something true, and return (that value, the MLflow client). Ray then frees the dead driver's workers."""
    yml = write_yaml(tmp_path / "s.yaml", cfg)
    log = tmp_path / "driver.log"
    driver = start_search(yml, tmp_path, address, log)
    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])

    def cond():
        try:
            _, trials = trial_runs(client, cfg["name"])
        except Exception:  # noqa: BLE001 - the store or experiment is not there yet
            return None
        return ready(trials)

    got = wait_for(cond, 600, driver, log, poll=poll)
    os.kill(driver.pid, sig)
    code = driver.wait(timeout=120)
    if sig in (signal.SIGINT, signal.SIGTERM):
        assert code == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], log.read_text()[-3000:]
    time.sleep(3)  # Ray notices the dead driver and frees its trials' workers
    return got, client


def test_sigkill_driver_then_resume(tmp_path, ray_local):
    """Kill -9 the driver once one trial has finished and another is mid-way (epoch 1 of 2); ``resume`` ends the search with
    exactly num_samples trials, each finished once, one MLflow run per trial and none left RUNNING."""
    # Enough jets that an epoch lasts about a second: on an idle machine 48 jets made a trial's 2 epochs shorter
    # than the poll, and the search could end before a trial was ever seen mid-way.
    data = write_e2e(tmp_path / "jets.h5", n=1200)
    optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"  # the study outlives the driver (search.optuna_storage)
    cfg = base_config(tmp_path, data, name="killed", search={"num_samples": 3, "seed": 3, "max_concurrent": 1,
                                                             "optuna_storage": optuna_url},
                      scheduler={"type": "none", "max_epochs": 2})
    uri = cfg["tracking"]["uri"]
    address = ray_local.get_runtime_context().gcs_address

    def mid_search(trials):
        done = [r for r in trials if r.data.tags.get("e2e.status") == "FINISHED"]
        running = [r for r in trials if r.data.tags.get("e2e.status") == "RUNNING" and "val_auc" in r.data.metrics]
        return (done, running) if done and running else None

    (done, running), client = kill_driver_when(tmp_path, cfg, mid_search, address, poll=0.2)
    interrupted = running[0].data.tags["e2e.trial_id"]
    # Tune saves its experiment state every few seconds: a driver killed before the interrupted trial was in it
    # leaves a trial that resume cannot continue (it runs again under a new id, its old run deleted).
    entry = '\\"trial_id\\": \\"' + interrupted  # a trial's entry (JSON text inside the state's JSON)
    known = any(entry in f.read_text() for f in (tmp_path / "ray").rglob("experiment_state-*.json"))

    assert main(["resume", "killed", "--tracking-uri", uri, "--address", address]) == 0
    parents, trials = trial_runs(client, "killed")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["e2e.resumed"] == "1"
    assert len(trials) == 3, [r.data.tags.get("e2e.trial_id") for r in trials]
    assert len({r.data.tags["e2e.trial_id"] for r in trials}) == 3
    assert all(r.info.status == "FINISHED" and r.data.tags["e2e.status"] == "FINISHED" for r in trials)
    for r in trials:  # every trial ran its 2 epochs once: MLflow steps are absolute epochs
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_auc")]
        assert set(steps) == {1, 2}, (r.data.tags["e2e.trial_id"], steps)
        assert r.data.metrics["epochs_run"] == 2
        assert "best_checkpoint/checkpoint.pt" in {a.path for a in client.list_artifacts(r.info.run_id,
                                                                                        "best_checkpoint")}
    # The finished trial kept its run; the interrupted one continued in its own run (no duplicate).
    by_tid = {r.data.tags["e2e.trial_id"]: r for r in trials}
    assert by_tid[done[0].data.tags["e2e.trial_id"]].info.run_id == done[0].info.run_id
    if known:
        assert by_tid[interrupted].info.run_id == running[0].info.run_id
    else:
        assert interrupted not in by_tid
        assert client.get_run(running[0].info.run_id).info.lifecycle_stage == "deleted"
    assert parent.data.tags["e2e.best_run_id"] in {r.info.run_id for r in trials}
    # One Optuna study for the search, killed and resumed: the same study continued, not a second one
    import optuna

    assert optuna.get_all_study_names(optuna_url) == [parent.data.tags["mlflow.runName"]]
    study = optuna.load_study(study_name=parent.data.tags["mlflow.runName"], storage=optuna_url)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3


def test_resume_refuses_a_finished_search(tmp_path, monkeypatch, capsys, ray_local):
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "jets.h5", n=32)
    cfg = base_config(tmp_path, data, name="whole", search={"num_samples": 1},
                      scheduler={"type": "none", "max_epochs": 1})
    assert main(["run", str(write_yaml(tmp_path / "s.yaml", cfg))]) == 0
    capsys.readouterr()
    assert main(["resume", "whole", "--tracking-uri", cfg["tracking"]["uri"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished; nothing to resume" in err[0]
    assert main(["resume", "nope", "--tracking-uri", cfg["tracking"]["uri"]]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_run_resume_starts_a_search_when_there_is_none(tmp_path, monkeypatch, capsys, ray_local):
    """``run --resume`` continues the latest unfinished search, or (as here, nothing recorded yet) starts one."""
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "jets.h5", n=32)
    cfg = base_config(tmp_path, data, name="fresh", search={"num_samples": 1},
                      scheduler={"type": "none", "max_epochs": 1})
    assert main(["run", str(write_yaml(tmp_path / "s.yaml", cfg)), "--resume"]) == 0
    assert "nothing to resume (no experiment 'fresh'" in capsys.readouterr().err
    parents, trials = trial_runs(MlflowClient(tracking_uri=cfg["tracking"]["uri"]), "fresh")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(trials) == 1


@pytest.mark.slow  # ~2 min; tests/test_tracking.py::test_a_trial_restarted_after_its_last_epoch_logs_each_epoch_once
def test_driver_killed_after_a_trials_last_epoch_then_resumed_logs_each_epoch_once(tmp_path, capsys, ray_local):
    """Issue 13 case 8: the driver SIGKILLed between a trial's last epoch report and its end; the resumed
    trial (restored from that epoch's checkpoint) reports the epoch again. Each metric has one row per step.
    (Covered without Ray, in seconds, by tests/test_tracking.py's restarted-trial test.)"""
    data = write_e2e(tmp_path / "jets.h5", n=32)
    cfg = base_config(tmp_path, data, name="lastepoch", search={"num_samples": 1},
                      scheduler={"type": "none", "max_epochs": 1})
    uri = cfg["tracking"]["uri"]
    address = ray_local.get_runtime_context().gcs_address

    def last_epoch_logged(trials):
        return trials if trials and "val_auc" in trials[0].data.metrics else None

    _, client = kill_driver_when(tmp_path, cfg, last_epoch_logged, address, poll=0.1)

    capsys.readouterr()
    assert main(["resume", "lastepoch", "--tracking-uri", uri, "--address", address]) == 0
    print(capsys.readouterr().out)  # shows whether Tune re-ran the trial (it does when killed before its save)
    parents, trials = trial_runs(client, "lastepoch")
    assert [r.info.status for r in parents + trials] == ["FINISHED", "FINISHED"]
    rid = trials[0].info.run_id
    for key in trials[0].data.metrics:
        steps = [m.step for m in client.get_metric_history(rid, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert [m.step for m in client.get_metric_history(rid, "val_auc")] == [1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_ctrl_c_exits_130_and_the_search_resumes(tmp_path, ray_local, sig):
    """Issue 30, kind 6: SIGINT while the second of three trials runs used to exit 0 with "search done ... 0
    failed", a FINISHED parent, a champion, the running trial tagged stopped early and nothing to resume."""
    # 32x32 jets (64 patches): each epoch lasts seconds, so the poll sees the second trial running on any machine
    data = write_e2e(tmp_path / "jets.h5", n=3000, size=32)
    cfg = base_config(tmp_path, data, name="ctrlc", search={"num_samples": 3, "seed": 3, "max_concurrent": 1},
                      scheduler={"type": "none", "max_epochs": 2})
    uri = cfg["tracking"]["uri"]
    address = ray_local.get_runtime_context().gcs_address

    def second_running(trials):  # the second trial, not the last: a signal as the search ends would come too late
        done = [r for r in trials if r.data.tags.get("e2e.status") == "FINISHED"]
        running = [r for r in trials if r.data.tags.get("e2e.status") == "RUNNING"]
        return (done, running) if len(done) == 1 and running else None

    (done, running), client = kill_driver_when(tmp_path, cfg, second_running, address, poll=0.2, sig=sig)
    parents, trials = trial_runs(client, "ctrlc")
    parent = parents[0]
    said = parent.data.tags["e2e.interrupted"]  # where it stopped
    assert parent.info.status == "KILLED" and said.startswith("SIGINT" if sig == signal.SIGINT else "SIGTERM")
    assert re.search(r": [12] of 3 trials ended, [01] interrupted$", said), said
    assert client.search_registered_models() == []  # no champion from half a search
    interrupted = [r for r in trials if r.data.tags.get("e2e.status") == "RUNNING"]
    assert interrupted and all(r.info.status == "KILLED" and "e2e.stopped_early" not in r.data.tags
                               for r in interrupted)

    assert main(["resume", "ctrlc", "--tracking-uri", uri, "--address", address]) == 0
    parents, trials = trial_runs(client, "ctrlc")
    assert parents[0].info.status == "FINISHED" and "e2e.interrupted" not in parents[0].data.tags
    assert len(trials) == 3 and all(r.data.tags["e2e.status"] == "FINISHED" and r.info.status == "FINISHED"
                                    for r in trials)
    assert [m.name for m in client.search_registered_models()] == ["ctrlc-classifier"]
