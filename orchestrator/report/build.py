"""Paper-style ablation reports, built from MLflow alone (`restorch report NAME|RUN_ID`).

Everything comes from the tracking store, never from local Ray results, so a report can be rebuilt
on any machine pointed at the tracking server:
- the ablation's parent run (by run id, or the latest run whose ABLATION_TAG is NAME) holds the
  spec it ran (`spec.yaml`); its ablation section gives the variants, in table order;
- the child runs, tagged with their variant (orchestrator/run/ablation_run.py), hold the numbers; only
  FINISHED runs count.

`build_report` makes one row per variant (the CSV columns):
  variant, factor, baseline, runs (finished runs: one per seed)
  conv_gmacs, params_m (+ _delta_pct: % change vs the baseline row), total_gmacs   (models.profile)
  each task metric (psnr, ssim, ...): its final validation value, mean over the runs; + _std, the
      sample standard deviation when there are two or more runs. With several named validation sets
      (data.val: {Rain100L: ..., Rain100H: ...}) each metric per set first (psnr/Rain100L, ...), as
      the training loop logs it, then the metric itself: the loop's mean over the sets
  images_per_s: the median of each run's training reports, mean over the runs
  cpu_hours (gpu_hours with use_gpu): the run's wall time x the CPUs (GPUs) of its workers, mean
  machine: the machines its runs' timings were measured on (their MACHINE_TAG), "; "-separated
The report's protocol lines and record come from the finished runs' tags (the metric protocol, the benchmark,
protocol and digest of each validation set that is a catalogued benchmark, the dtype, the reported checkpoint).
`write_report` writes table.csv (numbers at full precision and nothing time-dependent, so that a
rebuild is byte-identical), table.md, table.tex, report.html and the plots (formats.py, plots.py);
`publish_report` logs them to the parent run under `report/`. The file and MLflow names are in
orchestrator/tracking/keys.py, the searches in orchestrator/tracking/store.py.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from orchestrator.report.model import Curve, MetricColumn, Report
from orchestrator.report.results import Row, to_csv
from orchestrator.spec.ablation import Variant, spec_variants
from orchestrator.spec.load import load_spec_text
from orchestrator.spec.schema import PROFILE_METRICS, ExperimentSpec
from orchestrator.tracking.keys import (ABLATION_TAG, CONV_GMACS, CSV_FILE, DATA_DIGEST_PREFIX, DTYPE_TAG, HTML_FILE,
                                        IMAGES_PER_S, ITERATION, LATEX_FILE, LOSS, MACHINE_TAG, MARKDOWN_FILE, PARAMS_M,
                                        REPORT_ARTIFACTS, SPEC_ARTIFACT, VARIANT_TAG)
from orchestrator.tracking.record import describe_record, protocol_lines, reported_checkpoint
from orchestrator.tracking.store import child_runs, has_tag, logged_spec_text, run_by_id_or_name, search_runs

UNKNOWN_MACHINE = "unknown (not recorded)"


def find_ablation_run(client: MlflowClient, reference: str) -> Run:
    """The parent run with this id, or the latest one of the ablation with this name."""
    run = run_by_id_or_name(client, reference, name_tag=ABLATION_TAG)
    if run is None:
        names = sorted({run.data.tags[ABLATION_TAG] for run in search_runs(client, None, has_tag(ABLATION_TAG))})
        raise FileNotFoundError(f"no ablation called {reference!r} (nor a run with that id) in {client.tracking_uri}; "
                                f"ablations there: {', '.join(names) or 'none'}")
    if ABLATION_TAG not in run.data.tags:
        raise ValueError(f"run {reference} is not the parent run of an ablation (it has no {ABLATION_TAG} tag); "
                         "give an ablation's name or its parent run id")
    return run


def logged_spec(client: MlflowClient, run: Run) -> ExperimentSpec:
    """The spec a sweep's or an ablation's parent run was started with (its SPEC_ARTIFACT)."""
    text = logged_spec_text(client, run.info.run_id)
    if text is None:
        raise FileNotFoundError(f"run {run.info.run_id} holds no {SPEC_ARTIFACT} artifact: it was not started by "
                                "restorch sweep or ablate, or its artifacts are gone")
    return load_spec_text(text, f"{SPEC_ARTIFACT} of run {run.info.run_id}")


def _history(client: MlflowClient, run_id: str, metric: str) -> Curve:
    """The metric by iteration, the last value logged at each (a resumed run may log one twice)."""
    points = sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp))
    return sorted({m.step: m.value for m in points}.items())


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _devices(spec: ExperimentSpec) -> float:
    resources = spec.resources
    per_worker = (resources.gpus_per_worker or 1) if resources.use_gpu else resources.cpus_per_worker
    return resources.num_workers * per_worker


def _variant_row(report: Report, variant: Variant, runs: list[Run], throughput: list[Curve]) -> Row:
    row: Row = {"variant": variant.label, "factor": variant.factor, "baseline": variant.baseline, "runs": len(runs)}
    row.update({key: runs[0].data.metrics.get(key) if runs else None for key in PROFILE_METRICS})
    if not report.trained:
        return row
    for key in (column.key for column in report.metric_columns):
        values = [run.data.metrics[key] for run in runs if key in run.data.metrics]
        row[key] = _mean(values)
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    row[IMAGES_PER_S] = _mean([statistics.median(value for _, value in curve) for curve in throughput if curve])
    row[report.hours_key] = _mean([(run.info.end_time - run.info.start_time) / 3.6e6 * _devices(report.spec)
                                   for run in runs])
    machines = sorted({run.data.tags.get(MACHINE_TAG, UNKNOWN_MACHINE) for run in runs})
    report.machines = sorted({*report.machines, *machines})
    row["machine"] = "; ".join(machines) or None
    return row


def _add_deltas(rows: list[Row]) -> None:
    """Δ% of the model size vs the baseline row (the first)."""
    baseline = rows[0]
    for row in rows:
        for key in (CONV_GMACS, PARAMS_M):
            value, reference = row.get(key), baseline.get(key)
            row[f"{key}_delta_pct"] = None if value is None or not reference else (value - reference) / reference * 100


def build_report(client: MlflowClient, reference: str) -> Report:
    """The report of the ablation `reference` (its name or parent run id), from MLflow alone."""
    from workloads.metrics import set_metric
    from workloads.tasks import get_task

    parent = find_ablation_run(client, reference)
    spec = logged_spec(client, parent)
    metrics = list(get_task(spec.task.name, sigma=spec.task.sigma).protocol.metrics)
    sets = list(spec.data.val_sets) if len(spec.data.val_sets) > 1 else []
    metric_columns = [*(MetricColumn(set_metric(metric, name), metric, name) for name in sets for metric in metrics),
                      *(MetricColumn(metric, metric, None) for metric in metrics)]
    columns = ["variant", "factor", "baseline", "runs", "conv_gmacs", "conv_gmacs_delta_pct", "params_m",
               "params_m_delta_pct", "total_gmacs"]
    report = Report(spec, parent.info.run_id, metrics, metric_columns, [], columns, {})
    if report.trained:
        report.columns += [*(key for column in metric_columns for key in (column.key, f"{column.key}_std")),
                           "images_per_s", report.hours_key, "machine"]
    finished: dict[str, list[Run]] = {}
    # a fixed order of each variant's runs: the same sums, to the last bit, whenever the report is rebuilt
    for run in sorted(child_runs(client, parent.info.run_id), key=lambda run: (run.info.start_time, run.info.run_id)):
        if run.info.status == "FINISHED" and VARIANT_TAG in run.data.tags:
            finished.setdefault(run.data.tags[VARIANT_TAG], []).append(run)
    for variant in spec_variants(spec):
        runs = finished.get(variant.label, [])
        curves = [{metric: _history(client, run.info.run_id, metric)
                   for metric in (LOSS, IMAGES_PER_S, report.primary_metric)} for run in runs] if report.trained else []
        report.curves[variant.label] = curves
        report.rows.append(_variant_row(report, variant, runs, [curve[IMAGES_PER_S] for curve in curves]))
    _add_deltas(report.rows)
    if report.trained:
        report.warnings = arm_warnings(finished)
    finished_runs = [run for runs in finished.values() for run in runs]
    checkpoints = sorted({reported_checkpoint(run) for run in finished_runs})
    dtypes = sorted({run.data.tags[DTYPE_TAG] for run in finished_runs if DTYPE_TAG in run.data.tags})
    report.record = describe_record(parent, checkpoint="; ".join(checkpoints) or "none (no finished run)",
                                    dtype="/".join(dtypes) or None)
    report.protocol = protocol_lines(finished_runs)
    return report


def _data_read(run: Run) -> str:
    """What data a run read: its data.train / data.val* / data.digests params and its data digest tags."""
    values = {**{key: value for key, value in run.data.params.items() if key.split(".")[:2] in
                 (["data", "train"], ["data", "val"], ["data", "digests"])},
              **{key: value for key, value in run.data.tags.items() if key.startswith(DATA_DIGEST_PREFIX)}}
    return "; ".join(f"{key}={value}" for key, value in sorted(values.items()))


def arm_warnings(finished: dict[str, list[Run]]) -> list[str]:
    """Warnings on arms of one ablation whose numbers are not comparable: runs that ended at different
    iteration counts, or that read different data."""
    warnings = []
    iterations = {label: sorted({int(run.data.metrics[ITERATION]) for run in runs if ITERATION in run.data.metrics})
                  for label, runs in finished.items()}
    if len({count for counts in iterations.values() for count in counts}) > 1:
        warnings.append("the arms ran different iteration counts ("
                        + ", ".join(f"{label}: {'/'.join(map(str, counts))}" for label, counts in iterations.items())
                        + "): their metrics are not comparable; re-run the short ones (restorch ablate --resume)")
    data = {label: sorted({_data_read(run) for run in runs}) for label, runs in finished.items()}
    if len({read for reads in data.values() for read in reads}) > 1:
        warnings.append("the arms read different data (" + " | ".join(f"{label}: {' / '.join(reads)}" for label, reads
                                                                       in data.items()) + "): compare only arms of the same data")
    return warnings


def table_files(report: Report) -> dict[str, str]:
    """The paper-style table as text files: table.csv, table.md, table.tex."""
    from orchestrator.report.formats import latex_table, markdown_table

    return {CSV_FILE: to_csv(report.rows, report.columns), MARKDOWN_FILE: markdown_table(report),
            LATEX_FILE: latex_table(report)}


def write_report(report: Report, folder: Path) -> Path:
    """The report's files in `folder`: table.csv/.md/.tex, report.html and the plots (PNG + SVG)."""
    from orchestrator.report.formats import html_page
    from orchestrator.report.plots import draw_plots

    folder.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(report, folder)
    files = {**table_files(report), HTML_FILE: html_page(report, folder, plots)}
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def publish_report(client: MlflowClient, parent_run_id: str, folder: Path) -> None:
    """Log the report's files to the ablation's parent run (artifacts under report/)."""
    client.log_artifacts(parent_run_id, str(folder), REPORT_ARTIFACTS)
