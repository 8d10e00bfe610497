"""The ablation table as the papers print it: Markdown, LaTeX (booktabs) and a self-contained HTML page.

One row per variant: Method (the label; the baseline marked), Factor (when there are several),
FLOPs (G) and Params (M) with their Δ% vs the baseline, the task's metrics (mean ± std over seeds;
with several validation sets: per set, then their average), training images/s and CPU/GPU-hours.
A column's best value is bold only when it beats the runner-up by more than the seeds' standard
deviation (`best_value`); the timings are never bold, and a note names the machines they were measured
on. Cells are formatted here, from the report's rows (orchestrator/report/build.py), with a fixed number of
decimals per column.

A sweep's two-way table (orchestrator/report/two_way.py: one factor's values as rows, the other's as columns)
is formatted and marked the same way (`two_way_cells`); the sweep report's page (sweep_page.py) is built
from the same Markdown, LaTeX and HTML tables and figures.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from orchestrator.report.model import Report, better
from orchestrator.report.results import Row

if TYPE_CHECKING:
    from orchestrator.report.two_way import TwoWay

METRIC_FORMATS = {"psnr": ".2f"}  # other metrics (ssim, mrae, rmse): ".4f"
BASELINE_MARK = " (baseline)"
TIMING_MARK = " †"  # a timing column's header: the note on the machines they were measured on
_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "α": r"$\alpha$", "β": r"$\beta$",
                "Δ": r"$\Delta$", "±": r"$\pm$", "×": r"$\times$", "→": r"$\rightarrow$", "†": r"\dag{}"}


@dataclass(frozen=True)
class Column:
    key: str  # the row's key
    header: str
    fmt: str  # format spec of the value
    better: str | None  # "max" or "min": which value may be marked best; None: never (timings)
    delta: bool = False  # followed by (Δ% vs the baseline), from key_delta_pct
    spread: bool = False  # followed by ± std over seeds, from key_std


@dataclass(frozen=True)
class Cell:
    value: str  # "-" when missing
    spread: str | None
    delta: str | None
    best: bool


def table_columns(report: Report) -> list[Column]:
    columns = [Column("conv_gmacs", "FLOPs (G)", ".2f", "min", delta=True),
               Column("params_m", "Params (M)", ".3f", "min", delta=True)]
    if report.trained:
        average = "Average " if report.val_sets else ""
        columns += [Column(key, f"{val_set} {metric.upper()}" if val_set else average + metric.upper(),
                           METRIC_FORMATS.get(metric, ".4f"), better(metric), spread=True)
                    for key, metric, val_set in report.metric_columns]
        hours = "GPU-h" if report.hours_key == "gpu_hours" else "CPU-h"
        columns += [Column("images_per_s", "Train img/s" + TIMING_MARK, ".1f", None),
                    Column(report.hours_key, hours + TIMING_MARK, ".3g", None)]
    return columns


def best_value(rows: list[Row], column: Column) -> float | None:
    """The value the column marks best, or None. It must beat the runner-up (the best of the other rows)
    by more than the seeds' standard deviation, the larger of the two rows' (FLOPs and Params vary with
    no seed: by anything). A metric from one seed has no spread to beat, so it is marked only as the
    column's only value. Timings are never marked."""
    if column.better is None:
        return None
    measured = sorted((row for row in rows if row.get(column.key) is not None), key=lambda row: row[column.key],
                      reverse=column.better == "max")
    if len(measured) < 2:
        return measured[0][column.key] if measured else None
    best, runner_up = measured[0], measured[1]
    spreads = [row.get(f"{column.key}_std") for row in (best, runner_up)] if column.spread else [0.0]
    if None in spreads:
        return None
    return best[column.key] if abs(best[column.key] - runner_up[column.key]) > max(spreads) else None


def cells(report: Report) -> tuple[list[str], list[list[Cell | str]]]:
    """The headers and, per row, the Method (and Factor) text followed by the formatted cells (the
    text columns come first: left-aligned, the others right-aligned)."""
    columns = table_columns(report)
    with_factor = len({row["factor"] for row in report.rows if not row["baseline"]}) > 1
    headers = ["Method", *(["Factor"] if with_factor else []), *(column.header for column in columns)]
    best = {column.key: best_value(report.rows, column) for column in columns}
    table: list[list[Cell | str]] = []
    for row in report.rows:
        line: list[Cell | str] = [row["variant"] + (BASELINE_MARK if row["baseline"] else "")]
        if with_factor:
            line.append("" if row["baseline"] else row["factor"])
        line += [format_cell(row, column, best[column.key], with_delta=not row["baseline"]) for column in columns]
        table.append(line)
    return headers, table


def format_cell(row: Row, column: Column, best: float | None, *, with_delta: bool = True) -> Cell:
    """The row's value of the column, formatted: with its ± std (spread columns), its Δ% (delta columns,
    `with_delta`), bold when it is the column's `best`."""
    value, std, delta = row.get(column.key), row.get(f"{column.key}_std"), row.get(f"{column.key}_delta_pct")
    return Cell(value="-" if value is None else format(value, column.fmt),
                spread=format(std, column.fmt) if column.spread and std is not None else None,
                delta=f"{delta:+.2f}%" if column.delta and delta is not None and with_delta else None,
                best=value is not None and value == best)


# ------------------------------------------------------------------------------------------------
# Two-way tables (sweep reports): one factor's values as rows, the other's as columns, each cell the metric's
# mean ± std over the trials that ran that pair; the best cell marked as an ablation column's best is


def two_way_cells(table: TwoWay) -> tuple[list[str], list[list[Cell | str]]]:
    """The headers (`row key \\ column key`, then the column factor's values) and, per row factor value,
    its label followed by the formatted cells."""
    column = Column(table.metric, table.metric.upper(), METRIC_FORMATS.get(table.metric, ".4f"), better(table.metric),
                    spread=True)
    best = best_value(table.cells, column)
    headers = [f"{table.row_key} \\ {table.column_key}", *(str(value) for value in table.column_values)]
    return headers, [[str(row_value), *(format_cell(table.cell(row_value, column_value), column, best)
                                        for column_value in table.column_values)] for row_value in table.row_values]


def caption(report: Report) -> str:
    spec, ablation = report.spec, report.spec.ablation
    parts = [f"Ablation {report.name}: {ablation.mode.replace('_', ' ')}, {len(report.rows)} variants"]
    if report.trained:
        val = ", ".join(spec.data.val_sets) or "/".join(Path(spec.data.val).parts[-2:])
        parts.append(f"task {spec.task.name}, {spec.train.iterations} iterations, metrics on {val}")
        if ablation.seeds:
            parts.append(f"mean ± std over {len(ablation.seeds)} seeds")
    return ("; ".join(parts) + ". FLOPs: conv MACs at 1×3×256×256 (the papers' convention); Δ% vs the baseline; "
            "bold: a column's best, where it beats the runner-up by more than the seeds' standard deviation.")


def notes(report: Report) -> list[str]:
    lines = ["FLOPs (G) counts convolution MACs only, as the papers' tables do; total GMACs with the attention "
             "matmuls are in the CSV (total_gmacs)."]
    if report.trained:
        lines += [f"Metrics: the final validation of each run. {protocol_note(report.protocol)}",
                  *(["Average: the mean over the validation sets, each set weighing the same."]
                    if report.val_sets else []),
                  "Bold: a column's best value, where it beats the runner-up by more than the seeds' standard "
                  "deviation (the larger of the two); a metric from one seed is not marked (no spread is known).",
                  "Train img/s: the median of each run's training reports, averaged over its runs.",
                  f"{'GPU' if report.hours_key == 'gpu_hours' else 'CPU'}-h: each run's wall time (Ray Train start-up "
                  "included) times the devices of its workers, averaged over its runs.",
                  f"{TIMING_MARK.strip()} Timings measured on {'; '.join(report.machines) or 'unknown machines'}: "
                  "they depend on the machine and on what else ran on it, so they are never marked best and compare "
                  "only within one machine."]
    lines.append(f"Built from MLflow run {report.parent_run_id} (restorch report {report.name}).")
    lines.append(f"Reproducibility record: {'; '.join(report.record)}.")
    return [*(f"Warning: {warning}." for warning in report.warnings), *lines]


def protocol_note(protocols: list[str]) -> str:
    """The line under a table that says how its metrics were measured (its runs' protocols, from their tags)."""
    return f"Protocol: {' | '.join(protocols) or 'not recorded (no finished run)'}."


# ------------------------------------------------------------------------------------------------
# Markdown


def _markdown_cell(cell: Cell | str) -> str:
    if isinstance(cell, str):
        return cell.replace("|", r"\|")
    text = cell.value + (f" ± {cell.spread}" if cell.spread else "")
    text = f"**{text}**" if cell.best else text
    return text + (f" ({cell.delta})" if cell.delta else "")


def markdown_grid(headers: list[str], table: list[list[Cell | str]]) -> list[str]:
    """The lines of a Markdown table: text columns left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header.replace("|", r"\|") for header in headers) + " |",
             "|" + "|".join(":---" if isinstance(cell, str) else "---:" for cell in table[0]) + "|"]
    return lines + ["| " + " | ".join(_markdown_cell(cell) for cell in line) + " |" for line in table]


def markdown_table(report: Report) -> str:
    headers, table = cells(report)
    lines = [f"# Ablation {report.name}", "", caption(report), "", *markdown_grid(headers, table)]
    lines += ["", *(f"- {note}" for note in notes(report))]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# LaTeX (booktabs)


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(char, char) for char in text)


def _latex_cell(cell: Cell | str) -> str:
    if isinstance(cell, str):
        return tex_escape(cell)
    text = cell.value + (rf" $\pm$ {cell.spread}" if cell.spread else "")
    text = rf"\textbf{{{text}}}" if cell.best else text
    return text + (f" ({tex_escape(cell.delta)})" if cell.delta else "")


def latex_float(headers: list[str], table: list[list[Cell | str]], caption_text: str, label: str,
                footer: str | None = None) -> str:
    """A booktabs table (\\usepackage{booktabs}) of these headers and cells; `footer`: a line under it."""
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex_escape(caption_text)}}}", rf"\label{{tab:{label}}}",
             r"\begin{tabular}{" + "".join("l" if isinstance(cell, str) else "r" for cell in table[0]) + "}", r"\toprule",
             " & ".join(tex_escape(header) for header in headers) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_cell(cell) for cell in line) + r" \\" for line in table]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\smallskip{{\footnotesize {tex_escape(footer)}}}"] if footer else []
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def latex_table(report: Report) -> str:
    """The ablation table in booktabs (\\usepackage{booktabs})."""
    headers, table = cells(report)
    warnings = "".join(f"% Warning: {warning}.\n" for warning in report.warnings)
    footer = protocol_note(report.protocol) if report.trained else None
    return warnings + latex_float(headers, table, caption(report), report.name, footer)


# ------------------------------------------------------------------------------------------------
# HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: .35em .8em; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
.text { text-align: left; }
thead th { border-bottom: 2px solid #444; }
tr.baseline td { background: #eee; }
td .delta { color: #666; font-size: .9em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def _html_cell(cell: Cell | str) -> str:
    if isinstance(cell, str):
        return f"<td class=text>{html.escape(cell)}</td>"
    text = html.escape(cell.value) + (f" ± {html.escape(cell.spread)}" if cell.spread else "")
    text = f"<strong>{text}</strong>" if cell.best else text
    return f"<td>{text}{f' <span class=delta>({html.escape(cell.delta)})</span>' if cell.delta else ''}</td>"


def html_table(headers: list[str], table: list[list[Cell | str]], row_classes: list[str | None] | None = None) -> str:
    """A <table> of these headers and cells; `row_classes`: a CSS class per row (None: none)."""
    classes = row_classes or [None] * len(table)
    rows = "\n".join(f"<tr{f' class={css}' if css else ''}>{''.join(_html_cell(cell) for cell in line)}</tr>"
                     for css, line in zip(classes, table))
    return f"""<table>
<thead><tr>{''.join(f'<th{" class=text" if isinstance(cell, str) else ""}>{html.escape(header)}</th>'
                   for header, cell in zip(headers, table[0]))}</tr></thead>
<tbody>
{rows}
</tbody>
</table>"""


def html_figures(folder: Path, plots: dict[str, str]) -> str:
    """The plots (`folder/{name}.png`, embedded), each with its caption."""
    return "\n".join(
        f"<figure><img alt=\"{html.escape(text)}\" src=\"data:image/png;base64,"
        f"{base64.b64encode((folder / f'{name}.png').read_bytes()).decode()}\"><figcaption>{html.escape(text)}"
        "</figcaption></figure>" for name, text in plots.items())


def html_head(title: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>"""


def html_page(report: Report, folder: Path, plots: dict[str, str]) -> str:
    """One file with everything: the table, notes, the plots (`folder/{name}.png`, embedded) and the
    ablation section of the spec."""
    headers, table = cells(report)
    ablation = yaml.safe_dump({"ablation": report.spec.config()["ablation"]}, sort_keys=False, allow_unicode=True)
    return f"""{html_head(f"Ablation {report.name}")}
<p>{html.escape(caption(report))}</p>
{html_table(headers, table, ["baseline" if row["baseline"] else None for row in report.rows])}
<ul>{''.join(f'<li>{html.escape(note)}</li>' for note in notes(report))}</ul>
{'<h2>Plots</h2>' if plots else ''}
{html_figures(folder, plots)}
<h2>Ablation spec</h2>
<pre>{html.escape(ablation)}</pre>
</body>
</html>
"""
