"""Ablation reports from MLflow: the numbers (means over seeds, Δ%, throughput, CPU-hours), the
columns per named validation set and their average, the LaTeX table (parsed), the HTML page (opened
in headless Chromium), and, end to end, a trained one-at-a-time ablation whose report
`restorch report` rebuilds byte for byte in a fresh folder."""
from __future__ import annotations

import csv
import io
import re
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_RESTORMER, two_factor_ablation
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from servers import BIN

from orchestrator.spec.ablation import Variant, spec_variants
from orchestrator.cli import main
from orchestrator.tracking import model_registry
from orchestrator.tracking.keys import (ABLATION_TAG, CSV_FILE, DATA_TAG, FACTOR_TAG, HTML_FILE, LATEX_FILE, MACHINE_TAG,
                                        MARKDOWN_FILE, PARENT_TAG, PROTOCOL_TAG, PROTOCOL_VERSION_TAG, SEED_TAG, TRIAL_TAG,
                                        VARIANT_TAG)
from orchestrator.report.build import build_report, write_report
from orchestrator.report.formats import Column, best_value, markdown_table
from orchestrator.spec.load import parse_spec
from orchestrator.tracking.runs import open_sweep_run
from orchestrator.tracking.store import child_runs
from workloads.metrics import over_sets
from workloads.train import machine_name

PLOTS = ("pareto", "delta", "curves")
HOUR_MS = 3_600_000


def ablation_spec(name: str, data: Path, tmp_path: Path, **ablation: Any) -> dict[str, Any]:
    """A tiny Restormer: CSA baseline; attention (GLMHA, Performer) and FFN width (x2, x1.5) one at a time."""
    return {
        "name": name,
        "model": dict(TINY_RESTORMER),
        "task": "deraining",
        "data": {"train": str(data / "train"), "val": str(data / "val"), "patch_size": 32, "batch_size": 2},
        "train": {"iterations": 4, "val_every": 2, "checkpoint_every": 4, "log_every": 2, "lr": 2e-3},
        "search": {"max_concurrent_trials": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "storage": {"path": str(tmp_path / "runs")},
        "ablation": two_factor_ablation(**ablation),
    }


def check_latex(text: str, rows: int, columns: int) -> None:
    """Balanced environments and braces, booktabs rules once each, `rows` body rows of `columns` cells."""
    stack: list[str] = []
    for kind, name in re.findall(r"\\(begin|end)\{(\w+)\}", text):
        if kind == "begin":
            stack.append(name)
        else:
            assert stack and stack.pop() == name, f"\\end{{{name}}} closes nothing"
    assert not stack, f"unclosed: {stack}"
    unescaped = re.sub(r"\\[{}]", "", text)
    assert unescaped.count("{") == unescaped.count("}")
    assert [text.count(rule) for rule in (r"\toprule", r"\midrule", r"\bottomrule")] == [1, 1, 1]
    header = text.split("\\toprule\n")[1].split("\n")[0]
    body = text.split("\\midrule\n")[1].split("\\bottomrule")[0].strip().splitlines()
    assert len(body) == rows
    for line in [header, *body]:
        assert line.endswith(r" \\") and len(re.split(r"(?<!\\)&", line)) == columns, line


PROBE = """<script>
addEventListener("error", event => document.documentElement.dataset.errors =
  (document.documentElement.dataset.errors || "") + (event.message || "resource failed") + ";", true);
addEventListener("load", () => document.documentElement.dataset.images = Array.from(document.images)
  .map(image => image.complete && image.naturalWidth > 0 ? "ok" : "broken").join(","));
</script>"""


def open_in_chromium(page: Path, tmp_path: Path) -> dict[str, str]:
    """Load the page in headless Chromium with a probe script added; returns what the probe found:
    `images` ("ok"/"broken" per <img>) and `errors` (script or resource errors)."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is not installed: apt-get install -y chromium (make test installs it as root)"
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("<head>", f"<head>{PROBE}", 1))
    # No network here: without the background-networking flags Chromium keeps trying Google's hosts.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'chromium'}"]
    done = subprocess.run([chromium, *flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    root = re.search(r"<html[^>]*>", done.stdout)
    assert root, done.stdout[:500]
    return dict(re.findall(r'data-(\w+)="([^"]*)"', root.group(0)))


def csv_rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / CSV_FILE).read_text())))


def log_trial(client: MlflowClient, tracking: dict[str, str], variant: Variant, seed: int, metrics: dict[str, float],
              status: str = "FINISHED") -> None:
    """A child run as the sweep writes it: tagged with its variant and seed, `metrics` at the last
    validation (iteration 4), loss and throughput histories, one hour long."""
    run = client.create_run(tracking["experiment_id"], start_time=1000, tags={
        PARENT_TAG: tracking["parent_run_id"], VARIANT_TAG: variant.label, FACTOR_TAG: variant.factor,
        SEED_TAG: str(seed), MACHINE_TAG: machine_name(use_gpu=False)})
    history = [Metric(key, value, 0, 4) for key, value in metrics.items()]
    history += [Metric("loss", 1 / step, 0, step) for step in (2, 4)]
    history += [Metric("images_per_s", value, 0, step) for step, value in ((2, 1.0), (4, 3.0), (6, 20.0))]
    client.log_batch(run.info.run_id, metrics=history)
    client.set_terminated(run.info.run_id, status=status, end_time=1000 + HOUR_MS)


def test_report_numbers_from_mlflow(tmp_path: Path) -> None:
    """Child runs written as the sweep writes them (two seeds per variant, one failed run): means,
    sample std, Δ%, median throughput and CPU-hours; the files; the HTML page in Chromium."""
    spec = parse_spec(ablation_spec("report-numbers", tmp_path, tmp_path, seeds=[1, 2]))
    tracking = open_sweep_run(spec, str(tmp_path / "runs" / spec.name), resume=False)
    client = MlflowClient(tracking["uri"])
    client.set_tag(tracking["parent_run_id"], ABLATION_TAG, spec.name)
    logged: dict[str, list[float]] = {}
    for index, variant in enumerate(spec_variants(spec)):
        for seed in (1, 2, 3):
            psnr = 20.0 + index + seed / 10
            metrics = {"params_m": 0.2 - index / 100, "conv_gmacs": 1.3 + index / 10, "total_gmacs": 1.5,
                       "psnr": psnr, "ssim": 0.5 + seed / 100}
            failed = seed == 3  # a third, failed run of every variant: not counted
            log_trial(client, tracking, variant, seed, metrics, status="FAILED" if failed else "FINISHED")
            if not failed:
                logged.setdefault(variant.label, []).append(psnr)

    report = build_report(client, spec.name)
    rows = {row["variant"]: row for row in report.rows}
    assert list(rows) == ["CSA", "GLMHA", "Performer", "FFN x2", "FFN x1.5"]
    for label, values in logged.items():
        row = rows[label]
        assert row["runs"] == 2
        assert row["psnr"] == pytest.approx(statistics.fmean(values))
        assert row["psnr_std"] == pytest.approx(statistics.stdev(values))
        assert row["images_per_s"] == 3.0 and row["cpu_hours"] == 1.0
    assert rows["FFN x1.5"]["conv_gmacs_delta_pct"] == pytest.approx((1.7 - 1.3) / 1.3 * 100)
    assert rows["FFN x1.5"]["params_m_delta_pct"] == pytest.approx((0.16 - 0.2) / 0.2 * 100)

    folder = write_report(report, tmp_path / "report")
    assert {path.name for path in folder.iterdir()} == {CSV_FILE, MARKDOWN_FILE, LATEX_FILE, HTML_FILE,
                                                        *(f"{plot}.{kind}" for plot in PLOTS for kind in ("png", "svg"))}
    markdown = (folder / MARKDOWN_FILE).read_text()
    assert "| CSA (baseline) |" in markdown and "**24.15 ± 0.07**" in markdown  # FFN x1.5: the best PSNR by 1 dB
    assert f"† Timings measured on {machine_name(use_gpu=False)}: they depend on the machine" in markdown
    assert all(row["machine"] == machine_name(use_gpu=False) for row in csv_rows(folder))
    report.rows[0]["images_per_s"] = 30.0  # by far the fastest: a timing is still not marked
    report.rows[3]["psnr"] = 24.10  # FFN x2 within the seeds' spread of FFN x1.5: no PSNR marked
    table = markdown_table(report)
    assert "| 30.0 |" in table and "**30.0**" not in table
    assert "24.15 ± 0.07" in table and "**24.15" not in table
    check_latex((folder / LATEX_FILE).read_text(), rows=5, columns=8)  # Method, Factor, FLOPs ... CPU-h
    assert open_in_chromium(folder / HTML_FILE, tmp_path) == {"images": "ok,ok,ok"}


@pytest.mark.parametrize("values, spread, expected", [
    ([(24.15, 0.07), (24.10, 0.07), (23.0, 0.07)], True, None),  # the lead (0.05) is within the spread
    ([(24.15, 0.03), (24.10, 0.07), (23.0, 0.01)], True, None),  # ... within the runner-up's
    ([(24.15, 0.01), (24.10, 0.01), (23.0, 0.01)], True, 24.15),
    ([(24.15, None), (24.10, None)], True, None),  # one seed: no spread known
    ([(24.15, None), (None, None)], True, 24.15),  # the only value
    ([(24.15, 0.5), (24.15, 0.5)], True, None),  # a tie
    ([(1.30, None), (1.31, None)], False, 1.30),  # FLOPs: no seeds, any lead
])
def test_best_is_marked_only_beyond_the_spread(values: list[tuple[float | None, float | None]], spread: bool,
                                               expected: float | None) -> None:
    rows = [{"psnr": value, "psnr_std": std, "conv_gmacs": value} for value, std in values]
    column = Column("psnr", "PSNR", ".2f", "max", spread=True) if spread else Column("conv_gmacs", "FLOPs (G)", ".2f", "min")
    assert best_value(rows, column) == expected
    assert best_value(rows, Column("psnr", "Train img/s", ".1f", None)) is None  # timings: never


def test_report_columns_per_validation_set(tmp_path: Path) -> None:
    """Two named validation sets: PSNR and SSIM per set, then their average (the loop's plain psnr and
    ssim), each the mean over seeds of the child runs' MLflow metrics, in every format."""
    raw = ablation_spec("report-sets", tmp_path, tmp_path, seeds=[1, 2])
    raw["data"]["val"] = {"Rain100L": str(tmp_path / "Rain100L"), "Rain100H": str(tmp_path / "Rain100H")}
    spec = parse_spec(raw)
    tracking = open_sweep_run(spec, str(tmp_path / "runs" / spec.name), resume=False)
    client = MlflowClient(tracking["uri"])
    client.set_tag(tracking["parent_run_id"], ABLATION_TAG, spec.name)
    for index, variant in enumerate(spec_variants(spec)):
        for seed in (1, 2):
            validation = over_sets({  # what the training loop reports with two sets
                "Rain100L": {"psnr": 30.0 + index + seed / 10, "ssim": 0.9 - index / 100, "input_psnr": 25.0},
                "Rain100H": {"psnr": 20.0 - index / 2 + seed / 7, "ssim": 0.6 + seed / 100, "input_psnr": 15.0}})
            log_trial(client, tracking, variant, seed, {"params_m": 0.2, "conv_gmacs": 1.3 + index / 10,
                                                        "total_gmacs": 1.5, **validation})

    report = build_report(client, spec.name)
    keys = ["psnr/Rain100L", "ssim/Rain100L", "psnr/Rain100H", "ssim/Rain100H", "psnr", "ssim"]
    assert [column.key for column in report.metric_columns] == keys and report.val_sets == ["Rain100L", "Rain100H"]
    assert report.columns[9:21] == [name for key in keys for name in (key, f"{key}_std")]
    runs: dict[str, list[dict[str, float]]] = {}
    for child in child_runs(client, tracking["parent_run_id"]):
        runs.setdefault(child.data.tags[VARIANT_TAG], []).append(child.data.metrics)
    for row in report.rows:
        logged = runs[row["variant"]]
        for key in keys:
            assert row[key] == pytest.approx(statistics.fmean(metrics[key] for metrics in logged)), (row["variant"], key)
            assert row[f"{key}_std"] == pytest.approx(statistics.stdev(metrics[key] for metrics in logged))
        assert row["psnr"] == pytest.approx((row["psnr/Rain100L"] + row["psnr/Rain100H"]) / 2)

    folder = write_report(report, tmp_path / "report")
    for row, written in zip(report.rows, csv_rows(folder)):
        assert all(float(written[key]) == row[key] for key in keys)
    markdown = (folder / MARKDOWN_FILE).read_text()
    assert ("| Method | Factor | FLOPs (G) | Params (M) | Rain100L PSNR | Rain100L SSIM | Rain100H PSNR | Rain100H SSIM "
            "| Average PSNR | Average SSIM | Train img/s † | CPU-h † |") in markdown
    assert "metrics on Rain100L, Rain100H" in markdown and "Average: the mean over the validation sets" in markdown
    csa = next(line for line in markdown.splitlines() if line.startswith("| CSA (baseline) |"))
    assert all(cell in csa for cell in ("30.15 ± 0.07", "20.21 ± 0.10", "25.18 ± 0.09")), csa
    check_latex((folder / LATEX_FILE).read_text(), rows=5, columns=12)


@pytest.fixture(scope="module")
def ray_two_slots() -> Any:
    """One local Ray for the module, with two sweep trial slots."""
    import ray

    from orchestrator.run.jobs import init_ray
    from orchestrator.run.sweep import TRIAL_RESOURCE

    init_ray(None, local_resources={TRIAL_RESOURCE: 2})
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five Ray Train jobs on a shared, loaded machine: about 10 minutes seen at load 10-30
def test_trained_ablation_report(derain_data: Path, tmp_path: Path, ray_two_slots: Any, capsys: Any) -> None:
    """2 factors x 2 settings + the baseline, trained: 5 variants, each one child run; the report's
    numbers are the MLflow metrics; `restorch report` in a fresh folder writes the same CSV; the best
    variant registered: the registry finds what the trials wrote under the names the report reads."""
    spec_file = tmp_path / "ablation.yaml"
    spec_file.write_text(yaml.safe_dump(ablation_spec("tiny-ablation", derain_data, tmp_path)))
    assert main(["ablate", str(spec_file), "--out", str(tmp_path / "report")]) == 0

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("tiny-ablation").experiment_id],
                                f"tags.`{ABLATION_TAG}` = 'tiny-ablation'")
    assert len(parent) == 1
    children = child_runs(client, parent[0].info.run_id)
    assert len(children) == 5 and all(child.info.status == "FINISHED" for child in children)
    by_label = {child.data.tags[VARIANT_TAG]: child for child in children}
    assert sorted(by_label) == sorted(["CSA", "GLMHA", "Performer", "FFN x2", "FFN x1.5"])

    folder = tmp_path / "report"
    rows = csv_rows(folder)
    assert [row["variant"] for row in rows] == ["CSA", "GLMHA", "Performer", "FFN x2", "FFN x1.5"]
    for row in rows:
        metrics = by_label[row["variant"]].data.metrics
        for key in ("psnr", "ssim", "conv_gmacs", "params_m", "total_gmacs"):
            assert float(row[key]) == metrics[key], (row["variant"], key)
        assert row["runs"] == "1" and float(row["images_per_s"]) > 0 and float(row["cpu_hours"]) > 0
        assert row["machine"] == machine_name(use_gpu=False)  # where the trial's worker ran: this machine
    markdown = (folder / MARKDOWN_FILE).read_text()
    assert f"† Timings measured on {machine_name(use_gpu=False)}" in markdown and "| Train img/s † |" in markdown
    check_latex((folder / LATEX_FILE).read_text(), rows=5, columns=8)
    assert open_in_chromium(folder / HTML_FILE, tmp_path) == {"images": "ok,ok,ok"}
    artifacts = {item.path for item in client.list_artifacts(parent[0].info.run_id, "report")}
    assert {f"report/{name}" for name in (CSV_FILE, MARKDOWN_FILE, LATEX_FILE, HTML_FILE, "pareto.png")} <= artifacts

    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    done = subprocess.run([str(BIN / "restorch"), "report", "tiny-ablation", "--tracking-uri", uri, "--out", "rebuilt"],
                          cwd=fresh, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (fresh / "rebuilt" / CSV_FILE).read_bytes() == (folder / CSV_FILE).read_bytes()

    # One set of names (orchestrator/tracking/keys.py): the registry reads the trial's own tags and metrics
    capsys.readouterr()
    assert main(["register", "tiny-ablation", "--name", "tiny-best", "--tracking-uri", uri]) == 0
    assert main(["registry", "list", "--tracking-uri", uri]) == 0
    assert main(["registry", "show", "tiny-best/1", "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    best = max(children, key=lambda child: child.data.metrics["psnr"])
    row = next(row for row in rows if row["variant"] == best.data.tags[VARIANT_TAG])
    tags = model_registry.client_for(uri).get_model_version("tiny-best", "1").tags
    assert (tags["run_id"], tags["sweep_run_id"], tags["trial_id"]) == (best.info.run_id, parent[0].info.run_id,
                                                                        best.data.tags[TRIAL_TAG])
    assert tags["params_m"] == f"{float(row['params_m']):.3f}" and tags["conv_gmacs"] == f"{float(row['conv_gmacs']):.3f}"
    assert tags["val.psnr"] == f"{float(row['psnr']):.4f}" and float(tags["images_per_s"]) > 0
    assert tags["protocol"] == best.data.tags[PROTOCOL_TAG] and tags["protocol_version"] == best.data.tags[PROTOCOL_VERSION_TAG]
    assert tags["data"] == best.data.tags[DATA_TAG] and row["machine"] == best.data.tags[MACHINE_TAG]
    assert f"params {tags['params_m']} M" in printed and f"params: {tags['params_m']} M" in printed
    assert "Metric protocol v1: PSNR/SSIM on Y" in printed and "not recorded with the run" not in printed
