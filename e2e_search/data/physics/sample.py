"""A sample: one Pythia 8 configuration, how many examples it yields and the selection applied to its events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from e2e_search.data.physics.clustering import Batch

COMMON = ["Beams:eCM = 13000.", "Print:quiet = on", "Next:numberCount = 0"]
"""Settings every sample starts from: 13 TeV pp collisions, quiet."""


@dataclass
class Sample:
    """One Pythia configuration and the selection applied to its events."""

    name: str
    settings: list[str]
    count: int
    select: Callable[[Batch], dict[str, np.ndarray]] | None
    """-> {"keep": bool mask over events, "jet": index of the chosen jet, "y": label, ...extra truth}; None for
    event_objects, whose events.event_rows selects itself."""
    extra: dict = field(default_factory=dict)
