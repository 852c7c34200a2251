"""What the training core needs from whoever runs it.

Three implementations, one core:

- :class:`LocalSession` (here): in this process, no Ray; checkpoints kept in a folder. Tests and tools.
- ``TuneSession`` (trainables/trial.py): a one-worker trial inside the Ray Tune trial's own process.
- ``TrainSession`` (trainables/trial.py): one DDP rank of a Ray Train ``TorchTrainer``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from trainables.core.layout import epoch_dirname


class Session(Protocol):
    rank: int
    """This process's rank (0 for a one-worker trial)."""
    world: int
    """How many ranks train the trial together."""
    device: torch.device

    def prepare_model(self, model: torch.nn.Module, *, find_unused: bool) -> torch.nn.Module:
        """The model on ``device``, wrapped for data-parallel training when ``world`` > 1."""

    def prepare_loader(self, loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
        """The loader, each rank reading its share of the data when ``world`` > 1."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The folder of the trial's latest checkpoint to resume from (None: start from epoch 1)."""

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        """One epoch's metrics (every rank), with rank 0's checkpoint folder (persisted before this returns;
        the folder may be deleted afterwards)."""


class OneProcess:
    """What every one-process session shares: rank 0 of 1, the model moved to ``device``, loaders as they are."""

    rank, world = 0, 1
    device: torch.device

    def prepare_model(self, model: torch.nn.Module, *, find_unused: bool) -> torch.nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader


@contextlib.contextmanager
def as_folder(checkpoint) -> Iterator[Path | None]:
    """A Ray checkpoint (anything with ``as_directory()``) as a local folder while the block runs; None stays None."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield Path(d)


class LocalSession(OneProcess):
    """The core in this process, on one device: reports are kept in ``reports``, checkpoints copied to
    ``folder/epoch_<nnnn>``; ``resume`` starts from the latest of them."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", resume: bool = False):
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.resume = resume
        self.reports: list[tuple[dict[str, Any], Path | None]] = []

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = sorted(self.folder.glob("epoch_*")) if self.resume else []
        yield found[-1] if found else None

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        kept = None
        if checkpoint is not None:
            kept = self.folder / epoch_dirname(int(metrics["epoch"]))
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(checkpoint, kept)
        self.reports.append((dict(metrics), kept))
