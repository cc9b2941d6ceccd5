"""Frames at a fixed rate from events that do not fall one per frame."""

from __future__ import annotations

import numpy as np


def fill_gaps(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Rows not `present` take the nearest present row (the earlier one on a tie); with no
    present row at all, `values` come back as they are."""
    where = np.flatnonzero(present)
    if where.size == 0 or where.size == len(values):
        return values
    rows = np.arange(len(values))
    after = np.clip(np.searchsorted(where, rows), 0, where.size - 1)
    before = np.clip(after - 1, 0, where.size - 1)
    nearest = np.where(np.abs(rows - where[before]) <= np.abs(where[after] - rows), where[before], where[after])
    return values[nearest]
