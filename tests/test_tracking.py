"""MLflow records without Ray: names built from data, a trial whose record fails, a resumed trial's epochs.

Real MLflow (SQLite in tmp_path), real Tune ``Trial`` objects (stubs need no Ray), the callback's hooks called
as Tune calls them.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import _validate_metric_name, _validate_param_name, _validate_tag_name
from ray.tune.experiment import Trial

from e2e_search.record.trials import MlflowTrials
from trainables.metrics import regression_metrics
from trainables.names import KEY_MAX, edge_labels, mlflow_key, number, unique_keys

PORTABLE = re.compile(r"^[/\w.\- ]*$")  # MLflow's rule on Windows (no ':'): valid on every platform


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One real SQLite store for the module (creating one costs seconds); each test makes its own experiment."""
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}")


def assert_valid_key(name: str) -> None:
    assert PORTABLE.match(name), name
    assert len(name) <= KEY_MAX, (len(name), name)
    _validate_metric_name(name)
    _validate_param_name(name)
    _validate_tag_name(name)


# --------------------------------------------------------------------------- the sanitizer
RANGES = [(1e3, 2.1e5), (-2.1e5, -1e3), (-1.0, 1.0), (-5e-5, 3e6), (1e-5, 2e-5), (1e6, 1e7), (0.0, 1e-12),
          (1000.0001, 1000.0002), (-1e300, 1e300), (1e-300, 2e-300), (50.0, 200.0), (-0.5, 0.0), (7.0, 7.0 + 1e-9)]


def test_per_bin_metric_names_are_valid_and_distinct_for_any_range(client):
    """Case 1 of issue 13: `val_bin/1000-4.692e+04/mae` killed a search. Every range and sign gives valid,
    distinct names, and MLflow (a real store) takes them."""
    exp = client.create_experiment("bins")
    for lo, hi in RANGES:
        true = np.linspace(lo, hi, 40)
        pred = true + (hi - lo) * 0.01
        m = regression_metrics(pred, true, bins=4)
        binned = [k for k in m if k.startswith("val_bin/")]
        assert len(binned) == 4 * 3, (lo, hi, binned)  # 4 bins x (mae, bias, resolution): no two share a name
        for k in m:
            assert_valid_key(k)
        rid = client.create_run(exp).info.run_id
        client.log_batch(rid, metrics=[Metric(k, v, 0, 1) for k, v in m.items()])
        assert set(client.get_run(rid).data.metrics) == set(m), (lo, hi)


def test_bin_names_read_as_numbers():
    assert number(46920.1) == "4.692e4" and number(1.2e-5) == "1.2e-5" and number(-0.5) == "-0.5"
    assert number(1e300) == "1e300" and number(50) == "50"
    m = regression_metrics(np.array([1e3, 2.1e5]), np.array([1e3, 2.1e5]), bins=4)
    assert "val_bin/1000-5.325e4/mae" in m and "val_bin/1.578e5-2.1e5/mae" in m  # was 5.325e+04: refused
    assert edge_labels([1000.0001, 1000.00015, 1000.0002]) == ["1000.0001", "1000.00015", "1000.0002"]
    m = regression_metrics(np.array([-200.0, -100.0]), np.array([-200.0, -100.0]), bins=2)
    assert "val_bin/-200--150/bias" in m and "val_bin/-150--100/bias" in m


@pytest.mark.parametrize("raw", ["val_bin/1000-4.692e+04/mae", "a+b", "x//y", "/lead", "trail/", "./a", "a/../b",
                                 "..", ".", "", "..hidden", "é/ü", "a:b", "(1,2)=3", "tab\there", "x" * 300,
                                 "y/" * 200, "a/./b/.", "new\nline", "val_bin/-1--0.5/mae"])
def test_mlflow_key_makes_any_name_valid(raw):
    key = mlflow_key(raw)
    assert_valid_key(key)
    assert mlflow_key(key) == key  # stable: a resumed search finds the same names


def test_valid_names_are_unchanged_and_cleaned_ones_stay_distinct():
    for name in ["val_auc", "val_bin/50-100/mae", "best_val_bin/-1e-5-2e-5/bias", "startup_s", "a b/c-d.e_f"]:
        assert mlflow_key(name) == name
    assert mlflow_key("x" * 300) != mlflow_key("x" * 299 + "y")  # cut names keep a hash of the whole name
    keys = unique_keys({"a+b": 1, "a_b": 2, "a(b": 3})
    assert list(keys) == ["a_b", "a_b_2", "a_b_3"] and list(keys.values()) == [1, 2, 3]


# --------------------------------------------------------------------------- the callback, without Ray
def _callback(client, tmp_path, name=None, artifacts=None):
    name = name or tmp_path.name
    exp = client.create_experiment(name, artifact_location=(artifacts or tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"e2e.kind": "search"}).info.run_id
    cb = MlflowTrials(client, exp, parent, search_name=name, family="vit", metric="val_mae", mode="min", max_epochs=2)
    return cb


def _trial(**config) -> Trial:
    return Trial("run_trial", config={"family": "vit", "lr": 0.01, **config}, stub=True)


def _checkpoint(folder) -> None:
    """A readable checkpoint.pt in ``folder``, as a trial writes it: a run keeps only a best checkpoint that loads
    (issue 30, kind 7)."""
    from tests.test_export import IMAGE, VIT, make_checkpoint

    make_checkpoint(folder, "vit", VIT, IMAGE)


def _result(trial, epoch, **metrics):
    return {"epoch": epoch, "trial_id": trial.trial_id, "val_mae": 1.0 / epoch, "val_loss": 2.0 / epoch, **metrics}


def test_names_from_data_reach_mlflow_cleaned(client, tmp_path):
    """Metric, param and tag names and values built from data (a target in MeV, a parameter name with
    odd characters, a 7000-character value) are all logged, cleaned, and the run ends FINISHED."""
    cb = _callback(client, tmp_path)
    t = _trial(**{"w+x": "v" * 7000})
    cb.on_trial_start(iteration=0, trials=[t], trial=t)
    cb.on_trial_result(iteration=1, trials=[t], trial=t,
                       result=_result(t, 1, **{"val_bin/1000-4.692e+04/mae": 3.0, "odd(name)": 1.0}))
    cb.on_trial_complete(iteration=2, trials=[t], trial=t)
    cb.drain()  # runs are closed on the callback's closing thread
    run = client.get_run(cb.runs[t.trial_id])
    assert run.info.status == "FINISHED" and run.data.tags["e2e.status"] == "FINISHED"
    assert {"val_bin/1000-4.692e_04/mae", "odd_name_", "best_val_bin/1000-4.692e_04/mae",
            "final_odd_name_"} <= set(run.data.metrics)
    assert run.data.params["w_x"] == "v" * 6000
    assert cb.status == {t.trial_id: "FINISHED"} and not cb.broken


def test_a_trial_whose_record_fails_is_closed_failed_and_the_search_goes_on(client, tmp_path, capsys):
    """Any store error in one trial's hooks (here: its artifact folder cannot be created, then its run is deleted
    in the UI mid-search) closes that trial's run FAILED with e2e.error, asks Tune to stop it, and raises
    nothing; the next trial is recorded normally."""
    art = tmp_path / "art"
    cb = _callback(client, tmp_path, artifacts=art)
    art.write_text("a file where the artifact folder should be")  # the trial's config.yaml cannot be written
    bad, good, gone = _trial(), _trial(), _trial()
    cb.on_trial_start(iteration=0, trials=[bad], trial=bad)  # no exception
    cb.on_trial_result(iteration=1, trials=[bad], trial=bad, result=_result(bad, 1))
    cb.on_trial_complete(iteration=2, trials=[bad], trial=bad)
    cb.drain()  # runs are closed on the callback's closing thread
    run = client.get_run(cb.runs[bad.trial_id])
    assert run.info.status == "FAILED" and run.data.tags["e2e.status"] == "FAILED"
    assert run.data.tags["e2e.error"].startswith("MLflow tracking failed: ")
    assert "val_mae" not in run.data.metrics  # nothing logged after the failure
    assert cb.status[bad.trial_id] == "FAILED"
    assert cb.status.get(good.trial_id) != "FAILED"
    assert f"trial {bad.trial_id}: MLflow tracking failed" in capsys.readouterr().err

    art.unlink()
    cb.on_trial_start(iteration=3, trials=[good], trial=good)
    cb.on_trial_start(iteration=3, trials=[gone], trial=gone)
    client.delete_run(cb.runs[gone.trial_id])  # deleted in the MLflow UI while it trains
    for ep in (1, 2):
        cb.on_trial_result(iteration=4, trials=[good, gone], trial=good, result=_result(good, ep))
        cb.on_trial_result(iteration=4, trials=[good, gone], trial=gone, result=_result(gone, ep))
    cb.on_trial_complete(iteration=5, trials=[good], trial=good)
    cb.on_trial_complete(iteration=5, trials=[gone], trial=gone)
    cb.drain()  # runs are closed on the callback's closing thread
    assert client.get_run(cb.runs[good.trial_id]).info.status == "FINISHED"
    assert cb.status == {bad.trial_id: "FAILED", good.trial_id: "FINISHED", gone.trial_id: "FAILED"}
    assert cb.best_trial()[0] == good.trial_id


def test_a_trial_restarted_after_its_last_epoch_logs_each_epoch_once(client, tmp_path):
    """Issue 13 case 8, the callback's half: the driver was killed after the trial's last epoch reached MLflow;
    on resume the trial (restored from its epoch-2 checkpoint) reports epoch 2 again, then ends."""
    cb = _callback(client, tmp_path)
    t = _trial()
    cb.on_trial_start(iteration=0, trials=[t], trial=t)
    for ep in (1, 2):
        cb.on_trial_result(iteration=ep, trials=[t], trial=t, result=_result(t, ep))
    rid = cb.runs[t.trial_id]
    trial_dir = tmp_path / "train" / f"trial_{t.trial_id}"
    for ep in (1, 2):  # what each epoch's checkpoint holds beside it
        (trial_dir / f"epoch_{ep:04d}").mkdir(parents=True)
        (trial_dir / f"epoch_{ep:04d}" / "metrics.json").write_text(json.dumps(_result(t, ep)))
        _checkpoint(trial_dir / f"epoch_{ep:04d}")

    # the new driver: a fresh callback takes the run over, then Tune re-runs the trial
    resumed = MlflowTrials(client, cb.experiment_id, cb.parent, search_name=cb.search_name, family="vit",
                           metric="val_mae", mode="min", max_epochs=2)
    assert resumed.rehydrate(str(tmp_path)) == {"finished": 0, "failed": 0, "interrupted": 1}
    resumed.on_trial_start(iteration=0, trials=[t], trial=t)
    resumed.on_trial_result(iteration=1, trials=[t], trial=t, result=_result(t, 2))
    resumed.on_trial_complete(iteration=2, trials=[t], trial=t)
    resumed.drain()  # runs are closed on the callback's closing thread
    for key in ("val_mae", "val_loss"):
        assert [m.step for m in client.get_metric_history(rid, key)] == [1, 2], key
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.metrics["best_val_mae"] == 0.5
    assert resumed.history[t.trial_id]["val_mae"] == [(1, 1.0), (2, 0.5)]

    # killed again after the close but before Tune saved it: the finished run is left alone
    again = MlflowTrials(client, cb.experiment_id, cb.parent, search_name=cb.search_name, family="vit",
                         metric="val_mae", mode="min", max_epochs=2)
    assert again.rehydrate(str(tmp_path))["finished"] == 1
    again.on_trial_result(iteration=1, trials=[t], trial=t, result=_result(t, 2))
    again.on_trial_complete(iteration=2, trials=[t], trial=t)
    again.drain()  # runs are closed on the callback's closing thread
    assert [m.step for m in client.get_metric_history(rid, "val_mae")] == [1, 2]
    assert [m.step for m in client.get_metric_history(rid, "best_val_mae")] == [2]


def test_store_refuses_what_the_sanitizer_prevents(client):
    """The failure the sanitizer prevents is real: MLflow refuses the raw per-bin name."""
    rid = client.create_run(client.create_experiment("raw")).info.run_id
    with pytest.raises(MlflowException, match="Invalid value"):
        client.log_batch(rid, metrics=[Metric("val_bin/1000-4.692e+04/mae", 1.0, 0, 1)])
    client.log_batch(rid, metrics=[Metric(mlflow_key("val_bin/1000-4.692e+04/mae"), 1.0, 0, 1)],
                     params=[Param(mlflow_key("a+b"), "1")], tags=[RunTag(mlflow_key("c=d"), "2")])


def test_a_failure_at_the_end_of_a_search_closes_its_run_failed(client, tmp_path):
    """Case 13: registering `tt/W+jets-classifier` failed after every trial had trained and left the search's
    run RUNNING. (plan() now refuses that name; here the end of the search is run on it directly.) The run is
    closed FAILED with the reason, and the caller gets the reason instead of a traceback."""
    from e2e_search.record.search_run import finish_search_run
    from e2e_search.spec.loader import validate
    from tests.conftest import base_config

    cfg = validate(base_config(tmp_path, tmp_path / "jets.h5", tracking={"experiment": "tt/W+jets"}), source="t")
    cb = _callback(client, tmp_path, name="tt/W+jets")
    cb.metric, cb.mode = "val_auc", "max"
    t = _trial()
    cb.on_trial_start(iteration=0, trials=[t], trial=t)
    cb.on_trial_result(iteration=1, trials=[t], trial=t, result=_result(t, 1, val_auc=0.8))
    cb.on_trial_complete(iteration=2, trials=[t], trial=t)
    cb.drain()  # runs are closed on the callback's closing thread
    end = finish_search_run(client, cb.parent, cb, cfg, "tt-search", "FINISHED", None)
    parent = client.get_run(cb.parent)
    assert parent.info.status == "FAILED"
    assert "Names cannot contain '/'" in end["end_error"] and parent.data.tags["e2e.error"] == end["end_error"]
    assert end["best_rid"] == cb.runs[t.trial_id] and parent.data.tags["e2e.best_run_id"] == end["best_rid"]
    assert client.get_run(cb.runs[t.trial_id]).info.status == "FINISHED"  # the trial's record stands


def test_a_store_being_migrated_by_another_process_is_waited_for(tmp_path):
    """A store whose schema moves to the current revision while it is checked (another process is creating it:
    MLflow creates a store by migrating it from its first revision) is accepted; one that stays old is refused."""
    import sqlite3
    import threading
    import time

    from mlflow.store.db.utils import _get_latest_schema_revision

    from e2e_search.record.store import check_store
    from trainables.errors import UserError

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates the store at the current schema
    head = _get_latest_schema_revision()
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'df50e92ffc5e'")

    def finish_migration():
        time.sleep(1.0)
        with sqlite3.connect(db) as con:
            con.execute("UPDATE alembic_version SET version_num = ?", (head,))

    t = threading.Thread(target=finish_migration)
    t.start()
    check_store(uri, "tracking.uri", "e2e")  # waits for the migration instead of refusing the store
    t.join()

    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'df50e92ffc5e'")
    with pytest.raises(UserError, match="older schema"):
        check_store(uri, "tracking.uri", "e2e")


def test_a_run_whose_closing_the_killed_driver_never_finished_is_closed_on_resume(client, tmp_path):
    """Runs close on a background thread (checkpoint and plots uploaded, then the run ended); a driver killed
    in between leaves the run RUNNING with its status tag: the resumed search uploads and closes it."""
    cb = _callback(client, tmp_path)
    t = _trial()
    folder = tmp_path / f"trial_{t.trial_id}" / "checkpoint_000000"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(_result(t, 1)))
    _checkpoint(folder)
    cb.on_trial_start(iteration=0, trials=[t], trial=t)
    cb.on_trial_result(iteration=1, trials=[t], trial=t, result=_result(t, 1, checkpoint_path=str(folder)))
    busy = threading.Event()
    cb.closer._pool.submit(busy.wait)  # the closing thread is busy with another run when the driver dies
    cb.on_trial_complete(iteration=2, trials=[t], trial=t)
    rid = cb.runs[t.trial_id]
    run = client.get_run(rid)
    assert run.info.status == "RUNNING" and run.data.tags["e2e.closing"] == str(folder)
    assert all(f.cancel() for f in cb.closer._pending)  # the driver is gone: its queued closing never runs
    busy.set()

    resumed = MlflowTrials(client, cb.experiment_id, cb.parent, search_name=cb.search_name, family="vit",
                           metric="val_mae", mode="min", max_epochs=2)
    assert resumed.rehydrate(str(tmp_path))["finished"] == 1
    resumed.drain()
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["e2e.checkpoint"] == str(folder)
    assert "best_checkpoint/metrics.json" in [a.path for a in client.list_artifacts(rid, "best_checkpoint")]


def test_a_missing_experiment_is_refused_with_the_searches_there(tmp_path):
    """The one-line refusal lists the store's experiments and suggests the closest, but not MLflow's own empty
    "Default" experiment (no search of ours is in it)."""
    from e2e_search.record.store import experiment_of
    from trainables.errors import UserError

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("quickstart", artifact_location=(tmp_path / "art").as_uri())
    with pytest.raises(UserError) as e:
        experiment_of(client, "quickstrat", key="search.warm_start.experiment")
    assert "(did you mean 'quickstart'?)" in e.value.message
    client.create_experiment("vit_pareto", artifact_location=(tmp_path / "art2").as_uri())
    with pytest.raises(UserError) as e:
        experiment_of(client, "no-such-search", key="search.warm_start.experiment")
    assert "(valid: quickstart, vit_pareto)" in e.value.message, e.value.message


def test_a_working_folder_named_with_percent_and_hash_keeps_its_store(tmp_path, monkeypatch):
    """Issue 30, kind 8: MLflow decodes %-escapes in a SQLite path, so the default store URL is written quoted: a
    search in a folder named ``pct%41#x é`` keeps its store in that folder, and the reading commands find it."""
    from e2e_search.record.store import resolve_uri, sqlite_path, store_uri
    from trainables.workdir import DEFAULT_WORKDIR

    odd = tmp_path / "pct%41#x é"
    (odd / DEFAULT_WORKDIR).mkdir(parents=True)
    monkeypatch.chdir(odd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_uri(None, DEFAULT_WORKDIR)[0]
    assert "%2541" in uri and "%23" in uri and sqlite_path(uri) == odd / DEFAULT_WORKDIR / "mlflow.db"
    exp = MlflowClient(tracking_uri=uri).create_experiment("odd")
    assert (odd / DEFAULT_WORKDIR / "mlflow.db").is_file() and not (tmp_path / "pctA").exists()
    assert MlflowClient(tracking_uri=store_uri(None, DEFAULT_WORKDIR)).get_experiment(exp).name == "odd"


def test_a_truncated_best_checkpoint_fails_its_trial(client, tmp_path):
    """Issue 30, kind 7: a disk that filled while a checkpoint was written leaves it truncated; the run used to
    close FINISHED with only a tag, and became the champion. Now the checkpoint is read before it is kept: the
    trial is FAILED with the reason, and it is not the search's best."""
    cb = _callback(client, tmp_path)
    good, cut = _trial(), _trial()
    for t, value in ((good, 0.6), (cut, 0.3)):
        folder = tmp_path / f"trial_{t.trial_id}" / "checkpoint_000000"
        _checkpoint(folder)
        cb.on_trial_start(iteration=0, trials=[t], trial=t)
        cb.on_trial_result(iteration=1, trials=[t], trial=t,
                           result=_result(t, 1, checkpoint_path=str(folder), val_mae=value))
    pt = tmp_path / f"trial_{cut.trial_id}" / "checkpoint_000000" / "checkpoint.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    for t in (good, cut):
        cb.on_trial_complete(iteration=2, trials=[t], trial=t)
    cb.drain()
    run = client.get_run(cb.runs[cut.trial_id])
    assert run.info.status == "FAILED" and "could not be kept" in run.data.tags["e2e.error"]
    assert cb.status[cut.trial_id] == "FAILED" and client.get_run(cb.runs[good.trial_id]).info.status == "FINISHED"
    assert cb.best_trial()[0] == good.trial_id  # the better val_mae of the cut one does not count
