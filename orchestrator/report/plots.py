"""The ablation report's plots (matplotlib's object API, no pyplot: rendered by Agg), each saved as
PNG and SVG under the same name:
- pareto: the primary metric vs conv GFLOPs per variant, labelled, with the Pareto front (results.pareto_front);
- delta: one bar per variant with its metric change vs the baseline, coloured by factor;
- curves: training loss and the validation metric vs iteration for every run, one colour per variant.
Only trained ablations have them (a profile-only report has no metric to plot). SVGs carry no date
and fixed element ids, so rebuilding a report rewrites them unchanged.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from orchestrator.report.model import Report, better
from orchestrator.report.results import pareto_front

COLORS = matplotlib.colormaps["tab10"].colors


def save_figure(figure: Figure, folder: Path, name: str) -> None:
    figure.savefig(folder / f"{name}.png", dpi=120)
    with matplotlib.rc_context({"svg.hashsalt": "restorch"}):
        figure.savefig(folder / f"{name}.svg", metadata={"Date": None})


def draw_plots(report: Report, folder: Path) -> dict[str, str]:
    """Draw the plots into `folder`; returns plot name -> caption (empty when there is nothing to plot)."""
    metric = report.primary_metric
    if not report.trained or not any(row.get(metric) is not None for row in report.rows):
        return {}
    name = metric.upper()
    plots = {"pareto": f"{name} vs FLOPs (conv GMACs at 256×256) per variant; dashed: the Pareto front",
             "delta": f"{name} change vs the baseline per variant",
             "curves": f"Training loss and validation {name} of every run"}
    for plot, draw in (("pareto", _pareto), ("delta", _delta), ("curves", _curves)):
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        draw(report, figure, metric)
        save_figure(figure, folder, plot)
    return plots


def _pareto(report: Report, figure: Figure, metric: str) -> None:
    axes = figure.add_subplot()
    rows = [row for row in report.rows if row.get(metric) is not None and row.get("conv_gmacs") is not None]
    for index, row in enumerate(rows):
        axes.errorbar(row["conv_gmacs"], row[metric], yerr=row.get(f"{metric}_std"), fmt="*" if row["baseline"] else "o",
                      markersize=12 if row["baseline"] else 7, color=COLORS[index % len(COLORS)], capsize=3)
        axes.annotate(row["variant"], (row["conv_gmacs"], row[metric]), textcoords="offset points", xytext=(5, 5),
                      fontsize=8)
    front = sorted(pareto_front(rows, {metric: better(metric), "conv_gmacs": "min"}), key=lambda row: row["conv_gmacs"])
    axes.plot([row["conv_gmacs"] for row in front], [row[metric] for row in front], "--", color="0.4", zorder=0)
    axes.margins(x=0.15, y=0.1)  # room for the labels
    axes.set_xlabel("FLOPs (G, conv MACs at 256×256)")
    axes.set_ylabel(metric.upper())
    axes.grid(alpha=0.3)


def _delta(report: Report, figure: Figure, metric: str) -> None:
    axes = figure.add_subplot()
    baseline = report.rows[0].get(metric)
    rows = [row for row in report.rows[1:] if row.get(metric) is not None and baseline is not None]
    factors = list(dict.fromkeys(row["factor"] for row in rows))
    labelled: set[str] = set()
    for position, row in enumerate(rows):
        label = None if row["factor"] in labelled else row["factor"]
        labelled.add(row["factor"])
        axes.barh(position, row[metric] - baseline, xerr=row.get(f"{metric}_std"), label=label, capsize=3,
                  color=COLORS[factors.index(row["factor"]) % len(COLORS)])
    axes.set_yticks(range(len(rows)), [row["variant"] for row in rows], fontsize=8)
    axes.invert_yaxis()
    axes.axvline(0, color="0.2", linewidth=0.8)
    axes.set_xlabel(f"Δ {metric.upper()} vs {report.rows[0]['variant']}")
    if len(factors) > 1:
        axes.legend(title="factor", fontsize=8)
    axes.grid(axis="x", alpha=0.3)


def _curves(report: Report, figure: Figure, metric: str) -> None:
    loss_axes, metric_axes = figure.subplots(1, 2)
    for index, (label, runs) in enumerate(report.curves.items()):
        color = COLORS[index % len(COLORS)]
        for number, curves in enumerate(runs):
            for axes, key in ((loss_axes, "loss"), (metric_axes, metric)):
                steps, values = zip(*curves[key]) if curves[key] else ((), ())
                axes.plot(steps, values, ".-", color=color, linewidth=1.2, label=label if number == 0 else None)
    loss_axes.set(xlabel="iteration", ylabel="training loss", yscale="log")
    metric_axes.set(xlabel="iteration", ylabel=f"validation {metric.upper()}")
    metric_axes.legend(fontsize=7)
    for axes in (loss_axes, metric_axes):
        axes.grid(alpha=0.3)
