"""Shared fixtures: real HDF5 files written by the tests, a real local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def write_e2e(path: Path, *, n: int = 64, size: int = 16, channels: int = 3, layout: str = "channels_last",
              image_key: str = "X_jets", label_key: str = "y", seed: int = 0) -> Path:
    """A small learnable E2E-format file: class 1 has a bright centre, class 0 a bright corner."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.exponential(0.1, (n, size, size, channels)).astype(np.float32)
    c = size // 2
    X[y == 1, c - 2 : c + 2, c - 2 : c + 2, :] += 3.0
    X[y == 0, :4, :4, :] += 3.0
    if layout == "channels_first":
        X = np.ascontiguousarray(np.moveaxis(X, -1, 1))
    with h5py.File(path, "w") as f:
        f.create_dataset(image_key, data=X, chunks=(1, *X.shape[1:]), compression="gzip")
        f[label_key] = y.astype(np.int64)
        f["m0"] = (50 + 100 * y + rng.normal(0, 5, n)).astype(np.float32)
        f["m_true"] = f["m0"][...]
        f["pt"] = rng.uniform(400, 600, n).astype(np.float32)
    return path


def write_objects(path: Path, n: int = 60, seed: int = 0) -> Path:
    """Events as 6 objects x 4 features with a padding mask; class 1 has a harder leading object."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(0, 1, (n, 6, 4)).astype(np.float32)
    X[:, 0, 0] += 2.0 * y
    mask = np.ones((n, 6), np.uint8)
    mask[::3, 4:] = 0
    X[mask == 0] = 0
    with h5py.File(path, "w") as f:
        f["X_objects"], f["mask"], f["y"] = X, mask, y.astype(np.int64)
    return path


def base_config(tmp: Path, data_path: Path, **over) -> dict:
    cfg = {
        "name": "t",
        "family": "vit",
        "task": {"type": "classification", "num_classes": 2},
        "data": {"path": str(data_path), "val_fraction": 0.25, "test_fraction": 0.0},
        "params": {
            "lr": {"type": "loguniform", "low": 1e-3, "high": 3e-3},
            "batch_size": 16,
            "patch_size": 4,
            "depth": 1,
            "embed_dim": {"type": "choice", "values": [16, 32]},
            "num_heads": 2,
        },
        "search": {"num_samples": 2, "seed": 0},
        "scheduler": {"type": "none", "max_epochs": 2},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "storage": str(tmp / "ray"),
                     "artifacts": str(tmp / "artifacts")},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()
