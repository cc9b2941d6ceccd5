"""What the libraries we call may print on a terminal that a person reads (`mmim`, the flow)."""

from __future__ import annotations

import os
import warnings

import transformers


def quiet_libraries() -> None:
    """No per-file progress bars or hints from the libraries we call."""
    # MLflow's artifact download bars and its integer-column schema hint (class7 is an int).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
