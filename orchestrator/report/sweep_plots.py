"""A sweep report's plots (orchestrator/report/sweep.py), drawn and saved as the ablation report's are
(plots.py: matplotlib's object API, PNG and SVG that a rebuild rewrites unchanged), all of the finished trials:
- importance: each searched parameter's PED-ANOVA and fANOVA importance, titled with the trials behind it;
- parallel: parallel coordinates, one line per trial through its searched values to its metric, coloured by it;
- heatmap: with two grid/choice factors, the two-way table's mean (± std) per cell;
- pareto: multi-objective sweeps, the first two objectives with the Pareto front.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from orchestrator.report.formats import METRIC_FORMATS
from orchestrator.report.importance import EVALUATORS, RELIABLE_TRIALS, scored
from orchestrator.report.model import better
from orchestrator.report.plots import COLORS, save_figure
from orchestrator.report.sweep import SweepReport
from orchestrator.spec.schema import Domain


def draw_sweep_plots(report: SweepReport, folder: Path) -> dict[str, str]:
    """Draw the sweep's plots into `folder`; returns plot name -> caption (those there is data for)."""
    name, finished = report.metric.upper(), scored(report.finished, report.metric)
    importance, table = report.importance, report.two_way
    plots = {}
    if importance.values:
        plots["importance"] = (f"Importance of the searched parameters for {name} (PED-ANOVA and fANOVA, each summing "
                               f"to 1), from {importance.trials} finished trials")
    if finished and report.factors:
        plots["parallel"] = f"Parallel coordinates: the finished trials' searched values and {name}"
    if table is not None and any(cell[table.metric] is not None for cell in table.cells):
        plots["heatmap"] = f"{name} by {table.row_key} and {table.column_key}: mean ± std of the finished trials"
    if len(report.pareto) > 0:
        first, second = list(report.spec.objectives())[:2]
        plots["pareto"] = f"{first} vs {second} of the finished trials; dashed: the Pareto front"
    draw = {"importance": _importance, "parallel": _parallel, "heatmap": _heatmap, "pareto": _sweep_pareto}
    for plot in plots:
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        draw[plot](report, figure)
        save_figure(figure, folder, plot)
    return plots


def _importance(report: SweepReport, figure: Figure) -> None:
    importance = report.importance
    axes = figure.add_subplot()
    parameters = importance.parameters
    height = 0.8 / len(importance.values)
    for index, (key, values) in enumerate(importance.values.items()):
        positions = [position + index * height for position in range(len(parameters))]
        axes.barh(positions, [values.get(name, 0.0) for name in parameters], height=height, label=EVALUATORS[key],
                  color=COLORS[index])
    axes.set_yticks([position + height * (len(importance.values) - 1) / 2 for position in range(len(parameters))],
                    parameters, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(f"importance for {report.metric.upper()} (sums to 1)")
    warning = f" (fewer than {RELIABLE_TRIALS}: a hint)" if importance.trials < RELIABLE_TRIALS else ""
    axes.set_title(f"{importance.trials} finished trials{warning}", fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(axis="x", alpha=0.3)


def _axis_position(values: list[Any], domain: Domain | None) -> tuple[list[float], list[tuple[float, str]]]:
    """Each value's height on a parallel-coordinates axis (0 to 1; nan where missing) and the axis's ticks:
    grid/choice values (or text) evenly spaced, numbers linearly (log for loguniform) between their extremes."""
    present = [value for value in values if value is not None]
    numeric = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in present)
    if not numeric or (domain is not None and domain.kind in ("grid", "choice")):
        levels = list(dict.fromkeys([*(domain.values if domain is not None else []), *present]))
        levels = [level for level in levels if level in present]
        spread = max(len(levels) - 1, 1)
        return ([math.nan if value is None else levels.index(value) / spread for value in values],
                [(index / spread, str(level)) for index, level in enumerate(levels)])
    scale = math.log if domain is not None and domain.kind == "loguniform" else float
    low, high = scale(min(present)), scale(max(present))
    span = high - low or 1.0
    return ([math.nan if value is None else (scale(value) - low) / span for value in values],
            [(0.0, f"{min(present):.3g}"), (1.0, f"{max(present):.3g}")] if high > low else [(0.0, f"{low:.3g}")])


def _parallel(report: SweepReport, figure: Figure) -> None:
    axes = figure.add_subplot()
    rows, metric = scored(report.finished, report.metric), report.metric
    domains = {domain.key: domain for domain in report.spec.search_space}
    keys = [*report.factors, metric]
    heights = {key: _axis_position([row.get(key) for row in rows], domains.get(key)) for key in keys}
    norm = Normalize(min(row[metric] for row in rows), max(row[metric] for row in rows))
    colormap = matplotlib.colormaps["viridis" if better(metric) == "max" else "viridis_r"]
    for index, row in enumerate(rows):
        axes.plot(range(len(keys)), [heights[key][0][index] for key in keys], "-o", markersize=3, linewidth=1.2,
                  color=colormap(norm(row[metric])), alpha=0.85)
    for position, key in enumerate(keys):
        axes.axvline(position, color="0.3", linewidth=0.8)
        for height, label in heights[key][1]:
            axes.annotate(label, (position, height), textcoords="offset points", xytext=(4, 0), fontsize=7,
                          va="center")
    axes.set_xticks(range(len(keys)), keys, fontsize=8, rotation=15)
    axes.set_yticks([])
    axes.set_xlim(-0.2, len(keys) - 0.6)
    figure.colorbar(ScalarMappable(norm, colormap), ax=axes, label=metric.upper())


def _heatmap(report: SweepReport, figure: Figure) -> None:
    table = report.two_way
    assert table is not None
    axes = figure.add_subplot()
    metric = table.metric
    grid = [[math.nan if table.cell(row, column)[metric] is None else table.cell(row, column)[metric]
             for column in table.column_values] for row in table.row_values]
    image = axes.imshow(grid, cmap="viridis" if better(metric) == "max" else "viridis_r", aspect="auto")
    fmt = METRIC_FORMATS.get(metric, ".4f")  # as the two-way table prints it
    for y, row in enumerate(table.row_values):
        for x, column in enumerate(table.column_values):
            cell = table.cell(row, column)
            if cell[metric] is not None:
                std = cell[f"{metric}_std"]
                red, green, blue, _ = image.cmap(image.norm(cell[metric]))
                axes.text(x, y, format(cell[metric], fmt) + (f"\n± {format(std, fmt)}" if std is not None else ""),
                          ha="center", va="center", fontsize=9, fontweight="bold",
                          color="black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white")
    axes.set_xticks(range(len(table.column_values)), [str(value) for value in table.column_values])
    axes.set_yticks(range(len(table.row_values)), [str(value) for value in table.row_values])
    axes.set(xlabel=table.column_key, ylabel=table.row_key)
    figure.colorbar(image, ax=axes, label=metric.upper())


def _sweep_pareto(report: SweepReport, figure: Figure) -> None:
    axes = figure.add_subplot()
    (first, first_mode), (second, second_mode) = list(report.spec.objectives().items())[:2]
    rows = [row for row in report.finished if row.get(first) is not None and row.get(second) is not None]
    axes.scatter([row[first] for row in rows], [row[second] for row in rows], color="0.6", s=18, label="finished trials")
    front = sorted(report.pareto, key=lambda row: row[first])
    axes.plot([row[first] for row in front], [row[second] for row in front], "--o", color=COLORS[0],
              label="Pareto front")
    for row in front:
        axes.annotate(row["trial"], (row[first], row[second]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.margins(x=0.12, y=0.1)  # room for the labels
    axes.set(xlabel=f"{first} ({first_mode})", ylabel=f"{second} ({second_mode})")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
