"""Issue 30, kind 7: a full disk. Too little room where a search writes is refused before Ray; a disk that fills
during the search fails the trials it hits (their runs closed FAILED, never a champion), the search ends with
exit 1 and one line, and the store stays readable. Real tmpfs mounts (skipped where mounting is not allowed)."""

from __future__ import annotations

import errno
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from e2e_search.cli import main
from e2e_search.search.disk import MIN_FREE_BYTES, is_disk_full
from tests.conftest import base_config, write_e2e, write_yaml


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs folder of ``size`` MiB, unmounted at the end."""
    mounted: list[Path] = []

    def mount(size_mib: int) -> Path:
        where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:100]})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_what_counts_as_a_full_disk():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full("OSError: [Errno 28] No space left on device: '/x/checkpoint.pt'")
    assert is_disk_full("sqlite3.OperationalError: database or disk is full")
    assert not is_disk_full("RuntimeError: CUDA out of memory") and not is_disk_full(None)


@pytest.mark.parametrize("key", ["storage", "artifacts", "uri"])
def test_too_little_room_is_refused_before_ray(tmp_path, tmpfs, capsys, key):
    small = tmpfs(64)
    assert shutil.disk_usage(small).free < MIN_FREE_BYTES
    data = write_e2e(tmp_path / "jets.h5", n=40)
    cfg = base_config(tmp_path, data, name="room")
    cfg["tracking"][key] = f"sqlite:///{small}/mlflow.db" if key == "uri" else str(small / "sub")
    yml = write_yaml(tmp_path / "s.yaml", cfg)
    for cmd in ("validate", "run"):
        assert main([cmd, str(yml)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"tracking.{key}" in err[0] and "MiB free" in err[0] and "another disk" in err[0], err
    assert list(small.iterdir()) == []  # nothing written there


def test_room_is_measured_against_checkpoints_times_trials(tmp_path, tmpfs, capsys):
    """Free space is checked against what the search will write: checkpoints (weights and AdamW moments) x trials."""
    from e2e_search.search.disk import needs

    assert needs(10**6, 100)["storage"] == 100 * 2 * 12 * 10**6 and needs(10, 2)["storage"] == MIN_FREE_BYTES
    disk = tmpfs(400)
    data = write_e2e(tmp_path / "jets.h5", n=40)
    for trials, code in ((4, 0), (20000, 2)):
        cfg = base_config(tmp_path, data, name="room", search={"num_samples": trials})
        cfg["tracking"]["storage"] = str(disk / "ray")
        assert main(["validate", str(write_yaml(tmp_path / "s.yaml", cfg))]) == code
        err = capsys.readouterr().err.strip().splitlines()
        if code:
            assert len(err) == 1 and "tracking.storage" in err[0] and "this search needs about" in err[0], err


def _fill_after_first_trial(proc: subprocess.Popen, out: Path, disk: Path) -> None:
    """Fill ``disk`` once the search ``proc`` (stdout in ``out``) has finished a trial."""
    import time

    t0 = time.time()
    while "finished" not in out.read_text() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.5)
    with open(disk / "fill", "wb", buffering=0) as f:  # until the disk is full: the next checkpoint or row does not fit
        chunk = b"\0" * 2**20
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass


def _search(tmp_path: Path, name: str, tracking: dict) -> tuple[list[str], dict, str]:
    data = write_e2e(tmp_path / "jets.h5", n=200, size=16)
    cfg = base_config(tmp_path, data, name=name, search={"num_samples": 5, "seed": 0},
                      scheduler={"type": "none", "max_epochs": 3})
    cfg["tracking"].update(tracking)
    yml = write_yaml(tmp_path / f"{name}.yaml", cfg)
    import os
    import sys

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return [sys.executable, "-m", "e2e_search.cli", "run", str(yml)], env, cfg["tracking"]["uri"]


def _runs(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id])
    return c, [r for r in runs if r.data.tags.get("e2e.kind") == "search"], [
        r for r in runs if r.data.tags.get("e2e.kind") == "trial"]


@pytest.mark.slow  # a real search on a disk filled under it (~80 s)
def test_checkpoints_disk_filling_mid_search(tmp_path, tmpfs):
    """Ray's storage fills after the first trial: the trials it hits fail (closed FAILED, never the champion), the
    others are kept, every run is closed, and the search ends with exit 1 and one line naming the cause."""
    disk = tmpfs(300)
    cmd, env, uri = _search(tmp_path, "fullray", {"storage": str(disk / "ray")})
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=tmp_path)
        _fill_after_first_trial(proc, out, disk)
        assert proc.wait(timeout=600) == 1
    last = err.read_text().strip().splitlines()[-1]
    assert last.startswith("error: a disk ran full during the search") and "No space left on device" in last, last
    client, parents, trials = _runs(uri, "fullray")
    assert len(parents) == 1 and parents[0].info.status != "RUNNING"
    assert all(t.info.status in ("FINISHED", "FAILED") for t in trials) and len(trials) == 5
    failed = [t for t in trials if t.info.status == "FAILED"]
    assert failed and all("No space left on device" in t.data.tags.get("e2e.error", "") or
                          "could not be kept" in t.data.tags.get("e2e.error", "") for t in failed)
    for m in client.search_registered_models():  # a champion, if any, is a finished trial with its checkpoint
        v = client.get_model_version_by_alias(m.name, "champion")
        champ = next(t for t in trials if t.info.run_id == v.run_id)
        assert champ.info.status == "FINISHED" and "e2e.checkpoint" in champ.data.tags


@pytest.mark.slow  # a real search, its store's disk filled under it, then resumed (~100 s)
def test_store_disk_filling_mid_search_then_resume(tmp_path, tmpfs):
    """The MLflow store's disk fills: the search stops with exit 1 and one line (no tracebacks); once there is
    room, `resume` records the rest and closes every run."""
    disk = tmpfs(300)
    cmd, env, uri = _search(tmp_path, "fullstore", {"uri": f"sqlite:///{disk}/mlflow.db"})
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=tmp_path)
        _fill_after_first_trial(proc, out, disk)
        assert proc.wait(timeout=600) == 1
    text = err.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert text.strip().splitlines()[-1].startswith("error: the disk of the MLflow store"), text[-1000:]
    (disk / "fill").unlink()
    r = subprocess.run([cmd[0], "-m", "e2e_search.cli", "resume", "fullstore", "--tracking-uri", uri], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    _, parents, trials = _runs(uri, "fullstore")
    assert [p.info.status for p in parents] == ["FINISHED"] and len(trials) == 5
    assert all(t.info.status == "FINISHED" for t in trials)


def test_a_sparse_cache_to_build_needs_its_room(tmpfs):
    """The sparse cache a search builds before its first trial: its non-zero pixels (values and indices) x 2."""
    from e2e_search.search.disk import check_free_space, sparse_cache_bytes
    from trainables.data.setup import DataSetup
    from trainables.errors import UserError

    s = DataSetup(path="x.h5", image_key="X_jets", label_key="y", layout="channels_last", channels=[0, 1, 2],
                  in_chans=3, img_size=(125, 125), task="classification", num_classes=2, train=list(range(80_000)),
                  val=list(range(10_000)), test=list(range(10_000)), mean=None, std=None, fill=0.02, cache="sparse")
    need = sparse_cache_bytes(s)
    assert need == int(2 * 100_000 * 125 * 125 * 3 * 0.02 * 8)             # ~1.5 GB for 10^5 jets at 2% fill
    disk = tmpfs(300)
    with pytest.raises(UserError) as e:
        check_free_space({"data.cache": (disk / "cache", need)})
    assert "data.cache" in str(e.value) and "MiB free" in str(e.value)
    check_free_space({"data.cache": (disk / "cache", 10 * 2**20)})
