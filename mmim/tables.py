"""The tables the command line and the flow print (rich), each fitting 80 columns where it can."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from mmim.core.metrics import METRIC_NAMES

if TYPE_CHECKING:
    from mmim.cluster.tune import TrialSummary
    from mmim.data.checks import DataReport
    from mmim.data.store_writer import ExtractionSummary


def metrics_table(title: str, columns: dict[str, dict[str, float]]) -> Table:
    """One row per metric, one column per split."""
    table = Table(title=title)
    table.add_column("metric")
    for split in columns:
        table.add_column(split, justify="right")
    for name in METRIC_NAMES:
        table.add_row(name, *(f"{metrics[name]:.4f}" for metrics in columns.values()))
    return table


def seeds_table(seeds: dict) -> Table:
    """MMSA's way: each metric's mean ± standard deviation over seeds, then every seed's test
    figure (`seeds`: seeds.json, as mmim.cluster.seeds writes it)."""
    listed = seeds["seeds"]
    table = Table(
        title=f"{len(listed)} seeds, each at its selected epoch: mean ± std on valid and test, "
        "then each seed's test figure"
    )
    table.add_column("metric")
    for column in ("valid", "test", *(f"seed {seed}" for seed in listed)):
        table.add_column(column, justify="right", no_wrap=True)
    for name in METRIC_NAMES:
        spread = [(seeds["mean"][f"{split}_{name}"], seeds["std"][f"{split}_{name}"]) for split in ("valid", "test")]
        each = [f"{figures[f'test_{name}']:.4f}" for figures in listed.values()]
        table.add_row(name, *(f"{mean:.4f} ± {std:.4f}" for mean, std in spread), *each)
    return table


def trials_table(title: str, trials: list[TrialSummary]) -> Table:
    """A search's trials, best first (those with no figure last)."""
    table = Table(title=title)
    for column in ("trial", "status", "epochs", "valid MAE", "settings"):
        table.add_column(column, justify="right" if column in ("epochs", "valid MAE") else "left")
    for trial in sorted(trials, key=lambda t: (t.valid_MAE != t.valid_MAE, t.valid_MAE)):  # nan last
        settings = ", ".join(
            f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in sorted(trial.settings.items())
        )
        status = f"{trial.status}: {trial.error}" if trial.error else trial.status
        figure = "" if trial.valid_MAE != trial.valid_MAE else f"{trial.valid_MAE:.4f}"
        table.add_row(trial.trial_id, status, str(trial.epochs), figure, settings)
    return table


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
    """Versions and aliases never wrap or shorten; at 80 columns the decision and the
    run id (folded, never cut) take the lines they need."""
    table = Table(title=title)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("aliases", no_wrap=True)
    table.add_column("valid", no_wrap=True)
    table.add_column("decision", overflow="fold")
    table.add_column("run", overflow="fold")
    for row in rows:
        table.add_row(
            str(row["version"]), row["aliases"], metric_cell(row), row.get("registry_decision", ""), row["run_id"] or ""
        )
    return table


def checks_table(title: str, report: DataReport) -> Table:
    """Every data check: hard or soft, its result and what it found."""
    table = Table(title=title)
    for column in ("check", "kind", "result", "detail"):
        table.add_column(column, overflow="fold")
    for check in report.checks:
        result = "ok" if check.passed else ("[red]FAILED[/red]" if check.hard else "[yellow]warning[/yellow]")
        table.add_row(check.name, "hard" if check.hard else "soft", result, check.line().split(": ", 1)[1])
    return table
