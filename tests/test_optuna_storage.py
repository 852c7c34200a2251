"""``search.optuna_storage``: the search's Optuna study kept in an RDB storage (what optuna-dashboard reads), one
study per search named after its run; storages that cannot be opened refused before Ray in one line."""

from __future__ import annotations

import pytest

from e2e_search.cli import main
from tests.conftest import base_config, write_e2e, write_yaml
from tests.test_bad_input import YAML, bad_run, base_cfg, ws  # noqa: F401 (ws: fixture)
from tests.test_bad_input import write_yaml as write_bad_yaml


@pytest.mark.parametrize("url, says", [
    ("not a url", "is not a database URL"),
    ("sqlite:///jets.h5/optuna.db", "is not a writable folder"),  # under a file
    ("sqlite://", "in-memory database"),
    ("postgresql://nobody@127.0.0.1:1/optuna", "cannot open"),
])
def test_a_storage_that_cannot_be_opened_is_one_line(ws, capsys, url, says):  # noqa: F811 - the imported fixture
    bad_run(ws, capsys, ["run", write_bad_yaml(base_cfg()), "--set", f"search.optuna_storage={url}"],
            YAML, "search.optuna_storage", says)


def test_pbt_keeps_no_study_to_store(ws, capsys):  # noqa: F811 - the imported fixture
    cfg = base_cfg()
    cfg["scheduler"] = {"type": "pbt", "max_epochs": 4, "perturbation_interval": 1}
    cfg["search"] = {"num_samples": 2, "max_concurrent": 2}
    bad_run(ws, capsys, ["validate", write_bad_yaml(cfg), "--set", "search.optuna_storage=sqlite:///o.db"],
            YAML, "search.optuna_storage", "scheduler.type: asha")


def test_the_search_study_is_kept_in_the_storage(tmp_path, monkeypatch, capsys, ray_local):
    import optuna
    from mlflow.tracking import MlflowClient

    data = write_e2e(tmp_path / "jets.h5", n=40)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = base_config(tmp_path, data, name="stored", search={"num_samples": 3, "seed": 0, "optuna_storage": url},
                      scheduler={"type": "none", "max_epochs": 1})
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(write_yaml(tmp_path / "s.yaml", cfg))]) == 0
    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    exp = client.get_experiment_by_name("stored")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("e2e.kind") == "search")
    assert optuna.get_all_study_names(url) == [parent.data.tags["mlflow.runName"]]
    study = optuna.load_study(study_name=parent.data.tags["mlflow.runName"], storage=url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and all("lr" in t.params for t in done)


def test_a_report_of_a_trial_the_study_already_finished_is_dropped(tmp_path):
    """A driver killed between the study's write and Tune's snapshot leaves a trial COMPLETE in the study that the
    resumed Tune reports again: Optuna's UpdateFinishedTrialError used to end the resumed search."""
    import optuna

    from e2e_search.search.optuna_search import ResumableOptunaSearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    search = ResumableOptunaSearch(space={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
                                   metric="val_auc", mode="max", storage=storage, study_name="s")
    assert search.suggest("t1") is not None
    search.on_trial_result("t1", {"val_auc": 0.7, "training_iteration": 1})
    search.on_trial_complete("t1", {"val_auc": 0.8, "training_iteration": 2})
    done = search._ot_study.trials[0]
    search._ot_trials["t1"] = optuna.trial.Trial(search._ot_study, done._trial_id)  # as a restored searcher holds it
    search._completed_trials.discard("t1")  # its snapshot was taken before the trial completed
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # what Ray's OptunaSearch does with it
        super(ResumableOptunaSearch, search).on_trial_result("t1", {"val_auc": 0.8, "training_iteration": 3})
    search.on_trial_result("t1", {"val_auc": 0.8, "training_iteration": 3})  # dropped, not raised
    search._ot_trials["t1"] = optuna.trial.Trial(search._ot_study, done._trial_id)
    search.on_trial_complete("t1", {"val_auc": 0.8, "training_iteration": 3})
    assert [t.state for t in optuna.load_study(study_name="s", storage=storage).trials] == [
        optuna.trial.TrialState.COMPLETE]
