"""The one rule for "the best" (mmim.core.selection): lower MAE or higher Corr wins, and a tie
goes to the earlier candidate, wherever a choice is made: the epochs of one process, of a Ray run,
of a seed or a trial, the seeds of a run, the trials of a search, the versions in the registry."""

import math

import pandas as pd
import pytest

from mmim.cluster.seeds import pick_seed
from mmim.cluster.tune import TrialSummary, best_trial, selected_report
from mmim.core.selection import SELECTION, Rule
from mmim.training.engine import EpochRecord, ModelSelection
from mmim.training.train import TrainingResult


def test_the_rule_prefers_the_better_figure_and_the_earlier_of_equals():
    assert SELECTION.key == "valid_MAE" and SELECTION.mode == "min"
    assert SELECTION.best_index([0.5, 0.4, 0.4, 0.6]) == 1
    assert Rule("Corr").best_index([0.5, 0.7, 0.7]) == 1 and Rule("Corr").mode == "max"
    assert SELECTION.best_index([math.nan, 0.9, math.nan]) == 1  # an epoch with no figure never wins
    assert not SELECTION.beats(0.45, 0.5, margin=0.1) and SELECTION.beats(0.35, 0.5, margin=0.1)
    with pytest.raises(ValueError, match="MAE or Corr"):
        Rule("Acc-7")


def record(epoch: int, mae: float) -> EpochRecord:
    return EpochRecord(epoch, {}, {}, {}, {"MAE": mae, "loss": mae}, {"MAE": mae}, 1.0)


def test_one_process_keeps_the_first_of_equal_epochs():
    selection = ModelSelection(patience=5)
    assert [selection.update(record(epoch, mae)) for epoch, mae in [(1, 0.5), (2, 0.5), (3, 0.4), (4, 0.4)]] == [
        True,
        False,
        True,
        False,
    ]
    assert selection.best is not None and selection.best.epoch == 3 and selection.patience_left == 4


def test_a_trial_or_seed_selects_the_first_of_equal_epochs_from_its_reports():
    # epoch 2 reported twice (a restart): its latest report counts; epochs 1 and 3 tie after it
    frame = pd.DataFrame(
        {"epoch": [1, 2, 2, 3], "valid_MAE": [0.4, 0.3, 0.5, 0.4], "checkpoint_dir_name": list("abcd")}
    )
    assert selected_report(frame)["checkpoint_dir_name"] == "a"


def result(mae: float) -> TrainingResult:
    return TrainingResult([], {"valid_MAE": mae}, checkpoint=None, stopped_early=False)  # type: ignore[arg-type]


def test_equal_seeds_give_the_one_listed_first_and_equal_trials_the_one_created_first():
    trained = {1111: result(0.6), 1113: result(0.5), 1112: result(0.5)}
    assert pick_seed(trained, [1111, 1113, 1112]) == 1113 and pick_seed(trained, [1112, 1113, 1111]) == 1112
    trials = [
        TrialSummary(f"abc_0000{i}", "finished", {}, 2, mae, 1, None) for i, mae in [(2, 0.5), (0, 0.7), (1, 0.5)]
    ]
    assert best_trial(trials).trial_id == "abc_00001"
