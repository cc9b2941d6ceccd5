"""Every table the project prints, at 80 columns: one line per row and per title, none wider."""

import io
from types import SimpleNamespace

from rich.console import Console

from flows.summary import RetrainSummary, summary_table
from mmim.cluster.tune import TrialSummary
from mmim.core.metrics import METRIC_NAMES
from mmim.tables import registry_table, seeds_table, shorten, trials_table

RUN_ID = "0123456789abcdef0123456789abcdef"
DATA_VERSION = "fedcba9876543210fedcba9876543210.dir"


def figures(value: float) -> dict[str, float]:
    return {f"{split}_{name}": value for split in ("valid", "test") for name in METRIC_NAMES}


def assert_fits(table, *whole: str, width: int = 80) -> None:
    """`table` fits `width` columns with a line per row, and shows each of `whole` uncut."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(table)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= width
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    assert top == 1  # the title, on one line
    header_end = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    bottom = next(i for i, line in enumerate(lines) if line.startswith("└"))
    assert bottom - header_end - 1 == table.row_count  # a line per row: no cell wrapped
    assert header_end - top - 1 == 1  # and one for the header
    text = "\n".join(lines)
    for cell in whole:
        assert cell in text


def test_the_seeds_table_fits_with_six_seeds_of_ten_digits():
    seeds = {str(4294967290 + i): {"epoch": 40, **figures(0.123456)} for i in range(6)}
    summary = {"seeds": seeds, "best_seed": 4294967290, "mean": figures(0.1), "std": figures(0.01)}
    assert_fits(seeds_table(summary), "4294967295", "valid MAE", "0.1235", "std")


def test_the_trials_table_fits_with_long_settings_and_an_error():
    settings = {f"train.setting_{i}": 0.000123456 * i for i in range(8)}
    trials = [
        TrialSummary("run_trial_5a3f2_00000", "finished", settings, 40, 0.5123, 12, None),
        TrialSummary("run_trial_5a3f2_00001", "failed", settings, 0, float("nan"), 0, "x" * 300),
    ]
    assert_fits(trials_table("search lr: 2 trials", trials), "run_t…_00001", "failed", "epochs")


def test_the_registry_list_fits_with_a_long_decision_and_a_whole_run_id():
    decision = "not promoted: the challenger's valid MAE 0.8123 does not beat the champion v3's 0.8011 " * 3
    rows = [
        {"version": str(v), "run_id": RUN_ID, "aliases": "challenger,champion", "registry_decision": decision}
        for v in (12, 11)
    ]
    assert_fits(
        registry_table("mmim-recordings-sample (sqlite:///mlflow.db)", rows), "01234…bcdef", "challenger,champion"
    )
    assert shorten(RUN_ID, 11) == "01234…bcdef"


def test_the_flow_summary_table_fits_with_the_champions_columns():
    per_split = {name: 0.5 for name in METRIC_NAMES}
    compared = SimpleNamespace(champion_version="12", champion={"valid": per_split, "test": per_split})
    summary = RetrainSummary.model_construct(
        dataset="recordings-sample",
        selected_epoch=40,
        data_version=DATA_VERSION,
        evaluation={"valid": per_split, "test": per_split},
        registration=SimpleNamespace(compared=compared),
    )
    assert_fits(summary_table(summary), "champion v12 valid", "Acc-2_non0")
