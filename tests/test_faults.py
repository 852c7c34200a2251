"""Faults inside a search: trials that raise or go NaN fail alone with their reason in MLflow; the process
training a trial, killed mid-trial, is replaced and the trial resumes from its checkpoint (real Ray, MLflow)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from e2e_search.cli import main
from tests.conftest import base_config, write_e2e, write_yaml
from tests.test_resume import trial_runs


def test_raising_and_nan_trials_fail_alone(tmp_path, monkeypatch, ray_local):
    """lr 1e30 turns the loss NaN at the second step; lr 1e38 overflows inside AdamW (an exception). With one
    retry allowed, the exception is retried from the checkpoint (and fails again); the NaN trial is not re-run."""
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "jets.h5", n=40)
    cfg = base_config(tmp_path, data, name="faults", search={"num_samples": 3},
                      scheduler={"type": "none", "max_epochs": 2}, resources={"max_failures": 1})
    cfg["params"]["lr"] = {"type": "grid", "values": [1e-3, 1e30, 1e38]}
    cfg["params"]["embed_dim"] = 16
    assert main(["run", str(write_yaml(tmp_path / "s.yaml", cfg))]) == 0
    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    parents, trials = trial_runs(client, "faults")
    by_lr = {float(r.data.params["lr"]): r for r in trials}
    assert set(by_lr) == {1e-3, 1e30, 1e38}
    ok, nan, boom = by_lr[1e-3], by_lr[1e30], by_lr[1e38]
    assert ok.info.status == "FINISHED" and ok.data.metrics["epochs_run"] == 2
    assert nan.info.status == "FAILED" and nan.data.tags["e2e.status"] == "FAILED"
    # retried once (max_failures 1): the retry found the NaN record and stopped at once
    assert "NonFiniteLoss: non-finite" in nan.data.tags["e2e.error"] and "(not retried)" in nan.data.tags["e2e.error"]
    assert "epochs_run" not in nan.data.metrics or nan.data.metrics["epochs_run"] == 0  # stopped in epoch 1
    assert boom.info.status == "FAILED" and "overflow" in boom.data.tags["e2e.error"]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["e2e.trials_failed"] == "2"
    assert parents[0].data.tags["e2e.best_run_id"] == ok.info.run_id


def _pids(title: bytes) -> list[int]:
    """Pids of this test's processes (descendants of this one: the Ray it started) whose command line holds
    ``title`` (Ray sets ``ray::<actor class>``); another search on the same machine is never touched."""
    import psutil

    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if title in (Path("/proc") / str(proc.pid) / "cmdline").read_bytes():
                pids.append(proc.pid)
        except OSError:
            pass
    return pids


# What trains a one-worker trial: its Tune trial process (runner auto: Tune's function trainable, ImplicitFunc)
# or a Ray Train worker (runner ray_train).
TRAINING_PROCESS = {"auto": b"ray::ImplicitFunc", "ray_train": b"RayTrainWorker"}


@pytest.mark.parametrize("runner", ["auto", pytest.param("ray_train", marks=pytest.mark.slow)])
def test_killed_worker_is_replaced_and_the_trial_resumes(tmp_path, monkeypatch, ray_local, runner):
    """SIGKILL the process training the trial after its first checkpoint: with resources.max_failures 1 Tune
    (runner auto: the trial trains in its Tune process) or Ray Train (runner ray_train: its worker group)
    restarts it from the latest checkpoint and the trial finishes with every epoch once."""
    monkeypatch.chdir(tmp_path)
    data = write_e2e(tmp_path / "jets.h5", n=40)
    cfg = base_config(tmp_path, data, name="killworker", search={"num_samples": 1},
                      scheduler={"type": "none", "max_epochs": 4}, resources={"max_failures": 1, "runner": runner})
    uri = cfg["tracking"]["uri"]
    killed: list[int] = []

    def killer():
        client = MlflowClient(tracking_uri=uri)
        t0 = time.time()
        while time.time() - t0 < 300:
            try:
                _, trials = trial_runs(client, "killworker")
                hist = client.get_metric_history(trials[0].info.run_id, "val_auc") if trials else []
            except Exception:  # noqa: BLE001 - the store or experiment is not there yet: poll again
                hist = []
            if hist:  # epoch 1 reported, its checkpoint saved
                for pid in _pids(TRAINING_PROCESS[runner]):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    assert main(["run", str(write_yaml(tmp_path / "s.yaml", cfg))]) == 0
    t.join(timeout=10)
    assert killed, f"no {TRAINING_PROCESS[runner].decode()} process was found to kill"
    client = MlflowClient(tracking_uri=uri)
    _, trials = trial_runs(client, "killworker")
    assert len(trials) == 1
    run = trials[0]
    assert run.info.status == "FINISHED" and run.data.tags["e2e.status"] == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")]
    assert set(steps) == {1, 2, 3, 4}, steps
    assert len(steps) <= 5  # resumed from a checkpoint: at most the interrupted epoch ran twice
    assert run.data.metrics["epochs_run"] == 4


def test_a_trial_slow_to_end_does_not_fail_the_next_trial_of_its_process(tmp_path, ray_local):
    """Ray fails the next trial of a reused process when the previous trial's thread is still alive 2 s after
    its last report ("Could not re-use actor"); compare_families hit it on 2 loaded cores. A trial that calls
    what ``trial._run`` calls first lets Ray wait for it."""
    import os
    import time

    from ray import tune

    from trainables.trial import wait_for_slow_trial_ends

    def trainable(config):
        wait_for_slow_trial_ends()
        try:
            tune.report({"x": config["x"], "pid": os.getpid()})  # the last epoch: Tune stops the trial here
        finally:
            time.sleep(3.5)  # what trial._in_this_process does then (gc, freeing the model): Tune waits for it

    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space={"x": tune.grid_search([1, 2, 3])},
                       tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="reuse", verbose=0,
                                                 stop={"training_iteration": 1}))
    results = tuner.fit()
    assert results.num_errors == 0, [r.error for r in results]
    assert len({r.metrics["pid"] for r in results}) == 1         # one process ran all three trials
