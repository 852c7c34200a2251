"""A data file's identity: a hash of its bytes, recorded on the search run and checked by ``e2e-search confirm``.

``file_hash(path)`` is ``blake2b:<32 hex>`` over the file's size and every byte (read in 8 MiB blocks, about
1 s per GB from the page cache); a file over ``FULL_LIMIT`` is hashed over its size and 1,024 blocks of 1 MiB
spread evenly through it (``blake2b-sampled:<32 hex>``), so a search on a very large file does not wait for a
full read. A search records the hash of ``data.path`` (the source the YAML names, before any conversion) in
the tag ``e2e.data_hash`` of its MLflow run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FULL_LIMIT = 8 * 2**30
_READ = 8 * 2**20
_SAMPLES, _SAMPLE = 1024, 2**20
TAG = "e2e.data_hash"


def file_hash(path: str | Path, full_limit: int = FULL_LIMIT) -> str:
    """The identity of the file at ``path`` (see the module's text). Raises OSError when it cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= full_limit:
            while block := f.read(_READ):
                h.update(block)
            return f"blake2b:{h.hexdigest()}"
        step = max(_SAMPLE, (size - _SAMPLE) // (_SAMPLES - 1))
        for offset in range(0, size, step):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
        f.seek(max(0, size - _SAMPLE))
        h.update(f.read(_SAMPLE))
    return f"blake2b-sampled:{h.hexdigest()}"


def data_hash(path: str | Path) -> str | None:
    """``file_hash`` of a data file, None when it is not a readable file (a folder, a missing path)."""
    try:
        return file_hash(path) if os.path.isfile(path) else None
    except OSError:
        return None
