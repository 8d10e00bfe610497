"""Sweep reports from MLflow (`restorch report SWEEP`): parameter importance (PED-ANOVA, fANOVA) on synthetic
trials and its refusals, the two-way table's mean ± std and best mark, a report built from child runs written
as a sweep writes them (grid with seeds: the two-way table; multi-objective: the Pareto front), rebuilt byte
for byte; end to end, a real 2 x 2 sweep reported by `restorch report` twice."""
from __future__ import annotations

import csv
import io
import math
import random
import statistics
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_spec
from mlflow.tracking import MlflowClient
from servers import BIN

from orchestrator.cli import main
from orchestrator.report.formats import latex_float, markdown_grid, two_way_cells
from orchestrator.report.importance import MIN_TRIALS, RELIABLE_TRIALS, param_importance
from orchestrator.report.sweep import build_sweep_report, find_parent_run
from orchestrator.report.two_way import two_way_table
from orchestrator.report.sweep_page import IMPORTANCE_FILE, PARETO_FILE, REPORT_FILE, TRIALS_FILE, write_sweep_report
from orchestrator.spec.load import parse_spec
from orchestrator.spec.schema import Domain
from orchestrator.tracking.keys import CSV_FILE, HTML_FILE, LATEX_FILE, MARKDOWN_FILE, STOPPED_AT_TAG, STOPPED_BY_TAG
from orchestrator.tracking.runs import log_params, numeric_metrics, open_sweep_run, open_trial_run
from orchestrator.tracking.store import child_runs
from workloads.tasks import get_task

# Slow-marked as a module: with these, `make test` took 6 min on 2 cores (budget 5); CI runs them.
pytestmark = pytest.mark.slow

LR = Domain(key="train.lr", kind="loguniform", values=[1e-4, 1e-2])
ALPHA = Domain(key="model.glmha.alpha", kind="grid", values=[0.2, 0.4, 0.6, 0.8])


def synthetic_trials(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """PSNR peaks at lr 1e-3 and is flat in alpha (a little noise)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        lr = 10 ** rng.uniform(-4, -2)
        rows.append({"train.lr": lr, "model.glmha.alpha": rng.choice(ALPHA.values),
                     "psnr": 30 - 4 * abs(math.log10(lr) + 3) + rng.gauss(0, 0.05)})
    return rows


def test_importance_finds_the_parameter_that_matters() -> None:
    importance = param_importance([LR, ALPHA], synthetic_trials(40), "psnr", "max")
    assert importance.trials == 40 and importance.note is None  # 40 >= RELIABLE_TRIALS: no warning
    assert set(importance.values) == {"ped_anova", "fanova"}
    for values in importance.values.values():
        assert values["train.lr"] > values["model.glmha.alpha"]
        assert sum(values.values()) == pytest.approx(1.0)
    assert importance.parameters == ["train.lr", "model.glmha.alpha"]
    # loss-like metric: lower is better, the same parameter matters
    flipped = [{**row, "loss": -row["psnr"]} for row in synthetic_trials(40)]
    assert param_importance([LR, ALPHA], flipped, "loss", "min").parameters[0] == "train.lr"
    assert param_importance([LR, ALPHA], synthetic_trials(40), "psnr", "max").values == importance.values  # rebuilt


def test_importance_on_too_few_trials_says_why() -> None:
    few = param_importance([LR, ALPHA], synthetic_trials(6), "psnr", "max")
    assert few.values and f"from 6 finished trials, fewer than {RELIABLE_TRIALS}: a hint" in few.note
    one = param_importance([LR, ALPHA], synthetic_trials(MIN_TRIALS - 1), "psnr", "max")
    assert not one.values and one.note == ("no parameter importance: it needs 2 or more finished trials with psnr, "
                                           "the sweep has 1")
    nan = [{**row, "psnr": math.nan} for row in synthetic_trials(5)]  # diverged trials have no score
    assert param_importance([LR, ALPHA], nan, "psnr", "max").note.endswith("the sweep has 0")
    alone = param_importance([LR, ALPHA], [{**row, "model.glmha.alpha": 0.4} for row in synthetic_trials(8)], "psnr", "max")
    assert not alone.values and "only train.lr took two or more values over the 8 finished trials" in alone.note


def test_two_way_table_mean_std_and_best_mark() -> None:
    rows = [{"model.glmha.alpha": alpha, "train.lr": lr, "psnr": psnr}
            for alpha, lr, psnr in [(0.4, 1e-3, 20.0), (0.4, 1e-3, 20.2), (0.4, 2e-3, 21.0), (0.4, 2e-3, 21.2),
                                    (0.8, 1e-3, 24.0), (0.8, 1e-3, 24.1), (0.8, 2e-3, 22.0), (0.8, 2e-3, 22.2),
                                    (0.8, 2e-3, None)]]  # a trial without a score: not counted
    table = two_way_table(Domain(key="model.glmha.alpha", kind="grid", values=[0.4, 0.8]),
                          Domain(key="train.lr", kind="grid", values=[1e-3, 2e-3]), rows, "psnr")
    cell = table.cell(0.8, 1e-3)
    assert cell["runs"] == 2 and cell["psnr"] == pytest.approx(24.05)
    assert cell["psnr_std"] == pytest.approx(statistics.stdev([24.0, 24.1]))
    assert table.cell(0.8, 2e-3)["runs"] == 2
    headers, lines = two_way_cells(table)
    assert headers == ["model.glmha.alpha \\ train.lr", "0.001", "0.002"]
    markdown = "\n".join(markdown_grid(headers, lines))
    # 24.05 beats the runner-up (22.1 ± 0.14) by more than the larger std
    assert "| 0.8 | **24.05 ± 0.07** | 22.10 ± 0.14 |" in markdown and "| 0.4 | 20.10 ± 0.14 | 21.10 ± 0.14 |" in markdown
    assert r"\textbf{24.05 $\pm$ 0.07}" in latex_float(headers, lines, "caption", "label")
    for change in ({5: 21.3}, {7: None}):  # (0.8, 1e-3) = 22.65 ± 1.91: within the spread; 22.0 alone: no spread
        changed = [{**row, "psnr": change.get(index, row["psnr"])} for index, row in enumerate(rows)]
        close = two_way_table(Domain(key="model.glmha.alpha", kind="grid", values=[0.4, 0.8]),
                              Domain(key="train.lr", kind="grid", values=[1e-3, 2e-3]), changed, "psnr")
        assert "**" not in "\n".join(markdown_grid(*two_way_cells(close)))


# ------------------------------------------------------------------------------------------------
# reports built from child runs written as a sweep writes them


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store for the module's sweeps (each in its own experiment): creating one takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def log_sweep(spec_data: dict[str, Any], trials: list[dict[str, Any]], tmp_path: Path) -> str:
    """A sweep's parent run and one child run per trial: its searched values as params, its final metrics;
    `status` FINISHED, FAILED or `stopped` (by asha at iteration 3). Returns the parent run id."""
    spec = parse_spec(spec_data)
    tracking = open_sweep_run(spec, str(tmp_path / "runs" / spec.name), resume=False)
    client = MlflowClient(tracking["uri"])
    for index, trial in enumerate(trials):
        run_id, _ = open_trial_run(tracking, f"trial_{index:05d}", f"{spec.name}_{index}")
        log_params(client, run_id, trial["params"])
        client.log_batch(run_id, metrics=numeric_metrics(trial["metrics"], trial["metrics"].get("iteration", 6)))
        if trial.get("status") == "stopped":
            client.set_tag(run_id, STOPPED_BY_TAG, "asha")
            client.set_tag(run_id, STOPPED_AT_TAG, "3")
        client.set_terminated(run_id, status="FAILED" if trial.get("status") == "FAILED" else "FINISHED",
                              end_time=client.get_run(run_id).info.start_time + 60_000)
    client.set_terminated(tracking["parent_run_id"])
    return tracking["parent_run_id"]


def psnr_of(alpha: float, lr: float, seed: int) -> float:
    return 20 + 10 * alpha + 1000 * lr + seed / 100


def grid_sweep(tmp_path: Path, store: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """alpha x lr x 2 seeds, one seed of (0.4, 1e-3) failed, one of (0.8, 2e-3) stopped by asha."""
    spec = tiny_spec("grid-report", tmp_path, {"model.glmha.alpha": {"grid": [0.4, 0.8]}, "train.lr": {"grid": [1e-3, 2e-3]},
                                               "train.seed": {"grid": [1, 2]}},
                     tracking={"uri": store}, storage={"path": str(tmp_path / "runs")})
    trials = []
    for alpha in (0.4, 0.8):
        for lr in (1e-3, 2e-3):
            for seed in (1, 2):
                status = {(0.4, 1e-3, 2): "FAILED", (0.8, 2e-3, 2): "stopped"}.get((alpha, lr, seed), "FINISHED")
                metrics = {"iteration": 6 if status == "FINISHED" else 3, "loss": 0.1, "ssim": 0.5,
                           "params_m": 0.01, "conv_gmacs": 0.02 + alpha / 100}
                if status != "FAILED":  # the stopped trial's PSNR is from 3 iterations of 6: lower
                    metrics["psnr"] = psnr_of(alpha, lr, seed) - 5 * (status == "stopped")
                trials.append({"params": {"model.glmha.alpha": alpha, "train.lr": lr, "train.seed": seed,
                                          "train.iterations": 6}, "metrics": metrics, "status": status})
    return spec, trials


def report_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.slow  # 15-50 s on 2 cores: keeps `make test` under 5 minutes
def test_grid_sweep_report_from_mlflow(tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]) -> None:
    """8 trials (2 x 2 x 2 seeds): the trials table (the failed and the stopped trial too), the two-way table
    of the finished ones (mean ± std over seeds), importance with its trial count and warning, the files,
    a rebuild byte for byte; `restorch report NAME` takes the sweep's path, an unknown name is refused."""
    spec, trials = grid_sweep(tmp_path, store)
    parent = log_sweep(spec, trials, tmp_path)
    client = MlflowClient(spec["tracking"]["uri"])
    report = build_sweep_report(client, find_parent_run(client, "grid-report"))
    assert report.parent_run_id == parent and report.factors == ["model.glmha.alpha", "train.lr"]
    assert len(report.rows) == 8 and len(report.finished) == 6
    assert report.rows[-1]["status"] == "FAILED" and report.rows[-1]["psnr"] is None  # no score: last
    assert [row["status"] for row in report.rows].count("stopped at 3 (asha)") == 1
    assert report.rows[0]["psnr"] == psnr_of(0.8, 2e-3, 1) and report.rows[0]["train.seed"] == 1
    table = report.two_way
    assert table.row_values == [0.4, 0.8] and table.column_values == [1e-3, 2e-3]
    cell = table.cell(0.8, 1e-3)
    assert cell["runs"] == 2 and cell["psnr"] == pytest.approx(statistics.fmean([psnr_of(0.8, 1e-3, s) for s in (1, 2)]))
    assert cell["psnr_std"] == pytest.approx(statistics.stdev([psnr_of(0.8, 1e-3, s) for s in (1, 2)]))
    assert table.cell(0.4, 1e-3)["runs"] == 1 and table.cell(0.8, 2e-3)["runs"] == 1  # failed / stopped: left out
    assert report.importance.trials == 6 and "fewer than 20" in report.importance.note
    assert set(report.importance.parameters) == {"model.glmha.alpha", "train.lr", "train.seed"}

    folder = write_sweep_report(report, tmp_path / "report")
    plots = {f"{name}.{kind}" for name in ("importance", "parallel", "heatmap") for kind in ("png", "svg")}
    assert set(report_files(folder)) == {TRIALS_FILE, IMPORTANCE_FILE, CSV_FILE, MARKDOWN_FILE, LATEX_FILE, REPORT_FILE,
                                         HTML_FILE, *plots}
    trials_csv = list(csv.DictReader(io.StringIO((folder / TRIALS_FILE).read_text())))
    assert [row["trial"] for row in trials_csv][-1] == "trial_00001" and float(trials_csv[0]["psnr"]) == psnr_of(0.8, 2e-3, 1)
    two_way = list(csv.DictReader(io.StringIO((folder / CSV_FILE).read_text())))
    assert float(two_way[1]["train.lr=0.001"]) == cell["psnr"] and two_way[1]["train.lr=0.001_runs"] == "2"
    page = (folder / REPORT_FILE).read_text()
    assert "## Parameter importance for PSNR (6 finished trials)" in page and "> Warning: from 6 finished trials" in page
    assert "| model.glmha.alpha \\ train.lr | 0.001 | 0.002 |" in (folder / MARKDOWN_FILE).read_text()
    html = (folder / HTML_FILE).read_text()
    assert html.count("data:image/png;base64,") == 3 and str(tmp_path) not in html

    assert main(["report", "grid-report", "--tracking-uri", spec["tracking"]["uri"], "--out", str(tmp_path / "cli")]) == 0
    assert "# Sweep grid-report" in capsys.readouterr().out
    assert report_files(tmp_path / "cli") == report_files(folder)  # rebuilt: the same bytes
    with pytest.raises(FileNotFoundError, match="no sweep or ablation called 'nope'.*sweeps and ablations there: grid-report"):
        find_parent_run(client, "nope")
    with pytest.raises(ValueError, match="is not the parent run of a sweep or an ablation"):
        find_parent_run(client, child_runs(client, parent)[0].info.run_id)  # a trial's run


def test_multi_objective_sweep_report(tmp_path: Path, store: str) -> None:
    """Two ranges (no two-way table: it says why), psnr up and conv_gmacs down: the Pareto front."""
    spec = tiny_spec("pareto-report", tmp_path, {"model.glmha.alpha": {"uniform": [0.2, 1.0]},
                                                 "train.lr": {"loguniform": [1e-4, 1e-2]}},
                     search={"algorithm": "optuna_multi", "objectives": {"psnr": "max", "conv_gmacs": "min"},
                             "num_samples": 5},
                     tracking={"uri": store}, storage={"path": str(tmp_path / "runs")})
    points = [(0.2, 1e-3, 20.0, 0.01), (0.5, 2e-3, 22.0, 0.02), (0.9, 5e-3, 21.0, 0.03), (1.0, 1e-4, 25.0, 0.05),
              (0.3, 3e-4, 19.0, 0.04)]  # the last two: (0.9, 21, 0.03) and (0.3, 19, 0.04) are dominated
    trials = [{"params": {"model.glmha.alpha": alpha, "train.lr": lr},
               "metrics": {"iteration": 6, "psnr": psnr, "conv_gmacs": gmacs}} for alpha, lr, psnr, gmacs in points]
    log_sweep(spec, trials, tmp_path)
    client = MlflowClient(spec["tracking"]["uri"])
    report = build_sweep_report(client, find_parent_run(client, "pareto-report"))
    assert report.two_way is None and [row["psnr"] for row in report.pareto] == [25.0, 22.0, 20.0]
    folder = write_sweep_report(report, tmp_path / "report")
    assert {PARETO_FILE, "pareto.png", "importance.png", "parallel.png"} <= set(report_files(folder))
    assert CSV_FILE not in report_files(folder)
    page = (folder / REPORT_FILE).read_text()
    assert "## Pareto front (psnr max, conv_gmacs min)" in page
    assert "No two-way table: model.glmha.alpha and train.lr are not both grid or choice entries." in page


# ------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_sweep_report(derain_data: Path, tmp_path: Path) -> None:
    """A real 2 x 2 grid sweep (alpha x lr, tiny model, 4 iterations), then `restorch report NAME` twice in
    fresh folders: the two-way table holds each trial's final PSNR from MLflow, the importance figure and
    its trial count are there, both reports are the same bytes."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tiny_spec("real-sweep-report", derain_data, {"model.glmha.alpha": {"grid": [0.4, 0.8]},
                                                        "train.lr": {"grid": [1e-3, 3e-3]}},
                     train={"iterations": 4, "val_every": 4, "checkpoint_every": 4, "log_every": 2},
                     tracking={"uri": uri}, storage={"path": str(tmp_path / "runs")})
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    done = subprocess.run([str(BIN / "restorch"), "sweep", str(spec_file)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    folders = []
    for name in ("first", "second"):
        where = tmp_path / name
        where.mkdir()
        done = subprocess.run([str(BIN / "restorch"), "report", "real-sweep-report", "--tracking-uri", uri, "--out", "report"],
                              cwd=where, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        folders.append(where / "report")
    assert "## Parameter importance for PSNR (4 finished trials)" in done.stdout
    first = report_files(folders[0])
    assert first == report_files(folders[1])
    assert {TRIALS_FILE, CSV_FILE, MARKDOWN_FILE, LATEX_FILE, HTML_FILE, "importance.png", "parallel.png",
            "heatmap.png"} <= set(first)

    client = MlflowClient(uri)
    parent = find_parent_run(client, "real-sweep-report")
    psnr = {(float(run.data.params["model.glmha.alpha"]), float(run.data.params["train.lr"])): run.data.metrics["psnr"]
            for run in client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert len(psnr) == 4
    cells = {(row["model.glmha.alpha"], key.removeprefix("train.lr=")): value
             for row in csv.DictReader(io.StringIO(first[CSV_FILE].decode()))
             for key, value in row.items() if key.startswith("train.lr=") and "_" not in key.removeprefix("train.lr=")}
    assert {(float(alpha), float(lr)): float(value) for (alpha, lr), value in cells.items()} == psnr
    markdown = first[MARKDOWN_FILE].decode()
    assert "| model.glmha.alpha \\ train.lr | 0.001 | 0.003 |" in markdown
    protocol = get_task("deraining").protocol  # under the table: the trials' protocol, read from their tags
    assert f"Protocol: {protocol.describe()} — protocol v{protocol.as_dict()['version']}." in markdown
    assert "Protocol: PSNR/SSIM on Y" in first[LATEX_FILE].decode().split(r"\end{tabular}")[1]
    importance = first[REPORT_FILE].decode()
    assert "> Warning: from 4 finished trials, fewer than 20" in importance
