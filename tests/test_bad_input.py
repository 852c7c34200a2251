"""Bad input through the real CLI: one line on stderr, exit code 2, nothing written.

Every case here fails before Ray would start (config, data file, GPUs, flags);
none of them starts Ray. Each test runs in its own empty working directory and
checks that no ``e2e_runs`` appears and no file besides its own inputs exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from e2e_search.cli import main

YAML = "space.yaml"
H5 = "jets.h5"


# --------------------------------------------------------------------------- inputs
def write_h5(path: Path, *, n: int = 40, x_shape: tuple | None = None, n_y: int | None = None,
             labels: np.ndarray | None = None, image_key: str = "X_jets", label_key: str = "y") -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.create_dataset(image_key, data=rng.normal(size=x_shape or (n, 16, 16, 3)).astype(np.float32))
        f.create_dataset(label_key, data=labels if labels is not None else (np.arange(n_y or n) % 2).astype(np.int64))
        f.create_dataset("m0", data=rng.uniform(50, 200, size=n).astype(np.float32))
    return path


def base_cfg() -> dict:
    return {
        "name": "bad-input",
        "family": "vit",
        "task": {"type": "classification", "num_classes": 2},
        "data": {"path": H5, "image_key": "X_jets", "label_key": "y", "val_fraction": 0.2, "test_fraction": 0.1},
        "params": {
            "lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
            "batch_size": 8,
            "patch_size": {"type": "choice", "values": [4, 8]},
            "depth": {"type": "randint", "low": 1, "high": 2},
            "drop_path": {"type": "uniform", "low": 0.0, "high": 0.1},
        },
        "search": {"algorithm": "random", "num_samples": 2},
        "scheduler": {"type": "asha", "max_epochs": 1},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }


def write_yaml(cfg: dict, name: str = YAML) -> str:
    Path(name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return name


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """Empty working directory with a valid HDF5 file (tests add their own inputs)."""
    monkeypatch.chdir(tmp_path)
    write_h5(tmp_path / H5)
    return tmp_path


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc: int, out: str, err: str, *names: str) -> str:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines()]
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got: {err!r}"
    for name in names:
        assert name in lines[0], f"{name!r} not in: {lines[0]}"
    return lines[0]


def bad_run(ws: Path, capsys, argv: list[str], *names: str) -> str:
    """Run the CLI on bad input and check the one-line error and that nothing was written."""
    before = files_under(ws)
    rc, out, err = cli(argv, capsys)
    line = assert_one_line(rc, out, err, *names)
    assert out == "", out
    assert not (ws / "e2e_runs").exists()
    assert files_under(ws) == before
    return line


def run_broken(ws: Path, capsys, cfg: dict, *names: str, cmd: str = "run", sets: tuple = ()) -> str:
    path = write_yaml(cfg)
    argv = [cmd, path] + [a for s in sets for a in ("--set", s)]
    return bad_run(ws, capsys, argv, path, *names)


# --------------------------------------------------------------------------- the valid base
def test_valid_base_passes(ws, capsys):
    path = write_yaml(base_cfg())
    before = files_under(ws)
    rc, out, err = cli(["validate", path], capsys)
    assert rc == 0, err
    assert f"{path}: valid" in out
    rc, out, err = cli(["run", path, "--dry-run"], capsys)
    assert rc == 0, err
    assert "dry run: nothing started" in out
    assert not (ws / "e2e_runs").exists()
    assert files_under(ws) == before


# --------------------------------------------------------------------------- YAML
def test_yaml_syntax_error(ws, capsys):
    Path(YAML).write_text("name: x\nfamily: vit\ndata: {path: jets.h5\nparams: [1, 2\n")
    line = bad_run(ws, capsys, ["run", YAML], YAML, "line ")
    assert "YAML syntax error" in line


def test_yaml_not_a_mapping(ws, capsys):
    Path(YAML).write_text("- just\n- a list\n")
    bad_run(ws, capsys, ["validate", YAML], YAML, "mapping")


def test_yaml_file_missing(ws, capsys):
    bad_run(ws, capsys, ["run", "nope.yaml"], "nope.yaml", "not found")


def test_unknown_top_level_key(ws, capsys):
    cfg = base_cfg()
    cfg["serach"] = cfg.pop("search")
    line = run_broken(ws, capsys, cfg, "serach")
    assert "did you mean 'search'" in line


def test_unknown_nested_key(ws, capsys):
    cfg = base_cfg()
    cfg["data"]["imge_key"] = cfg["data"].pop("image_key")
    line = run_broken(ws, capsys, cfg, "data.imge_key")
    assert "did you mean 'image_key'" in line


def test_unknown_param_name(ws, capsys):
    cfg = base_cfg()
    cfg["params"]["patch_sise"] = cfg["params"].pop("patch_size")
    line = run_broken(ws, capsys, cfg, "params.patch_sise")
    assert "did you mean 'patch_size'" in line


def test_unknown_key_in_dimension(ws, capsys):
    cfg = base_cfg()
    cfg["params"]["lr"]["hihg"] = cfg["params"]["lr"].pop("high")
    line = run_broken(ws, capsys, cfg, "params.lr.hihg")  # not "params.lr.high: missing"
    assert "did you mean 'high'" in line


@pytest.mark.parametrize("key, value", [
    ("search.num_samples", "many"),
    ("params.depth", 2.5),
    ("params.patch_size", {"type": "choice", "values": ["a", "b"]}),
    ("params.batch_size", {"type": "uniform", "low": 0.5, "high": 8.5}),
    ("scheduler.max_epochs", [1, 2]),
    ("task", "classification"),
])
def test_wrong_type(ws, capsys, key, value):
    cfg = base_cfg()
    section, _, name = key.partition(".")
    if name:
        cfg[section][name] = value
    else:
        cfg[section] = value
    run_broken(ws, capsys, cfg, key)


def test_empty_choice(ws, capsys):
    cfg = base_cfg()
    cfg["params"]["patch_size"] = {"type": "choice", "values": []}
    run_broken(ws, capsys, cfg, "params.patch_size.values")


@pytest.mark.parametrize("low, high", [(0.1, 0.1), (0.2, 0.1)])
def test_uniform_low_not_below_high(ws, capsys, low, high):
    cfg = base_cfg()
    cfg["params"]["drop_path"] = {"type": "uniform", "low": low, "high": high}
    line = run_broken(ws, capsys, cfg, "params.drop_path")
    assert "smaller than high" in line


@pytest.mark.parametrize("low", [0.0, -1.0e-3])
def test_loguniform_low_not_positive(ws, capsys, low):
    cfg = base_cfg()
    cfg["params"]["lr"] = {"type": "loguniform", "low": low, "high": 1.0e-2}
    line = run_broken(ws, capsys, cfg, "params.lr.low")
    assert "low > 0" in line


def test_unknown_dimension_type(ws, capsys):
    cfg = base_cfg()
    cfg["params"]["lr"]["type"] = "logunifrom"
    line = run_broken(ws, capsys, cfg, "params.lr")
    assert "did you mean 'loguniform'" in line


@pytest.mark.parametrize("key", ["family", "data.path"])
def test_missing_required_key(ws, capsys, key):
    cfg = base_cfg()
    section, _, name = key.partition(".")
    if name:
        del cfg[section][name]
    else:
        del cfg[section]
    line = run_broken(ws, capsys, cfg, key)
    assert "missing" in line


def test_unknown_family(ws, capsys):
    cfg = base_cfg()
    cfg["family"] = "vti"
    line = run_broken(ws, capsys, cfg, "family", cmd="validate")
    assert "did you mean 'vit'" in line


def test_condition_on_unknown_param(ws, capsys):
    cfg = base_cfg()
    cfg["params"]["depth"]["when"] = {"pool": "token"}
    line = run_broken(ws, capsys, cfg, "params.depth.when.pool")
    assert "not in params" in line


def test_grid_larger_than_num_samples(ws, capsys):
    cfg = base_cfg()
    cfg["params"]["patch_size"] = {"type": "grid", "values": [2, 4, 8]}
    cfg["params"]["batch_size"] = {"type": "grid", "values": [8, 16]}
    line = run_broken(ws, capsys, cfg, "search.num_samples")
    assert "6 grid combinations" in line


# --------------------------------------------------------------------------- the data file
def test_missing_data_file(ws, capsys):
    cfg = base_cfg()
    cfg["data"]["path"] = "nope.h5"
    line = run_broken(ws, capsys, cfg, "data.path", "nope.h5")
    assert "not found" in line


def test_data_file_not_hdf5(ws, capsys):
    Path("notes.h5").write_text("this is not an HDF5 file\n")
    cfg = base_cfg()
    cfg["data"]["path"] = "notes.h5"
    line = run_broken(ws, capsys, cfg, "data.path", "notes.h5")
    assert "HDF5" in line


def test_data_path_is_a_directory(ws, capsys):
    Path("somedir").mkdir()
    cfg = base_cfg()
    cfg["data"]["path"] = "somedir"
    line = run_broken(ws, capsys, cfg, "data.path", "somedir")
    assert "directory" in line


@pytest.mark.parametrize("key, value", [("data.image_key", "images"), ("data.label_key", "labels")])
def test_missing_hdf5_key(ws, capsys, key, value):
    cfg = base_cfg()
    cfg["data"][key.split(".")[1]] = value
    line = run_broken(ws, capsys, cfg, key, f"'{value}'")
    assert "X_jets" in line and "y" in line  # lists the keys the file has


def test_x_and_y_lengths_differ(ws, capsys):
    write_h5(ws / H5, n=40, n_y=30)
    line = run_broken(ws, capsys, base_cfg(), "data.label_key")
    assert "40" in line and "30" in line


def test_image_rank_not_3(ws, capsys):
    write_h5(ws / H5, x_shape=(40, 16, 16))
    line = run_broken(ws, capsys, base_cfg(), "data.image_key", cmd="validate")
    assert "rank 3" in line


def test_nan_in_images(ws, capsys):
    write_h5(ws / H5)
    with h5py.File(ws / H5, "a") as f:
        x = f["X_jets"][...]
        x[::4, 3, 3, 0] = np.nan
        x[1, 0, 0, 1] = np.inf
        f["X_jets"][...] = x
    line = run_broken(ws, capsys, base_cfg(), "data.image_key")
    assert "NaN or Inf" in line


def test_nan_in_regression_target(ws, capsys):
    write_h5(ws / H5)
    with h5py.File(ws / H5, "a") as f:
        m0 = f["m0"][...]
        m0[5] = np.nan
        f["m0"][...] = m0
    cfg = base_cfg()
    cfg["task"] = {"type": "regression", "target": "m0"}
    line = run_broken(ws, capsys, cfg, "task.target")
    assert "NaN or Inf" in line


def test_empty_data_file(ws, capsys):
    write_h5(ws / H5, n=0, x_shape=(0, 16, 16, 3))
    line = run_broken(ws, capsys, base_cfg(), "data.image_key")
    assert "0 samples" in line


def test_labels_outside_num_classes(ws, capsys):
    write_h5(ws / H5, labels=(np.arange(40) % 3).astype(np.int64))
    line = run_broken(ws, capsys, base_cfg(), "task.num_classes")
    assert "0..2" in line


def test_non_integer_labels(ws, capsys):
    write_h5(ws / H5, labels=np.linspace(0, 1, 40).astype(np.float32))
    run_broken(ws, capsys, base_cfg(), "data.label_key")


# --------------------------------------------------------------------------- --set and flags
def test_gpus_on_gpu_less_machine(ws, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = run_broken(ws, capsys, base_cfg(), "resources.gpus_per_worker", "--set",
                      sets=("resources.gpus_per_worker=1",))
    assert "no GPU" in line


@pytest.mark.parametrize("override, key", [("data.nope=1", "data.nope"), ("nosuch.key=1", "nosuch")])
def test_set_unknown_path(ws, capsys, override, key):
    line = run_broken(ws, capsys, base_cfg(), key, "--set", sets=(override,))
    assert "unknown key" in line


def test_set_bad_value(ws, capsys):
    run_broken(ws, capsys, base_cfg(), "search.num_samples", "--set", sets=("search.num_samples=many",))


def test_set_missing_data_file(ws, capsys):
    line = run_broken(ws, capsys, base_cfg(), "data.path", "--set", "gone.h5", sets=("data.path=gone.h5",))
    assert "not found" in line


def test_set_into_a_value(ws, capsys):
    run_broken(ws, capsys, base_cfg(), "name", "--set", sets=("name.sub=1",))


@pytest.mark.parametrize("override", ["data.path", "=1", "data path=x.h5"])
def test_set_malformed(ws, capsys, override):
    run_broken(ws, capsys, base_cfg(), "--set", sets=(override,))


@pytest.mark.parametrize("argv, named", [
    (["run", YAML, "--bogus"], "--bogus"),
    (["validate", YAML, "--dry-run"], "--dry-run"),
    (["run"], "file"),
    (["frobnicate", YAML], "frobnicate"),
    ([], "run,resume,confirm,validate,best"),
])
def test_bad_cli_flags(ws, capsys, argv, named):
    write_yaml(base_cfg())
    bad_run(ws, capsys, argv, "e2e-search", named)


# --------------------------------------------------------------------------- the installed script
def _console_script() -> str:
    exe = Path(sys.executable).parent / "e2e-search"
    return str(exe) if exe.is_file() else shutil.which("e2e-search")


def test_console_script_bad_input(ws):
    script = _console_script()
    assert script, "the e2e-search console script is not installed"
    cfg = base_cfg()
    cfg["data"]["path"] = "nope.h5"
    path = write_yaml(cfg)
    before = files_under(ws)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARNINGS")}
    proc = subprocess.run([script, "run", path], cwd=ws, capture_output=True, text=True, timeout=120, env=env)
    assert_one_line(proc.returncode, proc.stdout, proc.stderr, path, "data.path", "nope.h5")
    assert proc.stdout == ""
    assert not (ws / "e2e_runs").exists()
    assert files_under(ws) == before


# --- issue 13: tracking store and names
# MLflow's conventions (MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI), the store's state (deleted experiment, old
# schema, not a store, unreachable) and the names a search derives (registered models, runs, folders): one line,
# exit 2, nothing written, checked before Ray starts (validate and --dry-run too).
@pytest.fixture(scope="module")
def store13(tmp_path_factory):
    """A real MLflow store: experiment 'searched' (a finished search run and its trial), 'other' (a search run)
    and 'bad-input' (deleted, as in the MLflow UI). Tests copy the file into their working directory."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    d = tmp_path_factory.mktemp("store13")
    client = MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
    art = (d / "artifacts").as_uri()
    exp = client.create_experiment("searched", artifact_location=art)
    parent = client.create_run(exp, tags={"e2e.kind": "search", "e2e.metric": "val_auc", "e2e.mode": "max"}).info.run_id
    trial = client.create_run(exp, tags={"e2e.kind": "trial", MLFLOW_PARENT_RUN_ID: parent, "e2e.trial_id": "t1",
                                         "e2e.status": "FINISHED"}).info.run_id
    client.log_metric(trial, "best_val_auc", 0.9, step=1)
    client.set_terminated(trial, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    other = client.create_experiment("other", artifact_location=art)
    foreign = client.create_run(other, tags={"e2e.kind": "search"}).info.run_id
    client.delete_experiment(client.create_experiment("bad-input", artifact_location=art))
    return {"db": d / "mlflow.db", "parent": parent, "trial": trial, "foreign": foreign}


def _store_in(ws: Path, store13, name: str = "mlflow.db") -> str:
    shutil.copy(store13["db"], ws / name)
    return f"sqlite:///{ws / name}"


def _with_uri(cfg: dict, uri: str) -> dict:
    cfg["tracking"] = {"uri": uri}
    return cfg


@pytest.mark.parametrize("argv", [["best", "searched"], ["report", "searched"], ["resume", "searched"], ["ui"],
                                  ["export", "models:/searched-classifier@champion", "--out", "m.onnx"],
                                  ["run", YAML, "--resume"]])
def test_mlflow_tracking_uri_env_is_honoured(ws, capsys, monkeypatch, argv):
    """Case 6: every command reads MLFLOW_TRACKING_URI (here a store that does not exist) instead of
    e2e_runs/mlflow.db, says so in one line, and creates neither the store nor e2e_runs/."""
    write_yaml(base_cfg())
    missing = ws / "elsewhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    if argv[0] == "run":  # nothing to resume there: a new search starts, and it must be refused in plan
        Path("elsewhere").write_text("a file where the store's folder would go")
        line = bad_run(ws, capsys, argv, "MLFLOW_TRACKING_URI", "cannot create the MLflow store")
    else:
        line = bad_run(ws, capsys, argv, "MLFLOW_TRACKING_URI", str(missing))
    assert "e2e_runs" not in line


def test_env_store_is_used_and_flags_win(ws, capsys, monkeypatch, store13):
    """Precedence: --tracking-uri (or the YAML's tracking.uri) > MLFLOW_TRACKING_URI > sqlite:///e2e_runs/mlflow.db."""
    uri = _store_in(ws, store13)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rc, out, err = cli(["best", "searched"], capsys)
    assert rc == 0 and store13["trial"] in out, err
    rc, out, err = cli(["resume", "searched"], capsys)  # found in the env's store: finished, nothing to resume
    assert_one_line(rc, out, err, "finished; nothing to resume")
    bad_run(ws, capsys, ["best", "searched", "--tracking-uri", f"sqlite:///{ws / 'no.db'}"], "--tracking-uri",
            "no.db")
    path = write_yaml(base_cfg())  # experiment 'bad-input', deleted in the env's store: refused from there
    bad_run(ws, capsys, ["validate", path], "'bad-input' was deleted", uri)
    cfg = _with_uri(base_cfg(), f"sqlite:///{ws / 'yaml.db'}")
    cfg["name"] = "fresh"
    path = write_yaml(cfg)
    rc, out, err = cli(["validate", path], capsys)
    assert rc == 0 and f"tracking: sqlite:///{ws / 'yaml.db'} (experiment 'fresh')" in out, err
    del cfg["tracking"]
    rc, out, err = cli(["validate", write_yaml(cfg)], capsys)
    assert rc == 0 and f"tracking: {uri} (experiment 'fresh')" in out, err
    assert not (ws / "yaml.db").exists() and not (ws / "e2e_runs").exists()


def test_export_of_a_missing_model_reads_the_env_store_and_writes_nothing(ws, capsys, monkeypatch, store13):
    uri = _store_in(ws, store13)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    line = bad_run(ws, capsys, ["export", "models:/nope-classifier@champion", "--out", "m.onnx"], "SOURCE",
                   "models:/nope-classifier@champion", uri)
    assert "e2e_runs" not in line
    reg = _store_in(ws, store13, "registry.db")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", reg)  # the registry may live elsewhere: named in the line
    bad_run(ws, capsys, ["export", "models:/nope-classifier@champion", "--out", "m.onnx"], reg)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{ws / 'noreg.db'}")
    bad_run(ws, capsys, ["export", "models:/nope-classifier@champion", "--out", "m.onnx"], "MLFLOW_REGISTRY_URI",
            "noreg.db")


@pytest.mark.parametrize("cmd", ["run", "validate", "dry-run"])
def test_deleted_experiment_is_refused_before_ray(ws, capsys, store13, cmd):
    """Case 13: an experiment deleted in the MLflow UI and reused by name ended the run with an MLflow
    traceback; now one line names `mlflow experiments restore` and tracking.experiment."""
    uri = _store_in(ws, store13)
    path = write_yaml(_with_uri(base_cfg(), uri))
    argv = ["run", path, "--dry-run"] if cmd == "dry-run" else [cmd, path]
    before = (ws / "mlflow.db").read_bytes()
    bad_run(ws, capsys, argv, path, "tracking.experiment", "'bad-input' was deleted",
                   "mlflow experiments restore --experiment-id", "another name")
    assert (ws / "mlflow.db").read_bytes() == before


@pytest.mark.parametrize("argv", [["best", "bad-input"], ["report", "bad-input"], ["resume", "bad-input"]])
def test_deleted_experiment_read_commands_say_so(ws, capsys, store13, argv):
    uri = _store_in(ws, store13)
    bad_run(ws, capsys, argv + ["--tracking-uri", uri], "EXPERIMENT", "'bad-input' was deleted",
            "mlflow experiments restore")


@pytest.mark.parametrize("task, experiment, named", [
    ("classification", "tt/W+jets", "'tt/W+jets-classifier'"),
    ("regression", "mass:MeV", "'mass:MeV-regressor'"),
    ("joint", "..", "'..-classifier'"),
    ("classification", "e" * 300, "MLflow keeps 256"),
    ("classification", " ", "is empty"),
])
def test_names_derived_from_the_experiment(ws, capsys, task, experiment, named):
    """Case 13: `tracking.experiment: 'tt/W+jets'` trained every trial, then failed to register
    'tt/W+jets-classifier' and left the parent run RUNNING; now refused before Ray with the fix."""
    cfg = base_cfg()
    cfg["task"] = {"type": task, "num_classes": 2} if task != "regression" else {"type": task, "target": "m0"}
    cfg["tracking"] = {"experiment": experiment}
    for cmd in ("run", "validate"):
        line = run_broken(ws, capsys, cfg, "tracking.experiment", named, cmd=cmd)
        assert "set tracking.experiment" in line


def test_search_name_too_long_for_run_and_folder_names(ws, capsys):
    cfg = base_cfg()
    cfg["name"] = "n" * 240
    run_broken(ws, capsys, cfg, ": name:", "set name to at most")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broken_store(ws: Path, store13, state: str) -> tuple[str, tuple[str, ...]]:
    """A store in ``state`` in the working directory -> (its URI, the words its one-line refusal holds)."""
    import sqlite3

    db = ws / "mlflow.db"
    if state == "old_schema":
        _store_in(ws, store13)
        with sqlite3.connect(db) as con:
            con.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")  # MLflow 1.x's schema
        return f"sqlite:///{db}", ("mlflow db upgrade", "451aebb31d03")
    if state == "not_mlflow":
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE jets (pt REAL)")
        return f"sqlite:///{db}", ("without MLflow's tables",)
    if state == "not_sqlite":
        db.write_text("not a database\n" * 100)
        return f"sqlite:///{db}", ("cannot read the MLflow store",)
    if state == "unreachable_server":
        return f"http://127.0.0.1:{_free_port()}", ("cannot reach the MLflow server",)
    if state == "under_a_file":
        return f"sqlite:///{ws / H5 / 'mlflow.db'}", ("cannot create the MLflow store", "not a writable folder")
    (ws / "store").mkdir()
    return f"sqlite:///{ws / 'store'}", ("is a folder",)


@pytest.mark.parametrize("state", ["old_schema", "not_mlflow", "not_sqlite", "unreachable_server", "under_a_file",
                                   "a_folder"])
def test_store_state_is_checked_before_ray(ws, capsys, store13, state):
    """Case 13: the store is reachable, its schema current and it is an MLflow store; read-only checks."""
    import time

    db = ws / "mlflow.db"
    uri, named = _broken_store(ws, store13, state)
    before = db.read_bytes() if db.exists() else None
    t0 = time.time()
    run_broken(ws, capsys, _with_uri(base_cfg(), uri), "tracking.uri", *named, "set tracking.uri")
    assert time.time() - t0 < 30
    assert (db.read_bytes() if db.exists() else None) == before


@pytest.mark.parametrize("state", ["old_schema", "not_mlflow", "not_sqlite", "unreachable_server"])
@pytest.mark.parametrize("cmd", ["best", "report", "export", "confirm", "resume", "ui"])
def test_every_command_that_opens_a_store_checks_it_first(ws, capsys, store13, state, cmd):
    """Issue 30, kind 8: not only `run`: every command that opens a store refuses a broken one with the same
    one-line errors (exit 2, nothing written), before it reads anything."""
    db = ws / "mlflow.db"
    uri, named = _broken_store(ws, store13, state)
    argv = {"best": ["best", "searched"], "report": ["report", "searched"], "confirm": ["confirm", "searched"],
            "resume": ["resume", "searched"], "ui": ["ui", "--port", str(_free_port())],
            "export": ["export", "models:/searched-classifier@champion", "--out", str(ws / "m.onnx")]}[cmd]
    before = db.read_bytes() if db.exists() else None
    bad_run(ws, capsys, [*argv, "--tracking-uri", uri], "--tracking-uri", *named)
    assert (db.read_bytes() if db.exists() else None) == before


@pytest.mark.parametrize("which", ["trial", "foreign", "unknown"])
@pytest.mark.parametrize("cmd", ["report", "resume"])
def test_search_flag_with_a_run_that_is_not_this_experiments_search(ws, capsys, store13, which, cmd):
    """Case 15: `report --search <trial run id>` wrote an empty leaderboard and uploaded it into the trial's
    artifacts. A trial's run, another experiment's search or an unknown id: one line, nothing written."""
    from mlflow.tracking import MlflowClient

    uri = _store_in(ws, store13)
    run_id = {"trial": store13["trial"], "foreign": store13["foreign"], "unknown": "0" * 32}[which]
    words = {"trial": f"its search run is {store13['parent']}", "foreign": "belongs to another experiment",
             "unknown": "no run"}[which]
    line = bad_run(ws, capsys, [cmd, "searched", "--search", run_id, "--tracking-uri", uri], "--search", words)
    assert "leave out --search" in line
    client = MlflowClient(tracking_uri=uri)
    assert client.list_artifacts(store13["trial"]) == []


def test_registry_store_from_the_environment_is_checked_too(ws, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{ws / H5 / 'registry.db'}")
    run_broken(ws, capsys, base_cfg(), "MLFLOW_REGISTRY_URI", "cannot create the MLflow store", "registry.db")


# --- issue 13: export and data generate flags
def _checkpoint(ws: Path) -> Path:
    from tests.test_export import CASES, make_checkpoint

    family, params, data = CASES["resnet15"]
    return make_checkpoint(ws / "trial", family, params, data)[0]


@pytest.mark.parametrize("opset", ["6", "0", "-1", "max+1", "1000"])
def test_export_opset_out_of_range(ws, capsys, opset):
    """--opset outside 7..the newest opset onnx knows: refused before anything is loaded or exported."""
    from e2e_search.export.onnx import opset_max

    ckpt = _checkpoint(ws)
    value = str(opset_max() + 1) if opset == "max+1" else opset
    line = bad_run(ws, capsys, ["export", str(ckpt), "--out", "m.onnx", "--opset", value], "--opset",
                   f"use --opset 7..{opset_max()}")
    assert f"{value} is not an ONNX opset" in line


@pytest.mark.parametrize("args, named", [
    (["--image-size", "100000"], ("--image-size", "111.8 GiB", "use --image-size 8..360")),  # the case
    (["--image-size", "4"], ("--image-size", "8..360")),
    (["--n", "1"], ("--n", "both classes", "use --n 2")),
    (["--n", "-3"], ("--n", "must be > 0")),
    (["--workers", "0"], ("--workers", "must be > 0", "use --workers 1")),
    (["--seed", "0"], ("--seed", "1..900000000")),
    (["--seed", "900000001"], ("--seed", "1..900000000")),
    (["--channels", ","], ("--channels", "use --channels ECAL,HCAL,Tracks")),
    (["--channels", "ECAL,ECAL"], ("--channels", "distinct")),
    (["--mass-range", "50"], ("--mass-range", "use --mass-range 50,200")),
    (["--mass-range", "100,50"], ("--mass-range", "0 < LOW < HIGH")),
    (["--mass-range", "inf,50"], ("--mass-range", "0 < LOW < HIGH")),
    (["--mass-range=-5,50"], ("--mass-range", "0 < LOW < HIGH")),
    (["--per-mass", "0"], ("--per-mass", "use --per-mass 200")),
    (["--decay", "tt"], ("--decay",)),
    (["--n", str(10**12)], ("--n", "of disk", "is free in", "use a smaller --n")),  # petabytes: on any machine
    (["--n", "20000", "--workers", "10000"], ("--workers", "of memory", "is available", "or fewer")),
])
def test_data_generate_flags(ws, capsys, args, named):
    """Every flag's range, and the memory and disk the output needs, before Ray starts or anything is simulated."""
    scalar = any(a.startswith(("--per-mass", "--mass-range")) for a in args)
    argv = ["data", "generate", "boosted_scalar" if scalar else "top_vs_qcd",
            "--n", "4", "--image-size", "16", "--out", "gen.h5", *args]
    bad_run(ws, capsys, argv, *named)


def test_data_generate_unknown_process_and_output_suffix(ws, capsys):
    bad_run(ws, capsys, ["data", "generate", "top_vs_qdc", "--n", "4", "--out", "gen.h5"], "PROCESS", "top_vs_qcd")
    bad_run(ws, capsys, ["data", "generate", "top_vs_qcd", "--n", "4", "--out", "gen.txt"], "--out", "use --out gen.h5")


@pytest.mark.parametrize("generate, key, words", [
    ({"recipe": "top_vs_qcd", "n": 4, "image_size": 100000}, "data.generate.image_size",
     ("set data.generate.image_size: 8..360",)),
    ({"recipe": "top_vs_qcd", "n": 1}, "data.generate.n", ("set data.generate.n: 2",)),
    ({"recipe": "boosted_scalar", "n": 4, "mass_range": [200.0, 100.0]}, "data.generate.mass_range",
     ("set data.generate.mass_range: [50, 200]",)),
    ({"recipe": "boosted_scalar", "n": 4, "mass_range": [50.0]}, "data.generate.mass_range", ()),
    ({"recipe": "top_vs_qcd", "n": 10**12}, "data.generate.n", ("of disk", "set a smaller data.generate.n")),
    ({"recipe": "top_vs_qcd", "n": 20000, "workers": 10000}, "data.generate.workers",
     ("of memory", "set data.generate.workers:")),
    ({"recipe": "toy_jets", "n": 4, "image_size": 100000}, "data.generate.image_size",
     ("of memory", "set a smaller data.generate.image_size")),
    ({"recipe": "toy_jets", "n": 10**12}, "data.generate.n", ("of disk",)),
    ({"recipe": "toy_jets", "n": 1}, "data.generate.n", ("set data.generate.n: 2000",)),
])
@pytest.mark.parametrize("cmd", ["validate", "run"])
def test_data_generate_recipe_in_yaml(ws, capsys, generate, key, words, cmd):
    """A YAML's data.generate recipe gets the same checks as `data generate`, named by its YAML key, in `validate`
    and `--dry-run` as in `run` (before Ray starts and before anything is simulated)."""
    cfg = base_cfg()
    cfg["data"]["path"] = "gen.h5"
    cfg["data"]["generate"] = generate
    run_broken(ws, capsys, cfg, key, *words, cmd=cmd)


# --- issue 13: labels, splits, readers, generation
# Labels of every dtype a file can hold either work (tests/test_formats.py, tests/test_search.py) or give one line
# naming data.label_key, the dtype and the fix; a split without every class, a CSV's label column, a compressed
# CSV and a data.path override of a YAML with a generate recipe are caught before Ray starts, nothing written.
def _labels_h5(ws: Path, y, n: int = 40, name: str = H5, **datasets) -> str:
    rng = np.random.default_rng(0)
    with h5py.File(ws / name, "w") as f:
        f["X_jets"] = rng.normal(size=(n, 16, 16, 3)).astype(np.float32)
        if isinstance(y, tuple):  # (values, h5py dtype)
            f.create_dataset("y", data=y[0], dtype=y[1])
        else:
            f["y"] = y
        f["m0"] = datasets.pop("m0", rng.uniform(50, 200, n))
        for k, v in datasets.items():
            f[k] = v
    return name


N13 = 40
_ALT = np.arange(N13) % 2


@pytest.mark.parametrize("labels, key, words", [
    (np.linspace(0, 1, N13).astype(np.float32), "data.label_key",
     ["float32", "non-integer", "0.025641", "row 1", "store the class index", "task.type: regression"]),
    (np.where(np.arange(N13) == 7, np.nan, _ALT), "data.label_key", ["float64", "NaN", "row 7", "drop those samples"]),
    (np.array([b"top", b"qcd"] * (N13 // 2)), "data.label_key",
     ["fixed-length strings", "b'top'", "store the class index of each sample as an integer"]),
    ((["top", "qcd"] * (N13 // 2), h5py.string_dtype()), "data.label_key",
     ["variable-length strings", "store the class index"]),
    (np.tile([[0.3, 0.7]], (N13, 1)), "data.label_key",
     ["float64", "(40, 2)", "not one-hot", "[0.3, 0.7]", "store one class index per sample"]),
    (np.eye(3)[np.arange(N13) % 3], "task.num_classes", ["one-hot with 3 classes", "set task.num_classes: 3"]),
    (np.where(_ALT == 1, 1, -1), "data.label_key", ["int64", "negative", "-1..1", "relabel them"]),
    (np.ones((N13, 2, 2), np.int64), "data.label_key",
     ["int64", "(40, 2, 2)", "one class index per sample", "set data.label_key"]),
    ((np.arange(N13) % 2).astype(np.complex64), "data.label_key", ["complex64", "class indices", "store the"]),
    (np.zeros(N13, [("cls", "i8"), ("w", "f4")]), "data.label_key", ["compound records (cls, w)", "set data.label_key"]),
    (np.arange(N13) % 3, "task.num_classes", ["0..2", "set task.num_classes: 3"]),
], ids=["fractional", "nan", "bytes", "vlen-str", "soft", "onehot-3-of-2", "plus-minus-1", "rank-3", "complex",
        "compound", "range"])
@pytest.mark.parametrize("cmd", ["validate", "run"])
def test_label_dtypes_refused(ws, capsys, labels, key, words, cmd):
    _labels_h5(ws, labels)
    run_broken(ws, capsys, base_cfg(), key, "'y'", *words, cmd=cmd)  # words: the dtype and the fix


def test_scalar_label_dataset(ws, capsys):
    _labels_h5(ws, np.int64(1))
    run_broken(ws, capsys, base_cfg(), "data.label_key", "shape ()", "one class index per sample")


def test_regression_target_not_numbers(ws, capsys):
    _labels_h5(ws, _ALT, m0=np.array([b"light", b"heavy"] * (N13 // 2)))
    cfg = base_cfg()
    cfg["task"] = {"type": "regression", "target": "m0"}
    run_broken(ws, capsys, cfg, "task.target", "'m0'", "fixed-length strings", "numeric")


def _rare(n: int, count: int) -> np.ndarray:
    y = np.zeros(n, np.int64)
    y[np.arange(count) * 7 % n] = 1
    return y


@pytest.mark.parametrize("cmd", ["validate", "run"])
def test_split_without_every_class(ws, capsys, cmd):
    """Class 1 has 2 of 200 samples: no stratified split puts one in train, val and test."""
    _labels_h5(ws, _rare(200, 2), n=200)
    line = run_broken(ws, capsys, base_cfg(), "data.test_fraction", "class 1", "train [138, 1]", "val [40, 1]",
                      "test [20, 0]", "data.val_fraction=0.2", "data.seed=0", "data.test_fraction: 0", cmd=cmd)
    assert "val_auc" in line


def test_split_without_every_class_no_test(ws, capsys):
    """One sample of class 1 and no test split: the validation split lacks it."""
    _labels_h5(ws, _rare(200, 1), n=200)
    cfg = base_cfg()
    cfg["data"]["test_fraction"] = 0.0
    run_broken(ws, capsys, cfg, "data.val_fraction", "class 1", "train [159, 1]", "val [40, 0]", "add samples")


def test_class_missing_from_the_file(ws, capsys):
    _labels_h5(ws, _ALT)
    cfg = base_cfg()
    cfg["task"]["num_classes"] = 3
    run_broken(ws, capsys, cfg, "task.num_classes", "class 2 has no sample", "[20, 20, 0]", "set task.num_classes")


def test_class_missing_under_data_limit(ws, capsys):
    n, limit = 200, 20
    drawn = np.random.default_rng(0).permutation(n)[:limit]
    y = np.zeros(n, np.int64)
    y[np.setdiff1d(np.arange(n), drawn)[:5]] = 1  # 5 of class 1, none among the 20 drawn
    _labels_h5(ws, y, n=n)
    cfg = base_cfg()
    cfg["data"]["limit"] = limit
    run_broken(ws, capsys, cfg, "data.limit", "class 1", "the file has 5", "raise or remove data.limit")


def test_regression_target_constant(ws, capsys):
    _labels_h5(ws, _ALT, m0=np.full(N13, 125.0))
    cfg = base_cfg()
    cfg["task"] = {"type": "regression", "target": "m0"}
    run_broken(ws, capsys, cfg, "task.target", "single value (125)", "varies")


def test_regression_target_constant_in_a_split(ws, capsys):
    m0 = np.full(200, 125.0)
    m0[np.random.default_rng(0).permutation(200)[60:100]] = 90.0  # test (first 20) and val (next 40): only 125
    _labels_h5(ws, _rare(200, 50), n=200, m0=m0)
    cfg = base_cfg()
    cfg["task"] = {"type": "regression", "target": "m0"}
    run_broken(ws, capsys, cfg, "data.val_fraction", "val split holds 40 sample(s) with 1 distinct value of 'm0'",
               "train 2, val 1, test 1", "data.seed=0", "raise data.val_fraction")


# A data path override never generates data.
def _shipped(name: str) -> str:
    return str(Path(__file__).resolve().parents[1] / "search_spaces" / name)


@pytest.mark.parametrize("yaml_name", ["quickstart.yaml", "vit_e2e_classification.yaml", "deepsets_event.yaml"])
@pytest.mark.parametrize("cmd", [["validate"], ["run"], ["run", "--dry-run"]])
def test_path_override_never_generates(ws, capsys, yaml_name, cmd):
    """The shipped YAMLs carry a data.generate recipe; a mistyped --set data.path must not be simulated into."""
    line = bad_run(ws, capsys, [cmd[0], _shipped(yaml_name), *cmd[1:], "--set", "data.path=typo/my_jets.h5"],
                   yaml_name, "--set data.path", "data.path", "typo/my_jets.h5", "not found", "fix the path")
    assert not (ws / "typo").exists(), line


def test_generate_recipe_still_writes_its_own_path(ws, capsys):
    """The YAML's own path (also when --set repeats it) and a recipe given with --set keep generating."""
    from e2e_search.spec.loader import load

    own = load(_shipped("quickstart.yaml"))
    assert own.data.generate is not None
    again = load(_shipped("quickstart.yaml"), [f"data.path={own.data.path}"])
    assert again.data.generate == own.data.generate
    assert load(_shipped("quickstart.yaml"), ["data.path=mine.h5"]).data.generate is None
    explicit = load(_shipped("quickstart.yaml"), ["data.path=mine.h5", "data.generate.n=50"])
    assert explicit.data.generate.n == 50 and explicit.data.generate.recipe == "toy_jets"
    rc, out, err = cli(["run", _shipped("quickstart.yaml"), "--dry-run", "--set", "data.path=mine.h5",
                        "--set", "data.generate.n=50"], capsys)
    assert rc == 0, err
    assert "data: mine.h5 will be generated (50 samples)" in out
    assert not (ws / "mine.h5").exists() and not (ws / "e2e_runs").exists()


# HIGGS-style CSV: the label column, compression, parse failures.
def _csv_cfg(path: str) -> dict:
    cfg = base_cfg()
    cfg["family"] = "deepsets"
    cfg["data"] = {"path": path, "image_key": "X_objects", "val_fraction": 0.2, "test_fraction": 0.1}
    cfg["params"] = {"hidden": 16, "depth": 1, "batch_size": 8}
    return cfg


def _higgs_rows(n: int = 60, label_last: bool = False) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, feats = (np.arange(n) % 2).astype(float), rng.normal(0, 1, (n, 28))
    return np.column_stack([feats, y] if label_last else [y, feats])


def _csv_text(rows: np.ndarray) -> str:
    return "".join(",".join(f"{v:.18e}" for v in row) + "\n" for row in rows)


@pytest.mark.parametrize("cmd", ["validate", "run"])
def test_csv_label_in_last_column(ws, capsys, cmd):
    Path("last.csv").write_text(_csv_text(_higgs_rows(label_last=True)))
    line = run_broken(ws, capsys, _csv_cfg("last.csv"), "data.label_key", "column 1 of last.csv", "non-integer",
                      "the last column looks like the class labels", "header", cmd=cmd)
    assert "task.num_classes" not in line


@pytest.mark.parametrize("cmd", ["validate", "run"])
def test_csv_label_out_of_range(ws, capsys, cmd):
    rows = _higgs_rows()
    rows[5, 0] = 2.0
    Path("three.csv").write_text(_csv_text(rows))
    run_broken(ws, capsys, _csv_cfg("three.csv"), "task.num_classes", "0..2", "task.num_classes: 3", cmd=cmd)


def _gz(name: str, text: str) -> str:
    import gzip

    with gzip.open(name, "wt") as f:
        f.write(text)
    return name


@pytest.mark.parametrize("make, words", [
    (lambda: _put("t.csv.gz", Path(_gz("full.csv.gz", _csv_text(_higgs_rows()))).read_bytes()[:400]),
     ["data.path", "truncated"]),
    (lambda: _zip("two.csv.zip", 2), ["data.path", "zip archive of 2 files", "extract"]),
    (lambda: _put("z.csv.zst", b"\x28\xb5\x2f\xfd" + b"\0" * 64), ["data.path", "zstd"]),
    (lambda: _gz("jets.h5.gz", "x"), ["data.path", "compressed hdf5", "decompress it first"]),
    (lambda: _put("words.csv", "a,b\nc,d\n"), ["data.path", "2 columns"]),
    (lambda: _put("ragged.csv", _csv_text(_higgs_rows()) + "1,2,3\n"),
     ["data.path", "data row 61", "line 61"]),
    (lambda: _put("text.csv", _csv_text(_higgs_rows()).replace("e+00,", "e+00,x", 1)),
     ["data.path", "data row 1", "non-numeric"]),
], ids=["truncated-gz", "zip-of-two", "zstd", "h5-gz", "no-numbers", "short-row", "text-cell"])
def test_bad_csv_files(ws, capsys, make, words):
    name = make()
    fmt = {"format": "csv"} if name.endswith(".zst") else {}
    cfg = _csv_cfg(name)
    cfg["data"].update(fmt)
    run_broken(ws, capsys, cfg, *words)


def _put(name: str, data: str | bytes) -> str:
    (Path(name).write_bytes if isinstance(data, bytes) else Path(name).write_text)(data)
    return name


def _zip(name: str, files: int) -> str:
    import zipfile

    with zipfile.ZipFile(name, "w") as z:
        for i in range(files):
            z.writestr(f"part{i}.csv", _csv_text(_higgs_rows()))
    return name


# Parquet and ROOT labels that are not class indices: refused before any cache is written.
def _pq_labels(ws: Path, y) -> str:
    from tests.test_formats import write_parquet

    rng = np.random.default_rng(0)
    return str(write_parquet(ws / "jets.parquet", rng.normal(size=(N13, 3, 8, 8)).astype(np.float32), {"y": y}).name)


def _root_labels(ws: Path, y) -> str:
    from tests.test_formats import write_root

    rng = np.random.default_rng(0)
    return str(write_root(ws / "jets.root", rng.normal(size=(N13, 3, 8, 8)).astype(np.float32), {"y": y}).name)


@pytest.mark.parametrize("make, key, words", [
    (lambda ws: _pq_labels(ws, ["top", "qcd"] * (N13 // 2)), "data.label_key",
     ["variable-length strings", "'top'", "store the class index"]),
    (lambda ws: _pq_labels(ws, [[0, 1], [1]] * (N13 // 2)), "data.label_key",
     ["variable-length array per sample", "store the class index"]),
    (lambda ws: _pq_labels(ws, [[0.2, 0.8]] * N13), "data.label_key", ["not one-hot", "[0.2, 0.8]"]),
    (lambda ws: _root_labels(ws, np.linspace(0, 1, N13)), "data.label_key", ["float64", "non-integer", "store the"]),
    (lambda ws: _root_labels(ws, np.where(_ALT == 1, 1, -1).astype(np.int32)), "data.label_key",
     ["int32", "negative", "relabel them"]),
], ids=["parquet-strings", "parquet-ragged-lists", "parquet-soft", "root-fractional", "root-plus-minus-1"])
@pytest.mark.parametrize("cmd", ["validate", "run"])
def test_parquet_root_label_types_refused(ws, capsys, make, key, words, cmd):
    path = make(ws)
    run_broken(ws, capsys, base_cfg(), key, "'y'", *words, cmd=cmd, sets=(f"data.path={path}",))


# --- issue 13: parameters, shapes, YAML
# Case 4: every family's build-time constraint on the data's shape is checked, for every value a dimension
# can take, at validate / --dry-run (e2e_search/spec/shapes.py), naming params.<name> and the bad value(s).
@pytest.mark.parametrize("cmd", [["validate"], ["run", "--dry-run"]], ids=["validate", "dry-run"])
def test_patch_larger_than_the_image_with_crop(ws, capsys, cmd):
    cfg = base_cfg()  # 16x16 images
    cfg["params"]["patch_size"] = {"type": "choice", "values": [4, 32]}
    cfg["params"]["patch_fit"] = "crop"
    path = write_yaml(cfg)
    line = bad_run(ws, capsys, [cmd[0], path, *cmd[1:]], path, "params.patch_size: 32 does not fit",
                   "16x16 images", "patch_fit=crop", "patch_fit: pad", "remove 32 from params.patch_size")
    assert "params.patch_size: 4" not in line


@pytest.mark.parametrize("params, key, words", [
    # every integer of a randint range is checked, and the bad ones are named
    ({"patch_size": {"type": "randint", "low": 14, "high": 20}, "patch_fit": "crop"},
     "params.patch_size", ("17..20 do not fit", "narrow params.patch_size")),
    # a combination: 16 fits with pad, not with crop
    ({"patch_size": {"type": "choice", "values": [4, 32]}, "patch_fit": {"type": "choice", "values": ["pad", "crop"]}},
     "params.patch_size", ("32 does not fit", "patch_fit=crop")),
    # quniform steps are every value, too
    ({"patch_size": {"type": "quniform", "low": 8, "high": 24, "q": 8}, "patch_fit": "crop"},
     "params.patch_size", ("24 does not fit",)),
])
def test_vit_patch_values_checked_against_the_image(ws, capsys, params, key, words):
    cfg = base_cfg()
    cfg["params"].update(params)
    run_broken(ws, capsys, cfg, key, *words, cmd="validate")


def test_mae_mask_ratio_must_leave_a_visible_patch(ws, capsys):
    cfg = base_cfg()
    cfg["family"] = "mae"
    cfg["scheduler"]["max_epochs"] = 3
    cfg["params"] = {"batch_size": 8, "patch_size": 8, "pretrain_epochs": 1,   # 16x16 images: a 2x2 patch grid
                     "mask_ratio": {"type": "uniform", "low": 0.5, "high": 0.9}}
    run_broken(ws, capsys, cfg, "params.mask_ratio: 0.9 does not fit", "hides all 4 patches",
               "lower mask_ratio below 0.75", cmd="validate")
    cfg["params"]["pretrain_epochs"] = 0  # no pretraining: the mask ratio is never used
    rc, out, err = cli(["validate", write_yaml(cfg)], capsys)
    assert rc == 0, err


def test_resnet15_batch_of_one_on_tiny_images(ws, capsys):
    write_h5(ws / "tiny.h5", x_shape=(40, 4, 4, 3))
    cfg = base_cfg()
    cfg["family"] = "resnet15"
    cfg["data"]["path"] = "tiny.h5"
    cfg["params"] = {"batch_size": {"type": "choice", "values": [1, 8]}}
    run_broken(ws, capsys, cfg, "params.batch_size: 1 does not fit", "4x4 images", "batch_size of 2 or more",
               cmd="validate")


def test_shape_check_per_family_of_a_family_search(ws, capsys):
    cfg = base_cfg()
    cfg["family"] = {"type": "grid", "values": ["vit", "mae"]}
    cfg["scheduler"]["max_epochs"] = 3
    cfg["params"] = {"batch_size": 8, "patch_size": {"type": "choice", "values": [4, 16]}}
    # vit pads a 16x16 patch; mae's single 16x16 patch would be hidden by pretraining
    run_broken(ws, capsys, cfg, "params.patch_size: 16 does not fit", "in family mae", cmd="validate")
    cfg["params"]["patch_size"]["when"] = {"family": "vit"}  # mae keeps its default patch size
    rc, out, err = cli(["validate", write_yaml(cfg)], capsys)
    assert rc == 0, err


def test_shape_check_uses_the_recipe_before_data_is_generated(ws, capsys):
    cfg = base_cfg()
    cfg["data"] = {"path": "later.h5", "generate": {"recipe": "toy_jets", "n": 100, "image_size": 12}}
    cfg["params"]["patch_size"] = 16
    cfg["params"]["patch_fit"] = "crop"
    for cmd in (["validate"], ["run", "--dry-run"], ["run"]):  # run: refused before the recipe simulates anything
        path = write_yaml(cfg)
        bad_run(ws, capsys, [cmd[0], path, *cmd[1:]], "params.patch_size: 16 does not fit", "12x12 images",
                "as data.generate will write them")
    assert not (ws / "later.h5").exists()


def test_fitting_values_pass_the_shape_check(ws, capsys):
    cfg = base_cfg()
    cfg["params"]["patch_size"] = {"type": "randint", "low": 1, "high": 16}
    cfg["params"]["patch_fit"] = {"type": "choice", "values": ["pad", "crop"]}
    rc, out, err = cli(["validate", write_yaml(cfg)], capsys)
    assert rc == 0 and err == "", err


# Case 10: messages name the key and the fix.
@pytest.mark.parametrize("sets, key, fix", [
    (["scheduler.max_epochs=1", "scheduler.grace_period=2"], "scheduler", "set scheduler.grace_period to at most 1"),
    (["params.lr={type: uniform, low: 0.1, high: 0.01}"], "params.lr", "set low below high"),
    (["data.val_fraction=0.5", "data.test_fraction=0.45"], "data", "lower data.val_fraction or data.test_fraction"),
    (["data.mean=[0, 0, 0]"], "data", "set data.mean and data.std together"),
    (["data.mean=[0, 0, 0]", "data.std=[1, 0, 1]"], "data", "set every data.std value above 0"),
    (["data.clip=[1]"], "data.clip", "set data.clip: [low, high]"),
    (["data.resize=[0, 4]"], "data.resize", "set data.resize: [H, W]"),
    (["search.metric=[val_auc, val_loss]"], "search", "set search.algorithm: nsga2"),
    (["search.metric=my_score"], "search", "set search.mode: max or min"),
    (["search.algorithm=nsga2", "search.metric=[val_auc, val_loss]", "search.mode=[max]"], "search",
     "set search.mode to a list of 2"),
    (["task.type=clasification"], "task.type", "set task.type to one of 'classification', 'regression' or 'joint'"),
    (["scheduler.max_epochs=0"], "scheduler.max_epochs", "set scheduler.max_epochs to a number > 0"),
    (["search.num_samples=many"], "search.num_samples", "set search.num_samples to a whole number"),
    (["resources.workers=1.5"], "resources.workers", "set resources.workers to a whole number"),
    (["name=bad name!"], "name", "set name to letters, digits"),
    (["params.depth={type: randin, low: 1, high: 2}"], "params.depth", "set type to one of"),
    (["params.depth={low: 1, high: 2}"], "params.depth", "add type: one of"),
    (["params.detph=2"], "params.detph", "remove it or fix its name"),
    (["params.depth=0"], "params.depth", "set params.depth to a number >= 1"),
    (["params.pool=tokens"], "params.pool", "set params.pool to one of 'token', 'avg' or 'map'"),
    (["params.loss=mse"], "params.loss", "set params.loss to one of"),
    (["family=vitt"], "family", "set family to one of"),
    (["family={type: choice, values: [vit, deepsets]}"], "family.values.1", "remove 'deepsets' or 'vit' from family.values"),
    (["params.patch_size={type: grid, values: [2, 4, 8]}"], "search.num_samples", "raise search.num_samples to at least 3"),
    (["params.depth={type: choice, values: [1, 2], when: {drop_path: 0.1}}"], "params.depth.when.drop_path",
     "make params.drop_path a choice"),
    (["params.depth={type: choice, values: [1, 2], when: {pool: token}}", "params.pool={type: choice, values: [token],"
      " when: {depth: 1}}"], "params.", "remove one of these conditions"),
    (["data.generate={recipe: toy_jets, channels: [a]}"], "data.generate", "set data.generate.channels: 3"),
    (["data.generate={recipe: top_vs_qcd, channels: 5}"], "data.generate", "set data.generate.channels: [ECAL, HCAL, Tracks]"),
    (["data.generate={recipe: top_vs_qcd, seed: 0}"], "data.generate", "set data.generate.seed: 1 or more"),
    (["data.path"], "--set", "write it as --set key.sub=value"),
    (["data path=x.h5"], "--set", "write it as --set section.key=value"),
    (["name.sub=1"], "name", "set it as a whole (--set name=...)"),
])
def test_messages_name_the_key_and_the_fix(ws, capsys, sets, key, fix):
    line = run_broken(ws, capsys, base_cfg(), key, fix, cmd="validate", sets=tuple(sets))
    assert " (--set" in line


@pytest.mark.parametrize("argv, flag, fix", [
    (["best", "exp", "--top", "0", "--tracking-uri", "sqlite:///store.db"], "--top", "use --top 1 or more"),
    (["ui", "--port", "70000", "--tracking-uri", "sqlite:///store.db"], "--port", "use a free port, e.g. --port 5000"),
    (["data", "generate", "boosted_scalar", "--n", "4", "--out", "x.h5", "--mass-range", "50"], "--mass-range",
     "use --mass-range 50,200"),
])
def test_cli_flag_messages_name_the_fix(ws, capsys, argv, flag, fix):
    Path("store.db").write_bytes(b"")  # an existing (empty) store file: the flag is checked next
    bad_run(ws, capsys, argv, flag, fix)


def test_ui_on_a_port_in_use_is_one_line(ws, capsys):
    """Issue 30, kind 9: another program listens on the port: refused before anything starts (MLflow's server
    would fail after the link was printed, and the link would open the other program)."""
    import socket

    Path("store.db").write_bytes(b"")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = bad_run(ws, capsys, ["ui", "--port", str(port), "--tracking-uri", "sqlite:///store.db"], "--port",
                       f"port {port} on 127.0.0.1 is in use", f"--port {port + 1}")
    assert "MLflow UI on" not in line


# Case 11: narrowing a dimension makes its dependants inactive (one note on stderr), it does not refuse.
def _windowed() -> dict:
    cfg = base_cfg()
    cfg["params"]["attention"] = {"type": "choice", "values": ["softmax", "linear", "window"]}
    cfg["params"]["window_size"] = {"type": "grid", "values": [2, 3, 4], "when": {"attention": "window"}}
    cfg["search"]["num_samples"] = 3
    return cfg


@pytest.mark.parametrize("cmd", [["validate"], ["run", "--dry-run"]], ids=["validate", "dry-run"])
def test_narrowed_condition_makes_its_parameter_inactive(ws, capsys, cmd):
    path = write_yaml(_windowed())
    rc, out, err = cli([cmd[0], path, *cmd[1:], "--set", "params.attention=softmax",
                        "--set", "search.num_samples=2"], capsys)  # the 3 window sizes are no grid to queue now
    assert rc == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and "note: params.window_size is ignored" in lines[0], err
    assert "attention: window never holds" in lines[0] and "(--set params.attention)" in lines[0]
    assert not (ws / "e2e_runs").exists()


def test_inactive_parameter_is_never_drawn(ws):
    import optuna

    from e2e_search.spec.loader import load
    from e2e_search.spec.params import OptunaSpace, grid_points

    cfg = load(write_yaml(_windowed()), ["params.attention={type: choice, values: [softmax, linear]}"])
    assert grid_points(cfg) == [] and len(cfg.notes) == 1
    space = OptunaSpace(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(8):
        t = study.ask()
        space(t)
        drawn.append(t.params)
        study.tell(t, 0.0)
    assert all("window_size" not in p and p["attention"] in ("softmax", "linear") for p in drawn)


@pytest.mark.parametrize("when, key, words", [
    ({"attention": "windw"}, "params.window_size.when.attention", ("never takes the value 'windw'",
                                                                    "did you mean 'window'?")),
    ({"atention": "window"}, "params.window_size.when.atention", ("not in params", "did you mean 'attention'?")),
])
def test_condition_typos_are_still_errors(ws, capsys, when, key, words):
    cfg = _windowed()
    cfg["params"]["window_size"]["when"] = when
    run_broken(ws, capsys, cfg, key, *words, cmd="validate")


def test_family_condition_checks_values_against_that_family_only(ws, capsys):
    cfg = base_cfg()
    cfg["family"] = {"type": "choice", "values": ["vit", "swin"]}
    cfg["params"] = {"batch_size": 8, "pool": {"type": "choice", "values": ["token", "avg"], "when": {"family": "vit"}}}
    rc, out, err = cli(["validate", write_yaml(cfg)], capsys)
    assert rc == 0, err  # swin's pool (avg | max) never sees 'token'
    del cfg["params"]["pool"]["when"]
    run_broken(ws, capsys, cfg, "params.pool", "family 'swin' does not take 'token'", "with when: {family: [...]}",
               cmd="validate")


def test_conditional_constant_and_a_dimension_without_type(ws, capsys):
    """{value: ..., when: ...} is a constant for the families the condition names; {values: [...]} without a
    type is refused with the types to choose from."""
    cfg = base_cfg()
    cfg["family"] = {"type": "choice", "values": ["vit", "resnet15"]}
    cfg["params"] = {"batch_size": 8, "mlp_ratio": {"value": 2.0, "when": {"family": "vit"}}}
    from e2e_search.spec.dims import FixedDim
    from e2e_search.spec.loader import load

    dim = load(write_yaml(cfg)).params["mlp_ratio"]
    assert isinstance(dim, FixedDim) and dim.value == 2.0 and dim.when == {"family": "vit"}
    cfg["params"]["mlp_ratio"] = {"values": [2.0, 4.0]}
    run_broken(ws, capsys, cfg, "params.mlp_ratio", "needs 'type'", "{value: ..., when: {...}}", cmd="validate")


# Case 14: duplicate keys are refused with both lines (yaml.safe_load keeps the last one silently).
def test_duplicate_param_key(ws, capsys):
    text = yaml.safe_dump(base_cfg(), sort_keys=False)  # a search dimension params.lr, then a fixed lr
    Path(YAML).write_text(text.replace("  batch_size: 8\n", "  batch_size: 8\n  lr: 0.5\n"))
    lines = Path(YAML).read_text().splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("  lr:")) + 1
    second = next(i for i, ln in enumerate(lines) if ln == "  lr: 0.5") + 1
    for cmd in ("validate", "run"):
        bad_run(ws, capsys, [cmd, YAML], YAML, "params.lr", f"on lines {first} and {second}",
                f"delete line {first} or line {second}")


@pytest.mark.parametrize("text, key, where", [
    ("name: a\nname: b\n", "name", "on lines 1 and 2"),
    ("task: {type: classification, type: regression}\n", "task.type", "on line 1 (columns 8 and 30)"),
    ("params:\n  depth:\n    type: choice\n    values: [1]\n    values: [2]\n", "params.depth.values", "on lines 4 and 5"),
])
def test_duplicate_keys_anywhere(ws, capsys, text, key, where):
    Path(YAML).write_text(text)
    bad_run(ws, capsys, ["validate", YAML], YAML, f"{key}: this key is given twice", where)


def test_duplicate_key_in_a_set_value(ws, capsys):
    run_broken(ws, capsys, base_cfg(), "--set", "params.depth", "gives 'values' twice", cmd="validate",
               sets=("params.depth={type: choice, values: [1], values: [2]}",))


def test_merge_keys_may_still_be_overridden(ws, capsys):
    text = yaml.safe_dump(base_cfg(), sort_keys=False).replace(
        "  lr:\n", "  lr: &lr\n").replace("  batch_size: 8\n", "  batch_size: 8\n  weight_decay:\n    <<: *lr\n"
                                          "    low: 1.0e-3\n")
    Path(YAML).write_text(text)
    from e2e_search.spec.loader import load

    cfg = load(YAML)
    assert cfg.params["weight_decay"].low == 1.0e-3 and cfg.params["weight_decay"].high == 1.0e-2


def test_narrowing_a_family_search_to_one_family(ws, capsys):
    cfg = base_cfg()
    cfg["family"] = {"type": "grid", "values": ["vit", "resnet15"]}
    cfg["params"] = {"batch_size": 8, "patch_size": {"type": "choice", "values": [4, 8], "when": {"family": "vit"}},
                     "width": {"type": "choice", "values": [8, 16]},                          # resnet15's own
                     "lr": {"type": "choice", "values": [0.01, 0.1], "when": {"family": "resnet15"}}}
    path = write_yaml(cfg)
    rc, out, err = cli(["validate", path, "--set", "family=vit"], capsys)
    assert rc == 0, err
    notes = err.splitlines()
    assert len(notes) == 2 and all("(--set family): note: params." in n for n in notes), err
    assert "params.width is ignored: it is a parameter of resnet15" in notes[0]
    assert "params.lr is ignored: its condition family: resnet15 never holds" in notes[1]
    from e2e_search.spec.loader import load

    narrowed = load(path, ["family=vit"])
    assert narrowed.family.values == ["vit"] and narrowed.family.type == "grid"


def _bad_values(field) -> list:
    """Values a field's own constraints refuse (bounds, Literal choices, type)."""
    import typing

    out = []
    for m in field.metadata:
        for name, delta in (("gt", 0), ("ge", -1), ("lt", 0), ("le", 1)):
            bound = getattr(m, name, None)
            if bound is not None:
                out.append(bound + delta)
    args = [a for a in typing.get_args(field.annotation) if typing.get_origin(a) is typing.Literal] or \
        ([field.annotation] if typing.get_origin(field.annotation) is typing.Literal else [])
    if args:
        out.append("no-such-choice")
    return out


def _walk_fields():
    """(dotted key, bad value) for every constrained key of the YAML sections (pydantic's own checks)."""
    from e2e_search.spec.schema import DataConfig, GenerateConfig, ResourcesConfig, SchedulerConfig, SearchConfig

    for section, model in (("search", SearchConfig), ("scheduler", SchedulerConfig), ("resources", ResourcesConfig),
                           ("data", DataConfig), ("data.generate", GenerateConfig)):
        for name, field in model.model_fields.items():
            for v in _bad_values(field):
                yield f"{section}.{name}", v


@pytest.mark.parametrize("key, value", list(_walk_fields()), ids=lambda x: str(x))
def test_every_constrained_key_names_the_key_and_a_fix(tmp_path, key, value):
    from e2e_search.spec.loader import validate
    from trainables.errors import UserError

    raw = base_cfg()
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    with pytest.raises(UserError) as e:
        validate(raw, source="space.yaml")
    line = str(e.value)
    assert key in line and "\n" not in line, line
    assert any(w in e.value.message for w in ("; set ", "; lower ", "; raise ", "; use ", "; give ", "; remove ")), line


# --- issue 13: search metric (found by trying the product as a new user)
@pytest.mark.parametrize("metric, task, named", [
    ("val_auc_typo", "classification", "did you mean 'val_auc'?"),
    ("val_mae", "classification", "set search.metric to one of"),
    ("val_auc", "regression", "set search.metric to one of"),
])
def test_unknown_search_metric_refused_before_ray(ws, capsys, metric, task, named):
    """A metric the trials never report used to pass validate, then fail every trial inside Ray (exit 1,
    tracebacks, a trial's run left RUNNING)."""
    cfg = base_cfg()
    cfg["task"] = {"type": task} if task == "regression" else cfg["task"]
    cfg["search"]["metric"] = metric
    for cmd in ("validate", "run"):
        run_broken(ws, capsys, cfg, "search.metric", f"'{metric}'", named, cmd=cmd)


@pytest.mark.parametrize("shape, declared, other", [
    ((40, 3, 16, 16), "channels_last", "channels_first"),
    ((40, 16, 16, 2), "channels_first", "channels_last"),
    ((40, 3, 24, 32), "channels_last", "channels_first"),  # issue 30, kind 2: non-square images
    ((40, 24, 32, 3), "channels_first", "channels_last"),
])
def test_layout_that_reads_the_channel_axis_as_pixels(ws, capsys, shape, declared, other):
    """A channels-first file declared channels_last used to validate as 3x16 images with 16 channels."""
    write_h5(ws / H5, x_shape=shape)
    cfg = base_cfg()
    cfg["data"]["layout"] = declared
    for cmd in ("validate", "run"):
        run_broken(ws, capsys, cfg, "data.layout", f"set data.layout: {other}", cmd=cmd)


@pytest.mark.parametrize("where", ["dataset", "file"])
def test_layout_that_disagrees_with_the_files_own_attribute(ws, capsys, where):
    """Issue 30, kind 2: a (N, 16, 16, 16) file reads as 16x16 images either way; its `layout` attribute (on the
    image dataset, or on the file as `data generate` writes it) says channels_first: channels_last is refused."""
    write_h5(ws / H5, x_shape=(40, 16, 16, 16))
    with h5py.File(ws / H5, "a") as f:
        (f["X_jets"] if where == "dataset" else f).attrs["layout"] = "channels_first"
    for cmd in ("validate", "run"):
        run_broken(ws, capsys, base_cfg(), "data.layout", "the file says its images are stored channels_first",
                   "--set data.layout=channels_first", "data.layout_confirmed: true", cmd=cmd)


@pytest.mark.parametrize("shape, attr", [((40, 3, 24, 32), None), ((40, 16, 16, 16), "channels_first")])
def test_an_odd_layout_confirmed_with_its_key(ws, capsys, shape, attr):
    """`data.layout_confirmed: true` keeps a layout the shape or the file's attribute argues against."""
    write_h5(ws / H5, x_shape=shape)
    if attr:
        with h5py.File(ws / H5, "a") as f:
            f.attrs["layout"] = attr
    cfg = base_cfg()
    cfg["data"]["layout_confirmed"] = True
    cfg["params"]["patch_size"] = 4 if shape[1] == 3 else cfg["params"].get("patch_size", 4)
    rc, out, err = cli(["validate", write_yaml(cfg)], capsys)
    assert rc == 0, err


def test_labels_counted_from_one(ws, capsys):
    """Labels 1/2 used to get "set task.num_classes: 3", after which every class 0 sample was missing."""
    write_h5(ws / H5, labels=(np.arange(40) % 2 + 1).astype(np.int64))
    for cmd in ("validate", "run"):
        run_broken(ws, capsys, base_cfg(), "data.label_key", "class indices start at 0", "relabel them 0..1", cmd=cmd)


# --------------------------------------------------------------------------- issue 18: searchers and schedulers
@pytest.mark.parametrize("sets, named", [
    # CMA-ES cannot sample a categorical dimension: the dimension is named and tpe suggested.
    # Every categorical dimension is listed in the one line (fixing them takes one edit, not one run each).
    (["search.algorithm=cmaes"], ("params.patch_size", "CMA-ES", "search.algorithm: tpe")),
    (["search.algorithm=cmaes", "params.embed_dim={type: choice, values: [32, 64]}"],
     ("params.patch_size (a choice of 2 values), params.embed_dim (a choice of 2 values)", "fix each")),
    (["search.algorithm=cmaes", "params.patch_size=4", "family={type: choice, values: [vit, cait]}"],
     ("family", "CMA-ES", "search.algorithm: tpe")),
    # PBT mutates continuous lr / weight_decay / drop_path: none in the space is refused.
    (["scheduler.type=pbt", "scheduler.max_epochs=4", "params.lr=0.001", "params.drop_path=0.1"],
     ("scheduler.type", "PBT", "params.lr: {type: loguniform")),
    (["scheduler.type=pbt", "scheduler.max_epochs=4", "resources.workers=2"], ("resources.workers", "PBT")),
    (["scheduler.type=pbt", "scheduler.max_epochs=4", "search.max_concurrent=1"], ("search.max_concurrent", "PBT")),
    # A check across a section's keys names every --set under it, not the first one only.
    (["scheduler.type=pbt", "scheduler.max_epochs=2", "scheduler.perturbation_interval=2"],
     ("scheduler", "set scheduler.perturbation_interval below 2",
      "(--set scheduler.type, --set scheduler.max_epochs, --set scheduler.perturbation_interval)")),
    (["search.warm_start={experiment: earlier}"], ("search.warm_start.experiment", "no experiment 'earlier'",
                                                   "remove search.warm_start")),
    (["search.warm_start={experiment: earlier, top: 0}"], ("search.warm_start.top",)),
])
def test_searcher_and_scheduler_refusals(ws, capsys, sets, named):
    """Issue 18: what a sampler or scheduler cannot do is one line and exit 2, before Ray (nothing written)."""
    for cmd in ("validate", "run"):
        run_broken(ws, capsys, base_cfg(), *named, cmd=cmd, sets=tuple(sets))


def test_warm_start_from_an_experiment_without_finished_trials(ws, capsys):
    """An existing store whose experiment holds no finished trial of this family: one line, exit 2."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ws / 'store.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("earlier", artifact_location=(ws / "art").as_uri())
    run = client.create_run(exp, tags={"e2e.kind": "trial", "e2e.family": "vit"})
    client.set_terminated(run.info.run_id, status="FAILED")
    cfg = base_cfg()
    cfg["tracking"] = {"uri": uri}
    cfg["search"]["warm_start"] = {"experiment": "earlier"}
    capsys.readouterr()  # MLflow's notes while this test made the store
    run_broken(ws, capsys, cfg, "search.warm_start.experiment", "no finished trial", cmd="run")


# --------------------------------------------------------------------------- hit_transformer (issue 26)
def _hit_cfg(**params) -> dict:
    cfg = base_cfg()
    cfg["family"] = "hit_transformer"
    cfg["params"] = {"lr": 1e-3, "batch_size": 8, "depth": 1, "embed_dim": 16, **params}
    return cfg


@pytest.mark.parametrize("params,names", [
    ({"max_hits": 0}, ("params.max_hits", ">= 1")),
    ({"max_hits": {"type": "choice", "values": [16, -3]}}, ("params.max_hits", ">= 1")),
    ({"merge": 17}, ("params.merge", "merge 17 is larger than the image", "at most 16")),
    ({"merge": {"type": "choice", "values": [1, 40]}}, ("params.merge", "merge 40", "remove 40")),
], ids=["cap-0", "cap-negative-choice", "merge-17", "merge-choice-40"])
def test_hit_transformer_bad_cap_and_merge_are_refused_before_ray(ws, capsys, params, names):
    run_broken(ws, capsys, _hit_cfg(**params), *names, cmd="run")


def test_an_object_list_file_given_to_the_hit_family_is_refused(ws, capsys):
    with h5py.File(ws / "objects.h5", "w") as f:
        f["X_objects"] = np.zeros((20, 6, 4), np.float32)
        f["y"] = np.arange(20) % 2
    cfg = _hit_cfg()
    cfg["data"].update(path="objects.h5", image_key="X_objects")
    run_broken(ws, capsys, cfg, "data.image_key", "objects family", cmd="run")


# --------------------------------------------------------------------------- dimension values (issue 30, kind 4)
@pytest.mark.parametrize("dim,names", [
    ({"type": "loguniform", "low": 1e-4, "high": float("inf")}, ("params.lr", "finite")),
    ({"type": "uniform", "low": float("-inf"), "high": 0.1}, ("params.lr", "finite")),
    ({"type": "quniform", "low": 1e-4, "high": 1e-2, "q": float("nan")}, ("params.lr", "finite")),
], ids=["loguniform-inf", "uniform-neg-inf", "quniform-nan-q"])
def test_ranges_must_be_finite_before_ray(ws, capsys, dim, names):
    cfg = base_cfg()
    cfg["params"]["lr"] = dim
    run_broken(ws, capsys, cfg, *names, cmd="run")


@pytest.mark.parametrize("dim", [{"type": "quniform", "low": 1, "high": 3, "q": 0.3},
                                 {"type": "quniform", "low": 1.5, "high": 3, "q": 1}], ids=["q-0.3", "low-1.5"])
def test_quniform_fractions_on_an_integer_parameter_are_refused(ws, capsys, dim):
    cfg = base_cfg()
    cfg["params"]["depth"] = dim
    run_broken(ws, capsys, cfg, "params.depth.q", "whole numbers", cmd="run")


# --------------------------------------------------------------------------- YAML aliases (issue 30, kind 3)
def test_a_set_on_an_aliased_value_changes_only_that_key(ws, capsys):
    """lr: &r {...} and weight_decay: *r load as one object; --set params.lr.low must not move weight_decay."""
    text = Path(write_yaml(base_cfg())).read_text().replace(
        "  lr:\n    type: loguniform\n    low: 0.0001\n    high: 0.01\n",
        "  lr: &r\n    type: loguniform\n    low: 0.0001\n    high: 0.01\n  weight_decay: *r\n")
    assert "*r" in text
    Path(YAML).write_text(text)
    from e2e_search.spec.loader import apply_overrides, read_yaml

    raw = read_yaml(YAML)
    apply_overrides(raw, ["params.lr.low=1.0e-5"], source=YAML)
    assert raw["params"]["lr"]["low"] == 1e-5 and raw["params"]["weight_decay"]["low"] == 1e-4


def test_a_recursive_alias_is_one_line(ws, capsys):
    Path(YAML).write_text(Path(write_yaml(base_cfg())).read_text() + "loop: &a [1, *a]\n")
    bad_run(ws, capsys, ["validate", YAML], YAML, "alias")


def test_nan_outside_the_statistics_sample_is_refused_before_ray_with_a_memory_cache(ws, capsys):
    """Issue 30, kind 10: with data.cache: memory a NaN in an image the statistics sample did not read used to fail
    every trial with a non-finite loss after training started; the images a memory cache holds are checked first."""
    from e2e_search.data.inspect import inspect
    from e2e_search.spec.loader import validate

    cfg = base_cfg()
    cfg["data"]["cache"] = "memory"
    cfg["data"]["stats_samples"] = 4
    setup = inspect(validate(cfg, source=YAML))
    val_row = setup.val[0]  # validation rows are never in the statistics sample (drawn from training rows)
    with h5py.File(ws / H5, "a") as f:
        x = f["X_jets"][val_row]
        x[0, 0, 0] = np.nan
        f["X_jets"][val_row] = x
    for cmd in ("validate", "run"):
        run_broken(ws, capsys, cfg, "data.image_key", "NaN or Inf", cmd=cmd)


@pytest.mark.parametrize("how", ["env", "flag"])
def test_a_ray_address_nothing_answers_at_is_one_line(ws, capsys, monkeypatch, how):
    """Issue 30, kind 5: RAY_ADDRESS (Ray's convention inside a job or on a head node) or --address naming a dead
    cluster used to end in Ray's traceback about num_cpus; refused before anything starts."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["run", write_yaml(base_cfg())]
    if how == "env":
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    else:
        argv += ["--address", f"127.0.0.1:{port}"]
    line = bad_run(ws, capsys, argv, "RAY_ADDRESS" if how == "env" else "--address", "no Ray cluster answers")
    assert ("unset RAY_ADDRESS" in line) == (how == "env")


@pytest.mark.parametrize("kind", ["external_link", "virtual", "filter"])
def test_hdf5_storage_features_that_cannot_be_read_are_one_line(ws, capsys, kind):
    """Issue 30, kind 1: an image dataset that is an external link to a missing file, a virtual dataset whose
    source is missing (h5py reads fill values, silently) or a dataset compressed with a filter this h5py lacks."""
    src = ws / "images.h5"
    with h5py.File(src, "w") as f:
        f["X"] = np.zeros((40, 16, 16, 2), np.float32)
    with h5py.File(ws / H5, "a") as f:
        del f["X_jets"]
        if kind == "external_link":
            f["X_jets"] = h5py.ExternalLink("images.h5", "X")
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=(40, 16, 16, 2), dtype=np.float32)
            layout[:] = h5py.VirtualSource("images.h5", "X", shape=(40, 16, 16, 2))
            f.create_virtual_dataset("X_jets", layout)
        else:  # blosc's id, written without data (so no filter runs): what a file from elsewhere looks like here
            f.create_dataset("X_jets", shape=(40, 16, 16, 2), dtype=np.float32, chunks=(1, 16, 16, 2),
                             compression=32001, allow_unknown_filter=True)
    if kind != "filter":
        src.unlink()  # the linked / source file is gone
    says = {"external_link": "external link to 'X' in 'images.h5'", "virtual": "source file 'images.h5' is missing",
            "filter": "filter 32001"}[kind]
    run_broken(ws, capsys, base_cfg(), "data.image_key", says, cmd="validate")


def test_a_tmpdir_too_long_for_rays_sockets_is_one_line(ws, capsys, monkeypatch):
    """Issue 30, kind 5: a long TMPDIR made Ray's socket paths pass 107 bytes: a traceback from Ray's start."""
    long = ws / ("t" * 60)
    long.mkdir()
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(long))
    bad_run(ws, capsys, ["run", write_yaml(base_cfg())], "TMPDIR", "RAY_TMPDIR=/tmp", "107")


def test_an_open_file_limit_ray_cannot_live_with_is_one_line(ws):
    """Issue 30, kind 5: `ulimit -n 64` gave Raylet errors and exit 1 after 32 s with no line saying why."""
    import resource
    import subprocess
    import sys

    path = write_yaml(base_cfg())
    out = subprocess.run([sys.executable, "-m", "e2e_search.cli", "run", path], cwd=ws, capture_output=True, text=True,
                         timeout=120, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "ulimit -n" in lines[0] and "64 open files" in lines[0], lines
    assert not (ws / "e2e_runs").exists()
