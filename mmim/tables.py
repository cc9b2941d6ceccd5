"""The tables the command line and the flow print (rich). Each fits 80 columns with one line per
row: long ids are shortened in the middle (`shorten`), long text ends in an ellipsis, and the
whole value is in the command's JSON output or file (`registry list --json`, seeds.json, the
tuned config, MLflow)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from mmim.core.metrics import METRIC_NAMES

if TYPE_CHECKING:
    from mmim.cluster.tune import TrialSummary
    from mmim.data.checks import DataReport
    from mmim.data.store_writer import ExtractionSummary


def metrics_table(title: str, columns: dict[str, dict[str, float]]) -> Table:
    """One row per metric, one column per split; as wide as its title (up to 80 columns), so
    that a long title keeps to one line."""
    table = Table(title=title, min_width=min(len(title), 80))
    table.add_column("metric")
    for split in columns:
        table.add_column(split, justify="right")
    for name in METRIC_NAMES:
        table.add_row(name, *(f"{metrics[name]:.4f}" for metrics in columns.values()))
    return table


def shorten(text: str, width: int) -> str:
    """`text` cut in the middle to `width` characters: both ends of an id stay readable."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[len(text) - (width - 1 - head) :]}"


def cut(text: str) -> Text:
    """A cell that takes what the terminal has left and ends in an ellipsis there: measured by
    its words, so the table narrows its column; never wrapped onto a second line."""
    return Text(text, no_wrap=True, overflow="ellipsis")


def one_line(table: Table) -> Table:
    """No cell of `table` wraps: each column of plain text keeps the width of its longest cell
    (the `cut` cells give way)."""
    for column in table.columns:
        cells = [column.header, *column.cells]
        texts = [cell for cell in cells if isinstance(cell, str)]
        if len(texts) == len(cells):
            column.no_wrap, column.min_width = True, max(len(text) for text in texts)
    return table


# The seeds table's test figures: the paper's columns (Acc-2 and F1 without zero labels)
SEED_COLUMNS = {"MAE": "MAE", "Corr": "Corr", "Acc-7": "Acc-7", "Acc-2": "Acc-2_non0", "F1": "F1_non0"}


def seeds_table(seeds: dict) -> Table:
    """MMSA's way: every seed's figures at its selected epoch, then their mean and standard
    deviation (`seeds`: seeds.json, as mmim.cluster.seeds writes it, which has every metric)."""
    listed = seeds["seeds"]
    table = Table(title=f"{len(listed)} seeds, each at its selected epoch", caption="test Acc-2, F1: non0")
    for column in ("seed", "epoch", "valid MAE", *(f"test {name}" if name == "MAE" else name for name in SEED_COLUMNS)):
        table.add_column(column, justify="left" if column == "seed" else "right")
    for seed, figures in listed.items():
        test = (f"{figures[f'test_{name}']:.4f}" for name in SEED_COLUMNS.values())
        table.add_row(seed, str(figures["epoch"]), f"{figures['valid_MAE']:.4f}", *test)
    for row in ("mean", "std"):
        test = (f"{seeds[row][f'test_{name}']:.4f}" for name in SEED_COLUMNS.values())
        table.add_row(row, "", f"{seeds[row]['valid_MAE']:.4f}", *test, style="bold" if row == "mean" else None)
    return one_line(table)


def trials_table(title: str, trials: list[TrialSummary]) -> Table:
    """A search's trials, best first (those with no figure last); a failed trial's error follows
    the table (`trial_errors`), whole."""
    table = Table(title=title)
    for column in ("trial", "status", "epochs", "valid MAE", "settings"):
        table.add_column(column, justify="right" if column in ("epochs", "valid MAE") else "left")
    for trial in sorted(trials, key=lambda t: (t.valid_MAE != t.valid_MAE, t.valid_MAE)):  # nan last
        settings = ", ".join(
            f"{key.split('.')[-1]}={value:.3g}" if isinstance(value, float) else f"{key.split('.')[-1]}={value}"
            for key, value in sorted(trial.settings.items())
        )
        figure = "" if trial.valid_MAE != trial.valid_MAE else f"{trial.valid_MAE:.4f}"
        table.add_row(shorten(trial.trial_id, 12), trial.status, str(trial.epochs), figure, cut(settings))
    return one_line(table)


def trial_errors(trials: list[TrialSummary]) -> list[str]:
    """`trial <id> failed: <its error>`, one line per failed trial."""
    return [f"trial {trial.trial_id} failed: {trial.error}" for trial in trials if trial.error]


def store_table(summary: ExtractionSummary) -> Table:
    table = Table(title=f"feature store {summary.root}")
    for column in ("split", "examples", "dropped", "NaN/inf zeroed (audio/vision)", "empty padded (audio/vision)"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, count in summary.counts.items():
        dropped = sum(1 for split, _, _ in summary.dropped if split == name)
        zeroed = "/".join(str(summary.nonfinite_zeroed[(name, m)]) for m in ("audio", "vision"))
        empty = "/".join(str(summary.empty_padded[(name, m)]) for m in ("audio", "vision"))
        table.add_row(name, str(count), str(dropped), zeroed, empty)
    table.caption = f"dims: audio {summary.dims['audio']}, vision {summary.dims['vision']}"
    return table


def metric_cell(row: dict) -> str:
    """`MAE 0.8123` from the version's figure on its own data version (tag `valid_MAE/<data
    version>`; the value as written, if not a number)."""
    own = f"/{row.get('data_version')}"
    key, value = next(((k, v) for k, v in row.items() if k.startswith("valid_") and k.endswith(own)), ("", ""))
    try:
        value = f"{float(value):.4f}"
    except ValueError:
        pass
    return f"{key.removeprefix('valid_').removesuffix(own)} {value}".strip()


def registry_table(title: str, rows: list[dict]) -> Table:
    """Versions and aliases whole; the run id shortened in the middle, the decision cut at the
    terminal's edge (`mmim registry list --json` has both whole)."""
    table = Table(title=title)
    for column in ("version", "aliases", "valid", "run", "decision"):
        table.add_column(column, justify="right" if column == "version" else "left")
    for row in rows:
        run = shorten(row["run_id"] or "", 11)
        decision = cut(row.get("registry_decision", ""))
        table.add_row(str(row["version"]), row["aliases"], metric_cell(row), run, decision)
    return one_line(table)


def checks_table(title: str, report: DataReport) -> Table:
    """Every data check: hard or soft, its result and what it found."""
    table = Table(title=title)
    for column in ("check", "kind", "result", "detail"):
        table.add_column(column, overflow="fold")
    for check in report.checks:
        result = Text("ok") if check.passed else (Text("FAILED", "red") if check.hard else Text("warning", "yellow"))
        table.add_row(check.name, "hard" if check.hard else "soft", result, check.line().split(": ", 1)[1])
    return table
