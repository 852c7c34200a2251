"""A search on a real 2-node Ray cluster (two raylets on this machine) through ``--address``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import base_config, write_e2e, write_yaml
from tests.test_resume import trial_runs

HERE = Path(__file__).resolve().parent


@pytest.mark.slow  # ~2 min on 2 cores: run with -m slow
def test_search_on_a_two_node_cluster(tmp_path):
    """4 trials, 2 at a time, one Train worker each: the head fits one worker, the second node one, so
    trials run on both nodes; results and checkpoints land in the one storage path both nodes share."""
    data = write_e2e(tmp_path / "jets.h5", n=40)
    shared = tmp_path / "shared"
    cfg = base_config(tmp_path, data, name="twonode", search={"num_samples": 4, "max_concurrent": 2},
                      scheduler={"type": "none", "max_epochs": 2})
    cfg["tracking"]["storage"] = str(shared / "ray")
    yml = write_yaml(tmp_path / "s.yaml", cfg)
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(HERE / "two_node_search.py"), str(yml), str(out)], cwd=tmp_path,
                   check=True, timeout=1200)
    res = json.loads(out.read_text())
    assert res["rc"] == 0, res["output"]
    assert len(res["nodes"]) == 2
    assert res["workers"] >= 4 and sorted(res["worker_nodes"]) == sorted(res["nodes"]), res  # trials on both nodes
    client = MlflowClient(tracking_uri=cfg["tracking"]["uri"])
    parents, trials = trial_runs(client, "twonode")
    assert parents[0].info.status == "FINISHED"
    assert len(trials) == 4 and all(r.data.tags["e2e.status"] == "FINISHED" for r in trials)
    for r in trials:  # every trial's checkpoints in the shared storage
        tid = r.data.tags["e2e.trial_id"]
        ckpts = list((shared / "ray").glob(f"twonode-*/train/trial_{tid}/epoch_*/checkpoint.pt"))
        assert ckpts, tid
        assert r.data.tags["e2e.checkpoint"].startswith(str(shared))
