"""Which one is best: the one rule for epochs, seeds, trials and registered versions.

    the figure     a validation figure: MAE (lower wins) or Corr (higher wins)
    a tie          goes to the earlier candidate: the earlier epoch, the seed listed first,
                   the trial created first, the version registered first. Equal is not
                   better, so an equal figure never replaces what is already selected.

Epochs, seeds and trials are chosen on validation MAE (`SELECTION`): the official
implementation's validation loss, which also drives its learning-rate scheduler and early
stopping, so the epoch a run keeps is the one its own schedule worked towards. Gating
(`tracking.metric`) compares two models that were each selected that way; it may compare
them on Corr instead, with the same directions and the same tie rule (`Rule("Corr")`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Rule:
    metric: str = "MAE"  # MAE or Corr

    def __post_init__(self) -> None:
        if self.metric not in ("MAE", "Corr"):
            raise ValueError(f"metric {self.metric!r}: MAE or Corr")

    @property
    def key(self) -> str:
        """The figure's name in an epoch's flat metrics: valid_MAE."""
        return f"valid_{self.metric}"

    @property
    def mode(self) -> Literal["min", "max"]:
        """As Ray Tune and Ray Train name the direction."""
        return "min" if self.metric == "MAE" else "max"

    def beats(self, candidate: float, incumbent: float, margin: float = 0.0) -> bool:
        """`candidate` is better than `incumbent` by more than `margin` (NaN never is)."""
        if math.isnan(candidate):
            return False
        if math.isnan(incumbent):
            return True
        return candidate < incumbent - margin if self.mode == "min" else candidate > incumbent + margin

    def best_index(self, figures: Sequence[float]) -> int:
        """The position of the best of `figures`, in the order the candidates came: the first of equals."""
        if not figures:
            raise ValueError("no candidates to choose from")
        best = 0
        for index in range(1, len(figures)):
            if self.beats(figures[index], figures[best]):
                best = index
        return best


SELECTION = Rule("MAE")  # epochs, seeds and trials
