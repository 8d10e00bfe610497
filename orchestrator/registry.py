"""The MLflow Model Registry: register a sweep's best trial (or a run), aliases, model cards.

A registered version is an MLflow pyfunc model (workloads/pyfunc.py) logged into the trial's own
run, so its lineage is the run: tags carry the task, the metric protocol, the validation metrics,
params and conv GMACs, training images/s, the sweep/trial/run ids and the git commit; the version's
description is its model card (also an artifact), which ends with the command that reproduces
the training. Aliases (`champion`, ...) replace MLflow's deprecated stages.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.tracking import PARENT_TAG, TRIAL_TAG, resolve_uri

MODEL_ARTIFACT = "model/model.pt"
EVALUATION_EXPERIMENT = "restorch-evaluations"
SOURCE_RUN_TAG = "restorch.source_run"
VERSION_PIP_REQUIREMENTS = ["restorch", "torch", "mlflow", "numpy"]
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class RegistryError(ValueError):
    """A registry request that cannot be served; the message says what exists."""


@dataclass(frozen=True)
class ModelReference:
    """`name`, `name@alias`, `name/version` or `models:/name@alias` / `models:/name/version`."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelReference:
        body = text.removeprefix("models:/")
        if "@" in body:
            name, alias = body.split("@", 1)
            return cls(name, alias=alias)
        if "/" in body:
            name, version = body.split("/", 1)
            return cls(name, version=version)
        return cls(body)

    @property
    def uri(self) -> str:
        suffix = f"@{self.alias}" if self.alias else f"/{self.version}" if self.version else ""
        return f"models:/{self.name}{suffix}"


FLUENT_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_model, register_model, load_model) reads process-wide URIs,
    and setting them also sets $MLFLOW_TRACKING_URI / $MLFLOW_REGISTRY_URI. Set them for the block only:
    a long-lived process (the service, a notebook, a test session) would otherwise keep sending its
    later runs and registry calls to this store, and every MlflowClient without a registry URI with them."""
    import mlflow

    saved = {name: os.environ.get(name) for name in FLUENT_URI_ENV}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def client_for(uri: str | None = None) -> MlflowClient:
    """A client of the tracking store (`uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db), which is
    also the registry."""
    resolved = resolve_uri(uri)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


# ------------------------------------------------------------------------------------------------
# which run to register


def _children(client: MlflowClient, run: Run) -> list[Run]:
    return client.search_runs([run.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{run.info.run_id}'")


def _top_level_runs(client: MlflowClient, name: str | None = None) -> list[Run]:
    """Runs that are not trials (sweeps, single jobs), newest first; only those called `name` if given."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    where = f"attributes.run_name = '{name}'" if name else ""
    runs = client.search_runs(experiments, filter_string=where, order_by=["attributes.start_time DESC"],
                              max_results=500) if experiments else []
    return [run for run in runs if PARENT_TAG not in run.data.tags]


def best_child(client: MlflowClient, parent: Run, metric: str, mode: str) -> Run:
    candidates = [run for run in _children(client, parent)
                  if run.info.status == "FINISHED" and metric in run.data.metrics]
    if not candidates:
        raise RegistryError(
            f"sweep run {parent.info.run_id} ({parent.info.run_name}) has no finished trial with metric {metric!r}; "
            "register a specific run id, or choose another --metric"
        )
    return (max if mode == "max" else min)(candidates, key=lambda run: run.data.metrics[metric])


def resolve_source(client: MlflowClient, source: str, metric: str, mode: str) -> Run:
    """The run to register: the run with this id, or the best trial of the sweep with this name/id."""
    run = None
    if _RUN_ID.match(source):
        try:
            run = client.get_run(source)
        except MlflowException:
            run = None
    if run is None:
        sweeps = _top_level_runs(client, source)
        if not sweeps:
            names = sorted({r.info.run_name for r in _top_level_runs(client)})
            raise RegistryError(f"no run id or sweep called {source!r} in the tracking store; sweeps: {', '.join(names) or 'none'}")
        run = sweeps[0]
    if PARENT_TAG not in run.data.tags and _children(client, run):
        return best_child(client, run, metric, mode)
    return run


# ------------------------------------------------------------------------------------------------
# registering


def _existing_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get(SOURCE_RUN_TAG) == run_id), None)


def _check_registrable(client: MlflowClient, run: Run, metric: str) -> None:
    run_id = run.info.run_id
    names = {Path(a.path).name for a in client.list_artifacts(run_id, "model")}
    if Path(MODEL_ARTIFACT).name not in names:
        raise RegistryError(
            f"run {run_id} has no {MODEL_ARTIFACT} artifact (the consolidated model a finished job logs); "
            "register a run whose training finished"
        )
    if metric not in run.data.metrics:
        have = ", ".join(sorted(run.data.metrics)) or "none"
        raise RegistryError(f"run {run_id} has no metric {metric!r} (it has: {have}); it never validated, or choose --metric")


def trial_spec(client: MlflowClient, run: Run) -> dict[str, Any] | None:
    """The spec that reproduces this run: its sweep's spec with the trial's searched values filled in."""
    parent_id = run.data.tags.get(PARENT_TAG)
    if not parent_id:
        return None
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(parent_id, "spec.yaml", folder)
        except (MlflowException, OSError):
            return None
        spec = yaml.safe_load(Path(path).read_text())
    parent = client.get_run(parent_id)
    from orchestrator.spec import set_dotted

    for key in (k.removeprefix("space.") for k in parent.data.params if k.startswith("space.")):
        if key in run.data.params:
            set_dotted(spec, key, yaml.safe_load(run.data.params[key]))
    spec.pop("search", None)
    spec["name"] = f"{spec.get('name', 'run')}-{run.data.tags.get(TRIAL_TAG, run.info.run_id[:8])}"
    return spec


def version_tags(run: Run, metric: str) -> dict[str, str]:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    values = {
        "task": params.get("task.name", ""),
        "metric": metric,
        "protocol": tags.get("restorch.protocol", ""),
        "params_m": f"{metrics['params'] / 1e6:.3f}" if "params" in metrics else "",
        "conv_gmacs": f"{metrics['conv_gmacs']:.3f}" if "conv_gmacs" in metrics else "",
        "images_per_s": f"{metrics['images_per_s']:.2f}" if "images_per_s" in metrics else "",
        "run_id": run.info.run_id,
        "sweep_run_id": tags.get(PARENT_TAG, ""),
        "trial_id": tags.get(TRIAL_TAG, ""),
        "git_commit": tags.get("mlflow.source.git.commit", ""),
    }
    for name in ("psnr", "ssim", "mrae", "rmse"):
        if name in metrics:
            values[f"val.{name}"] = f"{metrics[name]:.4f}"
    return {key: value for key, value in values.items() if value}


def model_card(name: str, version: str, tags: dict[str, str], run: Run, reproduce: str) -> str:
    metric_rows = "\n".join(f"| {k.removeprefix('val.')} | {v} |" for k, v in tags.items() if k.startswith("val."))
    lineage = "\n".join(f"- {label}: `{tags[key]}`" for key, label in
                        [("run_id", "run"), ("sweep_run_id", "sweep run"), ("trial_id", "trial"), ("git_commit", "git commit")]
                        if key in tags)
    model_params = "\n".join(f"- `{k}`: {v}" for k, v in sorted(run.data.params.items()) if k.startswith("model."))
    return f"""# {name} v{version}

Task: **{tags.get('task', '?')}**. Metric protocol: {tags.get('protocol') or 'the task protocol recorded with the run'}.

## Validation
| metric | value |
|---|---|
{metric_rows}

## Cost
- params: {tags.get('params_m', '?')} M
- conv GMACs at 256x256: {tags.get('conv_gmacs', '?')}
- training throughput: {tags.get('images_per_s', '?')} images/s

## Model
{model_params}

## Lineage
{lineage}

## Reproduce
```
{reproduce}
```

## Use
```
restorch restore --model models:/{name}/{version} --input in.png --output out.png
```
Input: float32 NCHW batch in [0, 1], any batch size and image size.
"""


def register(source: str, name: str, *, metric: str = "psnr", mode: str = "max", uri: str | None = None) -> ModelVersion:
    """Register `source` (a run id, or a sweep name/id: its best trial by `metric`) as a new version
    of `name`; the same run registered again returns its existing version."""
    import mlflow

    from workloads.pyfunc import WEIGHTS_ARTIFACT, RestorationModel, image_signature

    resolved = resolve_uri(uri)
    client = client_for(resolved)
    run = resolve_source(client, source, metric, mode)
    run_id = run.info.run_id
    existing = _existing_version(client, name, run_id)
    if existing is not None:
        return existing
    _check_registrable(client, run, metric)

    tags = version_tags(run, metric)
    spec = trial_spec(client, run)
    with tempfile.TemporaryDirectory() as folder:
        weights = client.download_artifacts(run_id, MODEL_ARTIFACT, folder)
        model_config = _torch_load_config(weights)
        in_channels = int(model_config.get("inp_channels", 3))
        out_channels = int(model_config.get("out_channels", in_channels))
        if spec is not None:
            client.log_text(run_id, yaml.safe_dump(spec, sort_keys=False), "registry/train_spec.yaml")
        with fluent_store(resolved), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="registered_model",
                python_model=RestorationModel(),
                artifacts={WEIGHTS_ARTIFACT: weights},
                signature=image_signature(in_channels, out_channels),
                pip_requirements=VERSION_PIP_REQUIREMENTS,
            )
    with fluent_store(resolved):
        version = mlflow.register_model(info.model_uri, name, tags={**tags, SOURCE_RUN_TAG: run_id})
    reproduce = ("mlflow artifacts download -r {run} -a registry/train_spec.yaml -d . && "
                 "restorch train registry/train_spec.yaml").format(run=run_id) if spec else f"see run {run_id}"
    card = model_card(name, version.version, tags, run, reproduce)
    client.log_text(run_id, card, f"registry/model_card_{name}_v{version.version}.md")
    client.update_model_version(name, version.version, description=card)
    return client.get_model_version(name, version.version)


def _torch_load_config(path: str) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["model_config"]


# ------------------------------------------------------------------------------------------------
# looking up versions


def registered_names(client: MlflowClient) -> list[str]:
    return sorted(model.name for model in client.search_registered_models())


def get_version(client: MlflowClient, reference: ModelReference) -> ModelVersion:
    """The version a reference points at (latest version when neither alias nor version is given)."""
    try:
        model = client.get_registered_model(reference.name)
    except MlflowException:
        names = ", ".join(registered_names(client)) or "none"
        raise RegistryError(f"no registered model {reference.name!r}; registered models: {names}") from None
    versions = client.search_model_versions(f"name = '{reference.name}'")
    if reference.alias:
        if reference.alias not in model.aliases:
            aliases = ", ".join(f"@{a} (v{v})" for a, v in sorted(model.aliases.items())) or "none"
            raise RegistryError(f"model {reference.name!r} has no alias @{reference.alias}; aliases: {aliases}")
        return client.get_model_version_by_alias(reference.name, reference.alias)
    if reference.version:
        match = [v for v in versions if str(v.version) == str(reference.version)]
        if not match:
            existing = ", ".join(str(n) for n in sorted(int(v.version) for v in versions)) or "none"
            raise RegistryError(f"model {reference.name!r} has no version {reference.version}; versions: {existing}")
        return match[0]
    return max(versions, key=lambda v: int(v.version))


def promote(client: MlflowClient, name: str, version: str, alias: str) -> ModelVersion:
    get_version(client, ModelReference(name, version=version))
    client.set_registered_model_alias(name, alias, version)
    return client.get_model_version(name, version)


def load_network(reference: str, uri: str | None = None) -> tuple[Any, ModelVersion]:
    """The torch network of a registered version (through its pyfunc model), and the version."""
    import mlflow.pyfunc

    resolved = resolve_uri(uri)
    version = get_version(client_for(resolved), ModelReference.parse(reference))
    with fluent_store(resolved):
        model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    return model.unwrap_python_model().network, version


def evaluate_version(reference: str, data: Path, task_name: str, *, sigma: float | None = None,
                     uri: str | None = None) -> tuple[dict[str, Any], str]:
    """The benchmark record of a registered version on a dataset folder (by the task protocol),
    logged to a new run that is linked to the version (tags both ways). Returns (record, run id)."""
    from workloads.data import PairedDataset
    from workloads.inference import restore
    from workloads.tasks import get_task

    task = get_task(task_name, sigma=sigma)
    dataset = PairedDataset(data, task)
    network, version = load_network(reference, uri)
    multiple = getattr(network, "size_multiple", 8)
    per_image = {}
    for index in range(len(dataset)):
        item = dataset[index]
        output = restore(network, item["input"][None], multiple=multiple)[0]
        per_image[item["name"]] = task.protocol.measure(output.numpy().transpose(1, 2, 0),
                                                        item["target"].numpy().transpose(1, 2, 0))
    record = {"task": task.name, "model": f"models:/{version.name}/{version.version}", "data": str(data),
              **task.protocol.report(per_image)}

    client = client_for(uri)
    experiment = client.get_experiment_by_name(EVALUATION_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EVALUATION_EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"eval-{version.name}-v{version.version}-{data.name}", tags={
        "restorch.model_name": version.name, "restorch.model_version": str(version.version),
        "restorch.model_uri": record["model"], "restorch.data": str(data), "task": task.name,
        "restorch.protocol": task.protocol.describe(),
    })
    run_id = run.info.run_id
    for name, value in record["mean"].items():
        client.log_metric(run_id, name, value)
    client.log_dict(run_id, record, "evaluation.json")
    client.set_terminated(run_id)
    for name, value in record["mean"].items():
        client.set_model_version_tag(version.name, str(version.version), f"eval.{data.name}.{name}", f"{value:.4f}")
    client.set_model_version_tag(version.name, str(version.version), f"eval.{data.name}.run_id", run_id)
    return record, run_id
