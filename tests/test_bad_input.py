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
    ([], "run,resume,validate,best"),
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


# --- issue 13: parameters, shapes, YAML
# Case 4: every family's build-time constraint on the data's shape is checked, for every value a dimension
# can take, at validate / --dry-run (e2e_search/shapes.py), naming params.<name> and the bad value(s).
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

    from e2e_search.config import load
    from e2e_search.params import OptunaSpace, grid_points

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
    from e2e_search.config import load

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
    from e2e_search.config import load

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
    from e2e_search.config import DataConfig, GenerateConfig, ResourcesConfig, SchedulerConfig, SearchConfig

    for section, model in (("search", SearchConfig), ("scheduler", SchedulerConfig), ("resources", ResourcesConfig),
                           ("data", DataConfig), ("data.generate", GenerateConfig)):
        for name, field in model.model_fields.items():
            for v in _bad_values(field):
                yield f"{section}.{name}", v


@pytest.mark.parametrize("key, value", list(_walk_fields()), ids=lambda x: str(x))
def test_every_constrained_key_names_the_key_and_a_fix(tmp_path, key, value):
    from e2e_search.config import validate
    from e2e_search.errors import UserError

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
