"""trainables without the search: ``train_one`` trains one family on one file in this process (no Ray, no
MLflow, nothing of e2e_search imported), and its checkpoint is what e2e-search's export reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_e2e

ROOT = Path(__file__).resolve().parent.parent


def test_train_one_trains_a_family_without_the_search(tmp_path):
    path = write_e2e(tmp_path / "jets.h5", n=96, size=16)
    code = f"""
import json, sys
from trainables import train_one
from trainables.data.images import setup_for_file

data = setup_for_file({str(path)!r}, val_fraction=0.25, test_fraction=0.0)
r = train_one("vit", {{"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2, "batch_size": 16, "lr": 3e-3}},
              data, epochs=3, out_dir={str(tmp_path / "out")!r})
print(json.dumps({{"best": r.best["val_auc"], "epoch": r.best["epoch"], "epochs": len(r.history),
                  "checkpoint": str(r.checkpoint), "last": r.last["epoch"],
                  "search": sorted(m for m in sys.modules if m.split(".")[0] in ("e2e_search", "ray", "mlflow"))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["search"] == []                      # no e2e_search, Ray or MLflow in the process
    assert r["epochs"] == 3 and r["last"] == 3 and 1 <= r["epoch"] <= 3
    assert r["best"] > 0.9                        # the toy classes are easy: the model learned them
    ckpt = Path(r["checkpoint"])
    assert ckpt.parent == tmp_path / "out" and (ckpt / "checkpoint.pt").is_file()

    from e2e_search.record.checkpoints import load_trained  # the search's tools read the checkpoint

    t = load_trained(ckpt / "checkpoint.pt", "standalone")
    assert t.family == "vit" and t.setup.in_chans == 3 and t.epoch == r["epoch"]


def test_setup_for_file_refuses_labels_that_are_not_classes(tmp_path):
    import h5py
    import numpy as np

    from trainables.data.images import setup_for_file
    from trainables.errors import UserError

    path = write_e2e(tmp_path / "jets.h5", n=16, size=8)
    with h5py.File(path, "a") as f:
        del f["y"]
        f["y"] = np.linspace(0.1, 0.9, 16)
    with pytest.raises(UserError) as e:
        setup_for_file(path)
    assert e.value.key == "data.label_key"
    s = setup_for_file(path, task="regression")
    assert s.task == "regression" and s.num_classes == 0 and 0.1 < s.target_mean < 0.9
