"""The memory and disk a generated dataset needs, checked before generating it.

``data generate`` and a YAML's ``data.generate`` recipe call these before
simulating anything, so an output that cannot fit is refused in one line naming
the option to change and the numbers, instead of failing after minutes (or
allocating terabytes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from trainables.errors import UserError

SAFETY = 1.5
"""Margin on the callers' memory and disk estimates (compression varies with the images' occupancy)."""


def human(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def existing_folder(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (an output's folder may not exist yet)."""
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    return probe


def free_disk(out: Path) -> int:
    return int(shutil.disk_usage(existing_folder(out.parent)).free)


def check_disk(out: Path, need: float, *, what: str, key: str, fix: str) -> None:
    """Refuse when ``need`` bytes (before SAFETY) exceed the free space of ``out``'s file system."""
    free = free_disk(out)
    if need * SAFETY > free:
        raise UserError(f"{what} need about {human(need)} of disk, {human(free)} is free in "
                        f"{existing_folder(out.parent)}; {fix}", key=key)
