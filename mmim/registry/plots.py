"""The two pictures a tracked run carries: learning curves and the test scatter (PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def learning_curves(path: Path, epochs: list[dict]) -> None:
    """Stage 1 loss, and valid and test MAE, per epoch."""
    steps = [int(e["epoch"]) for e in epochs]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(steps, [e["stage1_loss"] for e in epochs], marker="o", label="stage 1 loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    for split in ("valid", "test"):
        axes[1].plot(steps, [e[f"{split}_MAE"] for e in epochs], marker="o", label=f"{split} MAE")
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def scatter_on_test(path: Path, predictions: np.ndarray, truths: np.ndarray) -> None:
    """Predicted against true sentiment on the test split."""
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(truths, predictions, s=6, alpha=0.5)
    axis.plot([-3, 3], [-3, 3], color="grey", linewidth=1)
    axis.set_xlabel("true sentiment")
    axis.set_ylabel("predicted")
    axis.set_title("test split, selected epoch")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
