"""What a trial runs: the model families and their registry, the Ray-free training core, the data a trial
reads, and the Ray Tune trainables / Ray Train worker that run the core in a search (trainables/trial.py).

It imports nothing of ``e2e_search`` (the search around it); :func:`train_one` trains one family on one file
without a search (trainables/standalone.py). Layers and processes: docs/architecture.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainables.standalone import TrainResult, train_one

__all__ = ["TrainResult", "train_one"]


def __getattr__(name: str) -> Any:
    """``train_one`` and ``TrainResult`` on first use: importing the package stays free of torch."""
    if name in __all__:
        from trainables import standalone

        return getattr(standalone, name)
    raise AttributeError(f"module 'trainables' has no attribute {name!r}")
