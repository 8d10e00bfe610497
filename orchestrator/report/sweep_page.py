"""A sweep report's files (`restorch report SWEEP`), from orchestrator/report/sweep.py's data:
- trials.csv: one row per trial, best first, every number at full precision;
- importance.csv: per searched parameter, its PED-ANOVA and fANOVA importance and the finished trials behind it;
- table.csv, table.md, table.tex: with two grid/choice factors, the paper-style two-way table (mean ± std,
  the best cell bold as formats.best_value marks an ablation column's best); the CSV one row per row factor
  value, per column factor value its mean, std and finished trials;
- pareto.csv: multi-objective sweeps, the trials on the Pareto front;
- report.md and report.html (self-contained, the plots embedded): all of it, with the plots
  (sweep_plots.draw_sweep_plots: PNG and SVG).
Nothing in them depends on when or where the report is built, so a rebuild from the same tracking store
writes the same bytes.
"""
from __future__ import annotations

import html
from pathlib import Path

import yaml

from orchestrator.report.formats import (Cell, html_figures, html_head, html_table, latex_float, markdown_grid,
                                         protocol_note, two_way_cells)
from orchestrator.report.importance import EVALUATORS
from orchestrator.report.results import Row, format_value, to_csv
from orchestrator.report.sweep import SweepReport
from orchestrator.report.two_way import TwoWay
from orchestrator.tracking.keys import CSV_FILE, HTML_FILE, LATEX_FILE, MARKDOWN_FILE

TRIALS_FILE, IMPORTANCE_FILE, PARETO_FILE, REPORT_FILE = "trials.csv", "importance.csv", "pareto.csv", "report.md"


def caption(report: SweepReport) -> str:
    spec = report.spec
    search = f"{spec.search.algorithm} search" + (f", {spec.search.scheduler}" if spec.search.scheduler != "fifo" else "")
    return (f"Sweep {report.name}: {search}, {len(report.rows)} trials ({len(report.finished)} finished), task "
            f"{spec.task.name}, {spec.train.iterations} iterations; ranked by {report.metric} ({spec.search.mode}).")


def objectives(report: SweepReport) -> str:
    return ", ".join(f"{name} {mode}" for name, mode in report.spec.objectives().items())


def two_way_caption(report: SweepReport, table: TwoWay) -> str:
    return (f"Sweep {report.name}: {table.metric.upper()} by {table.row_key} (rows) and {table.column_key} (columns), "
            "mean ± std over each pair's finished trials (seeds, repeats); bold: the best cell, where it beats the "
            "runner-up by more than their standard deviation.")


def notes(report: SweepReport) -> list[str]:
    lines = [f"Finished: trained to the end ({report.spec.train.iterations} iterations); trials a scheduler stopped "
             "early, failed or still running are in the trials table only.",
             f"Metrics: each trial's final validation; {report.metric}: "
             f"{'higher' if report.spec.search.mode == 'max' else 'lower'} is better. {protocol_note(report.protocol)}"]
    if report.two_way is not None:
        lines.append("Two-way table: a cell of one trial has no spread and is not marked best against others; "
                     "'-': no finished trial ran that pair.")
    elif len(report.factors) == 2:
        lines.append(f"No two-way table: {' and '.join(report.factors)} are not both grid or choice entries.")
    lines.append(f"Built from MLflow run {report.parent_run_id} (restorch report {report.name}).")
    return lines


def _number(value: object) -> Cell:
    """A value as a right-aligned cell (formats.Cell), never marked."""
    return Cell(format_value(value), None, None, False)


def trials_table(report: SweepReport) -> tuple[list[str], list[list[Cell | str]]]:
    """The trials table: trial and status as text, the rest as numbers (searched text values too)."""
    return report.columns, [[row["trial"], row["status"], *(_number(row.get(column)) for column in report.columns[2:])]
                            for row in report.rows]


def importance_table(report: SweepReport) -> tuple[list[str], list[list[Cell | str]]]:
    values = report.importance.values
    return (["Parameter", *(EVALUATORS[key] for key in values)],
            [[row["parameter"], *(_number(row[key]) for key in values)] for row in importance_rows(report)])


def pareto_table(report: SweepReport) -> tuple[list[str], list[list[Cell | str]]]:
    keys = [*report.factors, *report.spec.objectives()]
    return ["trial", *keys], [[row["trial"], *(_number(row.get(key)) for key in keys)] for row in report.pareto]


def importance_rows(report: SweepReport) -> list[Row]:
    importance = report.importance
    return [{"parameter": name, **{key: values.get(name) for key, values in importance.values.items()},
             "trials": importance.trials} for name in importance.parameters]


def two_way_rows(table: TwoWay) -> list[Row]:
    rows = []
    for row_value in table.row_values:
        row: Row = {table.row_key: row_value}
        for column_value in table.column_values:
            cell, name = table.cell(row_value, column_value), f"{table.column_key}={column_value}"
            row.update({name: cell[table.metric], f"{name}_std": cell[f"{table.metric}_std"],
                        f"{name}_runs": cell["runs"]})
        rows.append(row)
    return rows


def two_way_columns(table: TwoWay) -> list[str]:
    return [table.row_key, *(f"{table.column_key}={value}{suffix}" for value in table.column_values
                             for suffix in ("", "_std", "_runs"))]


# ------------------------------------------------------------------------------------------------
# Markdown and HTML


def markdown_page(report: SweepReport, plots: dict[str, str]) -> str:
    importance = report.importance
    lines = [f"# Sweep {report.name}", "", caption(report), "", "## Trials", "", *markdown_grid(*trials_table(report)),
             "", f"## Parameter importance for {report.metric.upper()} ({importance.trials} finished trials)", ""]
    if importance.values:
        lines += [*markdown_grid(*importance_table(report)), ""]
    if importance.note:
        lines.append(f"> {'Warning: ' if importance.values else ''}{importance.note}")
    if report.two_way is not None:
        lines += ["", "## Two-way table", "", two_way_caption(report, report.two_way), "",
                  *markdown_grid(*two_way_cells(report.two_way))]
    if report.pareto:
        lines += ["", f"## Pareto front ({objectives(report)})", "", *markdown_grid(*pareto_table(report))]
    if plots:
        lines += ["", "## Plots", "", *(f"![{text}]({name}.png)" for name, text in plots.items())]
    lines += ["", *(f"- {note}" for note in notes(report))]
    return "\n".join(lines) + "\n"


def two_way_markdown(report: SweepReport, table: TwoWay) -> str:
    return "\n".join([f"# Sweep {report.name}: {table.row_key} × {table.column_key}", "",
                      two_way_caption(report, table), "", *markdown_grid(*two_way_cells(table)), "",
                      *(f"- {note}" for note in notes(report))]) + "\n"


def html_page(report: SweepReport, folder: Path, plots: dict[str, str]) -> str:
    """One file with everything: the trials, importance, the two-way table, the Pareto front, the plots
    (embedded) and the search space and settings."""
    importance = report.importance
    parts = [html_head(f"Sweep {report.name}"), f"<p>{html.escape(caption(report))}</p>", "<h2>Trials</h2>",
             html_table(*trials_table(report)),
             f"<h2>Parameter importance for {html.escape(report.metric.upper())} ({importance.trials} finished "
             "trials)</h2>"]
    if importance.values:
        parts.append(html_table(*importance_table(report)))
    if importance.note:
        parts.append(f"<p>{'<strong>Warning:</strong> ' if importance.values else ''}{html.escape(importance.note)}</p>")
    if report.two_way is not None:
        parts += ["<h2>Two-way table</h2>", f"<p>{html.escape(two_way_caption(report, report.two_way))}</p>",
                  html_table(*two_way_cells(report.two_way))]
    if report.pareto:
        parts += [f"<h2>Pareto front ({html.escape(objectives(report))})</h2>", html_table(*pareto_table(report))]
    parts += [f"<ul>{''.join(f'<li>{html.escape(note)}</li>' for note in notes(report))}</ul>",
              *(["<h2>Plots</h2>", html_figures(folder, plots)] if plots else [])]
    searched = {"space": {domain.key: {domain.kind: domain.values} for domain in report.spec.search_space},
                "search": report.spec.config()["search"]}
    parts += ["<h2>Search</h2>", f"<pre>{html.escape(yaml.safe_dump(searched, sort_keys=False, allow_unicode=True))}</pre>",
              "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_sweep_report(report: SweepReport, folder: Path) -> Path:
    """The sweep report's files in `folder` (see the module's docstring)."""
    from orchestrator.report.sweep_plots import draw_sweep_plots

    folder.mkdir(parents=True, exist_ok=True)
    plots = draw_sweep_plots(report, folder)
    files = {TRIALS_FILE: to_csv(report.rows, report.columns),
             IMPORTANCE_FILE: to_csv(importance_rows(report), ["parameter", *EVALUATORS, "trials"])}
    if report.two_way is not None:
        table = report.two_way
        files.update({CSV_FILE: to_csv(two_way_rows(table), two_way_columns(table)),
                      MARKDOWN_FILE: two_way_markdown(report, table),
                      LATEX_FILE: latex_float(*two_way_cells(table), two_way_caption(report, table), report.name,
                                              protocol_note(report.protocol))})
    if report.pareto:
        files[PARETO_FILE] = to_csv(report.pareto, report.columns)
    files.update({REPORT_FILE: markdown_page(report, plots), HTML_FILE: html_page(report, folder, plots)})
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder
