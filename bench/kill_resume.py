"""Kill the search driver at random points and resume: how many searches end clean.

Each round starts a fresh search (``e2e-search run``, its own local Ray, as a user would), sends the driver
and its Ray SIGKILL at a random moment, then runs ``e2e-search run --resume`` to the end (it continues the
interrupted search, or starts it anew when the kill came before Ray had saved anything) and checks the
MLflow record: the latest search run FINISHED with exactly ``num_samples`` trials, each FINISHED once with
every epoch logged, no run left RUNNING.

    .venv/bin/python bench/kill_resume.py --rounds 10 [--seed 0] [--max-kill-s 40]

Prints one line per round and the count of clean rounds. Runs in a scratch directory (``--workdir``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
NUM_SAMPLES, EPOCHS = 3, 2


def write_data(path: Path, n: int = 64, size: int = 16) -> None:
    import h5py

    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    x = rng.exponential(0.05, (n, size, size, 3)).astype(np.float32)
    x[y == 1, size // 2 - 2:size // 2 + 2, size // 2 - 2:size // 2 + 2, :] += 1.0  # a core the model can find
    with h5py.File(path, "w") as f:
        f["X_jets"], f["y"] = x, y


def config(work: Path, data: Path, name: str) -> Path:
    cfg = {
        "name": name, "family": "vit", "task": {"type": "classification", "num_classes": 2},
        "data": {"path": str(data), "val_fraction": 0.25, "test_fraction": 0.0},
        "params": {"lr": {"type": "loguniform", "low": 1e-3, "high": 3e-3}, "batch_size": 16, "patch_size": 4,
                   "depth": 1, "embed_dim": {"type": "choice", "values": [16, 32]}, "num_heads": 2},
        "search": {"num_samples": NUM_SAMPLES, "max_concurrent": 2, "seed": 0},
        "scheduler": {"type": "none", "max_epochs": EPOCHS},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "storage": str(work / "ray")},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "e2e_search.cli", *args], cwd=cwd, env=env,
                            stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def state(uri: str, name: str) -> tuple[str, list]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return "none", []
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = sorted((r for r in runs if r.data.tags.get("e2e.kind") == "search"), key=lambda r: r.info.start_time)
    if not parents:
        return "none", []
    stale = [p for p in parents[:-1] if p.info.status == "RUNNING"]
    latest = parents[-1]
    trials = [r for r in runs if r.data.tags.get("e2e.kind") == "trial"
              and r.data.tags.get("mlflow.parentRunId") == latest.info.run_id]
    return ("RUNNING (an older search)" if stale else latest.info.status), trials


def clean(uri: str, name: str) -> tuple[bool, str]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    status, trials = state(uri, name)
    tids = [r.data.tags.get("e2e.trial_id") for r in trials]
    problems = []
    exp = c.get_experiment_by_name(name)
    left = [r for r in c.search_runs([exp.experiment_id], max_results=1000) if r.info.status == "RUNNING"] if exp else []
    if left:
        problems.append(f"{len(left)} runs left RUNNING")
    if status != "FINISHED":
        problems.append(f"search run {status}")
    if len(trials) != NUM_SAMPLES or len(set(tids)) != len(tids):
        problems.append(f"{len(trials)} trial runs for {len(set(tids))} trials")
    for r in trials:
        if r.info.status != "FINISHED" or r.data.tags.get("e2e.status") != "FINISHED":
            problems.append(f"trial {r.data.tags.get('e2e.trial_id')} {r.info.status}/{r.data.tags.get('e2e.status')}")
            continue
        steps = {m.step for m in c.get_metric_history(r.info.run_id, "val_auc")}
        if steps != set(range(1, EPOCHS + 1)):
            problems.append(f"trial {r.data.tags.get('e2e.trial_id')} epochs {sorted(steps)}")
    return not problems, "; ".join(problems) or "clean"


def one_round(i: int, work: Path, data: Path, kill_at: float) -> bool:
    name = f"kill{i:02d}"
    yml = config(work, data, name)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    log = work / f"{name}.log"
    t0 = time.time()
    driver = cli("run", str(yml), cwd=work, log=log)
    while time.time() - t0 < kill_at and driver.poll() is None:
        time.sleep(0.2)
    finished_before = driver.poll() is not None
    if not finished_before:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    _, trials = state(uri, name)
    at_kill = {s: sum(1 for r in trials if r.data.tags.get("e2e.status") == s) for s in ("FINISHED", "RUNNING")}
    resumed = "-"
    if not finished_before:
        time.sleep(2)
        rc = cli("run", str(yml), "--resume", cwd=work, log=log).wait()
        resumed = f"rc {rc}"
    ok, why = clean(uri, name)
    print(f"round {i + 1:2d}: killed at {kill_at:5.1f}s ({at_kill['FINISHED']} trials finished, "
          f"{at_kill['RUNNING']} running{', search already done' if finished_before else ''}), resume {resumed}, "
          f"{time.time() - t0:5.0f}s in all: {'CLEAN' if ok else 'NOT CLEAN: ' + why}", flush=True)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-kill-s", type=float, default=5.0)
    ap.add_argument("--max-kill-s", type=float, default=40.0, help="about the length of an uninterrupted search")
    ap.add_argument("--workdir", help="scratch directory (default: a new temporary one, removed at the end)")
    a = ap.parse_args()
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="e2e_kill_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "jets.h5"
    write_data(data)
    rng = random.Random(a.seed)
    kills = [rng.uniform(a.min_kill_s, a.max_kill_s) for _ in range(a.rounds)]
    print(f"{a.rounds} rounds of a {NUM_SAMPLES}-trial, {EPOCHS}-epoch search (2 trials at a time), driver SIGKILLed "
          f"at a uniform random time in [{a.min_kill_s:g}, {a.max_kill_s:g}] s, then e2e-search run --resume; in {work}")
    n_clean = sum(one_round(i, work, data, k) for i, k in enumerate(kills))
    print(f"\n{n_clean} of {a.rounds} rounds ended clean")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if n_clean == a.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
