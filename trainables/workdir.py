"""Where e2e-search keeps what it writes by default, relative to the working directory."""

from __future__ import annotations

from pathlib import Path

DEFAULT_WORKDIR = Path("e2e_runs")
"""Generated data, caches, the MLflow store, Ray results and reports, unless the YAML or a flag says otherwise."""


def cache_dir() -> Path:
    """Converted files (HDF5 caches of Parquet/ROOT/CSV inputs) and sparse caches."""
    return DEFAULT_WORKDIR / "cache"
