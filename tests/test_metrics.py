"""Metrics against hand-computed values (see the comments for the arithmetic)."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from mmim.core.metrics import compute_metrics, over_seeds, pearson, weighted_f1

PREDICTIONS = [2.6, -0.4, 0.0, 1.2, -2.7]
TRUTHS = [3.0, 0.0, -0.5, 1.0, -2.2]


def test_hand_computed_example_with_ties_at_zero():
    m = compute_metrics(PREDICTIONS, TRUTHS)
    # |errors| = 0.4, 0.4, 0.5, 0.2, 0.5
    assert m["MAE"] == pytest.approx(0.4)
    # rounded: preds 3, -0, 0, 1, -3 vs truths 3, 0, -0, 1, -2 -> 4 of 5
    assert m["Acc-7"] == pytest.approx(0.8)
    # clipped to [-2, 2] first: -2.7 -> -2 matches -2.2 -> -2 -> 5 of 5
    assert m["Acc-5"] == pytest.approx(1.0)
    # has0: truth >= 0 = T T F T F, pred >= 0 = T F T T F (the 0.0 prediction counts as >= 0)
    assert m["Acc-2_has0"] == pytest.approx(0.6)
    # F1(T) = 2*2/(3+3), F1(F) = 2*1/(2+2), weighted by support 3 and 2 -> 0.6
    assert m["F1_has0"] == pytest.approx(0.6)
    # non0 drops the zero truth; the 0.0 prediction is "not > 0", like its truth -0.5
    assert m["Acc-2_non0"] == pytest.approx(1.0)
    assert m["F1_non0"] == pytest.approx(1.0)
    assert m["Corr"] == pytest.approx(np.corrcoef(PREDICTIONS, TRUTHS)[0, 1])


def test_all_truths_in_one_class():
    m = compute_metrics([0.5, -1.0, 2.0], [1.0, 2.0, 0.5])
    assert m["Acc-2_has0"] == pytest.approx(2 / 3)
    # only the positive class has support: F1 = 2*2/(2+3)
    assert m["F1_has0"] == pytest.approx(0.8)
    assert m["Acc-2_non0"] == pytest.approx(2 / 3)
    assert m["F1_non0"] == pytest.approx(0.8)


def test_all_truths_zero_has_no_non0_samples():
    m = compute_metrics([0.3, -0.2], [0.0, 0.0])
    assert m["Acc-2_has0"] == pytest.approx(0.5)
    assert m["Acc-2_non0"] == 0.0 and m["F1_non0"] == 0.0


def test_constant_input_gives_zero_correlation_not_nan():
    assert pearson(np.ones(4), np.arange(4.0)) == 0.0


def test_weighted_f1_matches_sklearn_on_random_labels():
    rng = np.random.default_rng(3)
    truth, predicted = rng.random(200) > 0.3, rng.random(200) > 0.5
    assert weighted_f1(truth, predicted) == pytest.approx(f1_score(truth, predicted, average="weighted"))


@pytest.mark.parametrize("predictions, truths", [([np.nan, 1.0], [1.0, 1.0]), ([1.0], [1.0, 2.0]), ([], [])])
def test_bad_inputs_raise(predictions, truths):
    with pytest.raises(ValueError):
        compute_metrics(predictions, truths)


def test_figures_over_seeds_are_mean_and_population_std_as_mmsa_reports_them():
    spread = over_seeds([{"MAE": 0.7, "Corr": 0.8}, {"MAE": 0.9, "Corr": 0.6}, {"MAE": 0.8, "Corr": 0.7}])
    assert spread["MAE"] == pytest.approx((0.8, np.sqrt(0.02 / 3)))
    assert spread["Corr"] == pytest.approx((0.7, np.sqrt(0.02 / 3)))
