"""Simulated physics data (Pythia 8 + FastJet through Ray tasks): physics sanity, determinism, bad input."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest

from e2e_search.cli import main
from e2e_search.data.physics.generate import GenSpec, generate


@pytest.fixture(scope="module")
def samples(tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("phys")
    out = {}
    for proc, n, extra in [("top_vs_qcd", 160, {}), ("quark_vs_gluon", 160, {}),
                           ("boosted_scalar", 120, {"mass_range": (50.0, 150.0), "per_mass": 20})]:
        out[proc] = d / f"{proc}.h5"
        generate(GenSpec(process=proc, n=n, out=str(out[proc]), seed=5, workers=2, **extra), progress=False)
    return out


def test_top_jet_mass_peaks_at_the_top_mass(samples):
    with h5py.File(samples["top_vs_qcd"]) as f:
        y, m0 = f["y"][:], f["m0"][:]
        assert f["X_jets"].shape == (160, 125, 125, 3) and f["X_jets"].chunks == (1, 125, 125, 3)
        assert f.attrs["channel_names"] == "ECAL,HCAL,Tracks" and f.attrs["seed"] == 5
    assert np.bincount(y).tolist() == [80, 80]
    assert 165 < np.median(m0[y == 1]) < 190
    assert np.median(m0[y == 0]) < 120


def test_gluon_jets_have_more_constituents(samples):
    with h5py.File(samples["quark_vs_gluon"]) as f:
        y, nc, parton = f["y"][:], f["n_constituents"][:], f["parton"][:]
    assert np.bincount(y).tolist() == [80, 80]
    assert set(np.abs(parton[y == 0])) <= {1, 2, 3, 4, 5} and set(parton[y == 1]) == {21}
    assert nc[y == 1].mean() > nc[y == 0].mean() + 5


def test_scalar_true_mass_correlates_with_jet_mass(samples):
    with h5py.File(samples["boosted_scalar"]) as f:
        m_true, m0 = f["m_true"][:], f["m0"][:]
    assert m_true.min() > 30 and m_true.max() < 190
    assert np.corrcoef(m_true, m0)[0, 1] > 0.6


def test_same_seed_gives_identical_bytes(tmp_path, ray_local):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"g{i}.h5")
        generate(GenSpec(process="quark_vs_gluon", n=12, out=str(paths[-1]), seed=77, workers=2, image_size=32,
                         channels=["Tracks", "ECAL"]), progress=False)
    x0, x1 = (h5py.File(p)["X_jets"][...] for p in paths)
    assert x0.shape == (12, 32, 32, 2) and x0.tobytes() == x1.tobytes() and x0.sum() > 0
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == hashlib.sha256(paths[1].read_bytes()).hexdigest()
    generate(GenSpec(process="quark_vs_gluon", n=12, out=str(tmp_path / "other.h5"), seed=78, workers=2,
                     image_size=32, channels=["Tracks", "ECAL"]), progress=False)
    assert h5py.File(tmp_path / "other.h5")["X_jets"][...].tobytes() != x0.tobytes()


def test_event_objects(tmp_path, ray_local):
    out = tmp_path / "ev.h5"
    generate(GenSpec(process="event_objects", n=40, out=str(out), seed=3, workers=2), progress=False)
    with h5py.File(out) as f:
        X, mask, y, flat = f["X_objects"][:], f["mask"][:], f["y"][:], f["X_features"][:]
    assert X.shape == (40, 6, 4) and flat.shape == (40, 21) and np.bincount(y).tolist() == [20, 20]
    assert mask[:, :4].all()  # a lepton, MET and at least two jets in every event
    assert (X[mask == 0] == 0).all() and np.isfinite(X).all()
    assert X[y == 1, 2:, 3].sum() > X[y == 0, 2:, 3].sum()  # top pairs carry more b tags


@pytest.mark.parametrize("args,key", [
    (["nope", "--n", "5"], "PROCESS"),
    (["top_vs_qcd", "--n", "0"], "--n"),
    (["top_vs_qcd", "--n", "5", "--seed", "0"], "--seed"),
    (["top_vs_qcd", "--n", "5", "--seed", "900000001"], "--seed"),
    (["top_vs_qcd", "--n", "5", "--channels", "ECAL,Muons"], "--channels"),
    (["boosted_scalar", "--n", "5", "--mass-range", "200,100"], "--mass-range"),
])
def test_generate_bad_input(tmp_path, monkeypatch, capsys, args, key):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "generate", *args, "--out", "out.h5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and "Traceback" not in err[0]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- issue 13, case 16
@pytest.mark.parametrize("process", ["top_vs_qcd", "quark_vs_gluon", "event_objects"])
def test_every_worker_count_keeps_the_classes_balanced(process):
    """Each class's count is spread over the tasks: any --n and --workers give half of each class (label 1 takes
    an odd one), no task gets more than one extra example of a class, and only tasks with work are started."""
    from e2e_search.data.physics.generate import work_plan
    from e2e_search.data.physics.processes import split_counts

    for n in range(2, 41):
        for workers in range(1, 13):
            plan = work_plan(GenSpec(process=process, n=n, out="x.h5", workers=workers))
            assert [sum(c[0] for c in plan), sum(c[1] for c in plan)] == [n // 2, n - n // 2]
            assert len(plan) == min(n, workers) and all(sum(c) > 0 for c in plan)
            for label in (0, 1):
                assert max(c[label] for c in plan) - min(c[label] for c in plan) <= 1
    assert split_counts([2, 2], 8)[:4] == [[1, 0], [1, 0], [0, 1], [0, 1]]  # the issue's --n 4 --workers 8
    assert work_plan(GenSpec(process="boosted_scalar", n=5, out="x.h5", workers=2)) == [[3], [2]]


def test_four_jets_on_eight_workers_are_two_top_and_two_qcd(tmp_path, monkeypatch, capsys, ray_local):
    """`data generate top_vs_qcd --n 4 --workers 8` wrote four top jets and no QCD jet."""
    monkeypatch.chdir(tmp_path)
    assert main(["data", "generate", "top_vs_qcd", "--n", "4", "--workers", "8", "--image-size", "16",
                 "--out", "n4.h5"]) == 0
    assert "keep 4 of the 8 workers busy" in capsys.readouterr().err
    with h5py.File(tmp_path / "n4.h5") as f:
        assert np.bincount(f["y"][:], minlength=2).tolist() == [2, 2]
        assert f["X_jets"].shape == (4, 16, 16, 3) and f.attrs["workers"] == 4
    out = tmp_path / "qg.h5"  # one Pythia sample kept per label: 3 + 3 over 4 tasks (2+2+1+1 before: 2 quarks)
    generate(GenSpec(process="quark_vs_gluon", n=6, out=str(out), workers=4, image_size=16), progress=False)
    with h5py.File(out) as f:
        assert np.bincount(f["y"][:], minlength=2).tolist() == [3, 3]


def test_disk_estimate_covers_what_generation_writes(tmp_path):
    """The disk checked before generating covers the task's shard plus the merged copy of it."""
    from dataclasses import asdict

    from e2e_search.data.physics.generate import needs, run_task

    s = GenSpec(process="top_vs_qcd", n=8, out=str(tmp_path / "x.h5"), image_size=64)
    tasks, memory, disk = needs(s)
    shard = tmp_path / "shard.h5"
    run_task(asdict(s), 0, [4, 4], str(shard))  # in this process, no Ray
    assert tasks == 1 and disk >= 2 * shard.stat().st_size
    assert memory >= 4 * 64 * 64 * 64 * 3 * 4  # a batch's images, several times


def test_generate_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["data", "generate", "top_vs_qcd", "--n", "5", "--out", str(blocker / "out.h5")]) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_searches_run_on_generated_files(samples, tmp_path, monkeypatch, ray_local):
    """The first issue's search, unchanged but for --set, on a classification and a regression file."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import base_config, write_yaml

    monkeypatch.chdir(tmp_path)
    cfg = base_config(tmp_path, "unset.h5", name="gen",
                      params={"patch_size": 25, "depth": 1, "embed_dim": 16, "num_heads": 2, "batch_size": 16},
                      search={"num_samples": 1}, scheduler={"type": "none", "max_epochs": 1})
    yml = write_yaml(tmp_path / "s.yaml", cfg)
    assert main(["run", str(yml), "--set", f"data.path={samples['top_vs_qcd']}"]) == 0
    assert main(["run", str(yml), "--set", f"data.path={samples['boosted_scalar']}", "--set", "task.type=regression",
                 "--set", "task.target=m_true", "--set", "name=gen_reg"]) == 0
    client = MlflowClient(cfg["tracking"]["uri"])
    for exp, metric in [("gen", "best_val_auc"), ("gen_reg", "best_val_mae")]:
        runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id],
                                  filter_string="tags.`e2e.kind` = 'trial'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED" and metric in runs[0].data.metrics
