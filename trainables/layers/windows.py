"""Window grids of hierarchical (Swin, MaxViT, CoAtNet) transformers: the patch grid every stage tiles exactly."""

from __future__ import annotations

import math


def stage_windows(grid: int, window: int, stages: int) -> list[int] | None:
    """Window side per stage that tiles a grid of ``grid`` tokens exactly along one axis, or None."""
    if grid % 2 ** (stages - 1):  # every patch merging halves an even grid
        return None
    sides = []
    for i in range(stages):
        res = grid // 2**i
        fits = [w for w in range(window, math.ceil(window / 2) - 1, -1) if res % w == 0]
        if res > window and not fits:
            return None
        sides.append(res if res <= window else fits[0])
    return sides



def swin_grid(size: int, patch: int, window: int, stages: int) -> tuple[int, list[int]]:
    """Smallest patch grid >= ceil(size / patch) with exact windows at every stage, and those windows."""
    g = math.ceil(size / patch)
    while (sides := stage_windows(g, window, stages)) is None:  # terminates: multiples of window * 2^(stages-1) fit
        g += 1
    return g, sides
