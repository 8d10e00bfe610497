"""The MLflow Model Registry: register a sweep's best trial (or a run), aliases, model cards.

A registered version is an MLflow pyfunc model (workloads/pyfunc.py) logged into the trial's (or the
`restorch train` job's) own run, so its lineage is the run: tags carry the task, the metric protocol and
its version, the validation data and metrics, params and conv GMACs, training images/s, the
sweep/trial/run ids and the git commit; the version's description is its model card (also an artifact):
those, the model's full options, its evaluations (`restorch evaluate --model`) and the command that
reproduces the training. Aliases (`champion`, ...) replace MLflow's deprecated stages. The MLflow names
read here are the ones the runs are written with (orchestrator/tracking/keys.py).
"""
from __future__ import annotations

import hashlib
import os
import shlex
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

from orchestrator.tracking.keys import (CONV_GMACS, DATA_TAG, EVALUATION_ARTIFACT, EVALUATION_PREFIX, GIT_COMMIT_TAG,
                                        IMAGES_PER_S, JOB_TAG, MODEL_ARTIFACT, MODEL_NAME_TAG, MODEL_PREFIX, MODEL_TAG,
                                        MODEL_URI_TAG, MODEL_VERSION_TAG, PARAMS_M, PARENT_TAG, PROTOCOL_TAG,
                                        PROTOCOL_VERSION_TAG, REGISTERED_MODEL_ARTIFACT, REGISTRY_ARTIFACTS,
                                        SOURCE_RUN_TAG, SPACE_PREFIX, SPEC_ARTIFACT, STOPPED_BY_TAG, SWEEP_TAG,
                                        TASK_PARAM, TASK_TAG, TRAIN_SPEC_ARTIFACT, TRIAL_TAG, VALIDATION_PREFIX,
                                        BENCHMARK_SET_TAG, SOURCE_ARCH_TAG, SOURCE_FILE_TAG, SOURCE_FORMAT_TAG,
                                        SOURCE_SHA256_TAG)
from orchestrator.tracking.record import benchmark_sets, describe_record, folder_digest, log_dataset_input, log_record
from orchestrator.tracking.store import (child_runs, get_or_create_experiment, model_versions, resolve_uri,
                                         logged_spec_text, run_by_id_or_name, search_runs)

EVALUATION_EXPERIMENT = "restorch-evaluations"
IMPORT_EXPERIMENT = "restorch-imports"  # the runs of imported checkpoints
VERSION_PIP_REQUIREMENTS = ["restorch", "torch", "mlflow", "numpy"]


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


def best_child(client: MlflowClient, parent: Run, metric: str, mode: str) -> Run:
    candidates = [run for run in child_runs(client, parent.info.run_id)
                  if run.info.status == "FINISHED" and metric in run.data.metrics and STOPPED_BY_TAG not in run.data.tags]
    if not candidates:
        raise RegistryError(
            f"sweep run {parent.info.run_id} ({parent.info.run_name}) has no trial that finished training with "
            f"metric {metric!r}; "
            "register a specific run id, or choose another --metric"
        )
    return (max if mode == "max" else min)(candidates, key=lambda run: run.data.metrics[metric])


def resolve_source(client: MlflowClient, source: str, metric: str, mode: str) -> Run:
    """The run to register: the run with this id, or the best trial of the sweep with this name/id."""
    run = run_by_id_or_name(client, source)
    if run is None:
        runs = [r for r in search_runs(client, newest_first=True)
                if PARENT_TAG not in r.data.tags and (SWEEP_TAG in r.data.tags or MODEL_TAG in r.data.tags)]
        names = ", ".join(sorted({r.info.run_name for r in runs if SWEEP_TAG in r.data.tags})) or "none"
        models = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in runs if MODEL_TAG in r.data.tags) or "none"
        raise RegistryError(f"no run id or sweep called {source!r} in the tracking store; sweeps: {names}; "
                            f"runs that hold a model: {models}")
    if PARENT_TAG not in run.data.tags and child_runs(client, run.info.run_id):
        return best_child(client, run, metric, mode)
    return run


# ------------------------------------------------------------------------------------------------
# registering


def _existing_version(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    try:
        versions = model_versions(client, name)
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get(SOURCE_RUN_TAG) == run_id), None)


def _check_registrable(client: MlflowClient, run: Run, metric: str) -> None:
    run_id = run.info.run_id
    names = {Path(a.path).name for a in client.list_artifacts(run_id, Path(MODEL_ARTIFACT).parent.name)}
    if Path(MODEL_ARTIFACT).name not in names:
        raise RegistryError(
            f"run {run_id} has no {MODEL_ARTIFACT} artifact (the consolidated model a finished job logs); "
            "register a run whose training finished"
        )
    if metric not in run.data.metrics:
        have = ", ".join(sorted(run.data.metrics)) or "none"
        raise RegistryError(f"run {run_id} has no metric {metric!r} (it has: {have}); it never validated, or choose --metric")


def _spec_artifact(client: MlflowClient, run_id: str) -> dict[str, Any] | None:
    from orchestrator.spec.load import read_spec_yaml

    text = logged_spec_text(client, run_id)
    return None if text is None else read_spec_yaml(text, f"{SPEC_ARTIFACT} of run {run_id}")


def train_spec(client: MlflowClient, run: Run) -> dict[str, Any] | None:
    """The spec that reproduces this run with `restorch train`: a trial's sweep spec with the trial's
    searched values filled in, or a `restorch train` job's own spec; under a name of its own (the same
    name in the same storage would resume the finished job instead of training again)."""
    from orchestrator.spec.schema import set_dotted

    parent_id = run.data.tags.get(PARENT_TAG)
    if parent_id:
        spec = _spec_artifact(client, parent_id)
        if spec is None:
            return None
        parent = client.get_run(parent_id)
        for key in (k.removeprefix(SPACE_PREFIX) for k in parent.data.params if k.startswith(SPACE_PREFIX)):
            if key in run.data.params:
                set_dotted(spec, key, yaml.safe_load(run.data.params[key]))
        spec.pop("search", None)
        spec["name"] = f"{spec.get('name', 'run')}-{run.data.tags.get(TRIAL_TAG, run.info.run_id[:8])}"
        return spec
    if JOB_TAG not in run.data.tags:
        return None
    spec = _spec_artifact(client, run.info.run_id)
    if spec is not None:
        spec["name"] = f"{spec['name']}-reproduced"
    return spec


def reproduce_command(uri: str, run_id: str) -> str:
    """The shell command that fetches a registered run's train spec and trains it again."""
    name = Path(TRAIN_SPEC_ARTIFACT).name  # `mlflow artifacts download -d .` writes the file itself, no folders
    return (f"MLFLOW_TRACKING_URI={shlex.quote(uri)} mlflow artifacts download -r {run_id} "
            f"-a {TRAIN_SPEC_ARTIFACT} -d . && restorch train {name}")


def version_tags(run: Run, metric: str) -> dict[str, str]:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    values = {
        TASK_TAG: params.get(TASK_PARAM, ""),
        "metric": metric,
        "protocol": tags.get(PROTOCOL_TAG, ""),
        "protocol_version": tags.get(PROTOCOL_VERSION_TAG, ""),
        "data": tags.get(DATA_TAG, ""),
        PARAMS_M: f"{metrics[PARAMS_M]:.3f}" if PARAMS_M in metrics else "",
        CONV_GMACS: f"{metrics[CONV_GMACS]:.3f}" if CONV_GMACS in metrics else "",
        IMAGES_PER_S: f"{metrics[IMAGES_PER_S]:.2f}" if IMAGES_PER_S in metrics else "",
        "run_id": run.info.run_id,
        "sweep_run_id": tags.get(PARENT_TAG, ""),
        "trial_id": tags.get(TRIAL_TAG, ""),
        "git_commit": tags.get(GIT_COMMIT_TAG, ""),
    }
    for name in ("psnr", "ssim", "mrae", "rmse"):
        if name in metrics:
            values[f"{VALIDATION_PREFIX}{name}"] = f"{metrics[name]:.4f}"
    return {key: value for key, value in values.items() if value}


def model_card(version: ModelVersion, run: Run, reproduce: str, inherited: dict[str, str] | None = None) -> str:
    """The version's model card, from its tags (those of its run and of its evaluations), its run's params and
    its run's reproducibility record (`inherited`: the tags of a trial's sweep run)."""
    name, tags = version.name, version.tags
    metric_rows = "\n".join(f"| {k.removeprefix(VALIDATION_PREFIX)} | {v} |" for k, v in tags.items()
                            if k.startswith(VALIDATION_PREFIX))
    lineage = "\n".join(f"- {label}: `{tags[key]}`" for key, label in
                        [("run_id", "run"), ("sweep_run_id", "sweep run"), ("trial_id", "trial"), ("git_commit", "git commit")]
                        if key in tags)
    model_options = "\n".join(f"- `{k.removeprefix(MODEL_PREFIX)}`: {v}" for k, v in sorted(run.data.params.items())
                               if k.startswith(MODEL_PREFIX))
    protocol = f"v{tags['protocol_version']}: {tags['protocol']}" if "protocol" in tags else "not recorded with the run"
    source = (f"\n## Source\nThe authors' checkpoint `{tags[SOURCE_FILE_TAG]}` ({tags.get(SOURCE_FORMAT_TAG, '?')}), "
              f"sha256 `{tags.get(SOURCE_SHA256_TAG, '?')}`, imported into restorch's `{tags.get(SOURCE_ARCH_TAG, '?')}`\n"
              if SOURCE_FILE_TAG in tags else "")
    record = "\n".join(f"- {line}" for line in describe_record(run, inherited))
    catalogued = "".join(f"- catalogued benchmark set {line}\n" for line in benchmark_sets(run.data.tags))
    return f"""# {name} v{version.version}

Task: **{tags.get(TASK_TAG, '?')}**. Metric protocol {protocol}.

## Validation
Data: {tags.get('data', 'not recorded with the run')}
{catalogued}
| metric | value |
|---|---|
{metric_rows}
{_evaluations(tags)}
## Cost
- params: {tags.get(PARAMS_M, '?')} M
- conv GMACs at 256x256: {tags.get(CONV_GMACS, '?')}
- training throughput: {tags.get(IMAGES_PER_S, '?')} images/s

## Model options
{model_options}
{source}
## Lineage
{lineage}

## Reproducibility record
{record}

## Reproduce
```
{reproduce}
```

## Use
```
restorch restore --model models:/{name}/{version.version} --input in.png --output out.png
```
Input: float32 NCHW batch in [0, 1], any batch size and image size.
"""


def _evaluations(tags: dict[str, str]) -> str:
    """The card's section on the version's evaluations (EVALUATION_PREFIX + `{data}.*` tags), empty if none."""
    sets = sorted({key.removeprefix(EVALUATION_PREFIX).split(".")[0] for key in tags
                   if key.startswith(EVALUATION_PREFIX) and key.endswith(".run_id")})
    if not sets:
        return ""
    lines = ["", "## Evaluations"]
    for data in sets:
        prefix = f"{EVALUATION_PREFIX}{data}."
        values = ", ".join(f"{key.removeprefix(prefix)} {value}" for key, value in sorted(tags.items())
                           if key.startswith(prefix)
                           and key.removeprefix(prefix) not in ("run_id", "data", "protocol", "digest", "benchmark"))
        benchmark = f"benchmark {tags[prefix + 'benchmark']}, " if prefix + "benchmark" in tags else ""
        lines += [f"- {tags.get(prefix + 'data', data)}: {values} ({benchmark}metric protocol {tags.get(prefix + 'protocol', '?')}; "
                  f"data digest {tags.get(prefix + 'digest', 'not recorded')}; run `{tags[prefix + 'run_id']}`)"]
    return "\n".join(lines) + "\n"


def _write_card(client: MlflowClient, version: ModelVersion, uri: str) -> ModelVersion:
    """The version's card from its current tags, as its description and as an artifact of its run."""
    run = client.get_run(version.run_id)
    has_spec = any(a.path == TRAIN_SPEC_ARTIFACT for a in client.list_artifacts(run.info.run_id, REGISTRY_ARTIFACTS))
    reproduce = reproduce_command(uri, run.info.run_id) if has_spec else f"see run {run.info.run_id}"
    parent = run.data.tags.get(PARENT_TAG)
    card = model_card(version, run, reproduce, client.get_run(parent).data.tags if parent else None)
    client.log_text(run.info.run_id, card, f"{REGISTRY_ARTIFACTS}/model_card_{version.name}_v{version.version}.md")
    client.update_model_version(version.name, version.version, description=card)
    return client.get_model_version(version.name, version.version)


def register(source: str, name: str, *, metric: str = "psnr", mode: str = "max", uri: str | None = None) -> ModelVersion:
    """Register `source` (a run id, or a sweep name/id: its best trial by `metric`) as a new version
    of `name`; the same run registered again returns its existing version."""
    resolved = resolve_uri(uri)
    client = client_for(resolved)
    run = resolve_source(client, source, metric, mode)
    run_id = run.info.run_id
    existing = _existing_version(client, name, run_id)
    if existing is not None:
        return existing
    _check_registrable(client, run, metric)

    tags = version_tags(run, metric)
    spec = train_spec(client, run)
    if spec is not None:
        client.log_text(run_id, yaml.safe_dump(spec, sort_keys=False), TRAIN_SPEC_ARTIFACT)
    with tempfile.TemporaryDirectory() as folder:
        weights = client.download_artifacts(run_id, MODEL_ARTIFACT, folder)
        return _register_weights(client, resolved, run_id, weights, name, tags)


def _register_weights(client: MlflowClient, uri: str, run_id: str, weights: str, name: str,
                      tags: dict[str, str]) -> ModelVersion:
    """Log `weights` (a model.pt: config and state dict) as the run's pyfunc model, register it as a new
    version of `name` with `tags` and write its card."""
    import mlflow

    from workloads.pyfunc import WEIGHTS_ARTIFACT, RestorationModel, image_signature

    model_config = _torch_load_config(weights)
    in_channels = int(model_config.get("inp_channels", 3))
    out_channels = int(model_config.get("out_channels", in_channels))
    with fluent_store(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=REGISTERED_MODEL_ARTIFACT,
            python_model=RestorationModel(),
            artifacts={WEIGHTS_ARTIFACT: weights},
            signature=image_signature(in_channels, out_channels),
            pip_requirements=VERSION_PIP_REQUIREMENTS,
        )
    with fluent_store(uri):
        version = mlflow.register_model(info.model_uri, name, tags={**tags, SOURCE_RUN_TAG: run_id})
    return _write_card(client, client.get_model_version(name, version.version), uri)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def import_official(arch: str, checkpoint: Path, name: str, *, task: str | None = None,
                    options: dict[str, Any] | None = None, uri: str | None = None) -> ModelVersion:
    """Register the authors' released checkpoint of `arch` (models/official_weights.py) as a new version of
    `name`: loaded and checked first (a CheckpointMismatch names the keys; nothing is registered), then kept
    as an import run (experiment IMPORT_EXPERIMENT) holding model.pt, the config as model.* params and the
    source's tags (file, arch, format, SHA-256), registered the way `register` registers a trained run.

    options: restorch model options over the release's config (e.g. {"dim": 8}); task: the task it restores."""
    import torch

    from models.official_weights import load_official, model_config_for, official_format
    from orchestrator.tracking.runs import flatten, log_params
    from workloads.metrics import PROTOCOL_VERSION
    from workloads.tasks import get_task

    checkpoint = Path(checkpoint)
    release = model_config_for(arch, None)
    config = {**release, **{key: {**release[key], **value} if isinstance(release.get(key), dict) and isinstance(value, dict)
                            else value for key, value in (options or {}).items()}}
    protocol = {PROTOCOL_TAG: get_task(task).protocol.describe(), PROTOCOL_VERSION_TAG: str(PROTOCOL_VERSION)} if task else {}
    network = load_official(arch, checkpoint, config)
    digest = file_sha256(checkpoint)
    resolved = resolve_uri(uri)
    client = client_for(resolved)
    source = {SOURCE_FILE_TAG: checkpoint.name, SOURCE_ARCH_TAG: arch, SOURCE_SHA256_TAG: digest,
              SOURCE_FORMAT_TAG: f"the authors' {arch} release, {{{official_format(arch).release_key!r}: state_dict}}"}
    run_id = client.create_run(get_or_create_experiment(client, IMPORT_EXPERIMENT, resolved),
                               run_name=f"import-{name}-{checkpoint.name}",
                               tags={**source, **protocol, DATA_TAG: "none: the authors' weights (see Evaluations)"}).info.run_id
    log_params(client, run_id, {**({TASK_PARAM: task} if task else {}),
                                **{f"{MODEL_PREFIX}{key}": value for key, value in flatten(config).items()}})
    log_record(client, run_id, dtype=str(next(network.parameters()).dtype).removeprefix("torch."),
               checkpoint=f"the authors' released checkpoint {checkpoint.name} (sha256 {digest})")
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / Path(MODEL_ARTIFACT).name
        torch.save({"model_config": config, "state_dict": network.state_dict()}, weights)
        client.log_artifact(run_id, str(weights), str(Path(MODEL_ARTIFACT).parent))
        tags = {**version_tags(client.get_run(run_id), "psnr"), **source}
        tags.pop("metric", None)
        return _register_weights(client, resolved, run_id, str(weights), name, tags)


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
    versions = model_versions(client, reference.name)
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


def evaluate_version(reference: str, data: Path, task_name: str | None = None, *, benchmark: str | None = None,
                     sigma: float | None = None, uri: str | None = None) -> tuple[dict[str, Any], str]:
    """The result record of a registered version on a dataset folder (by the task protocol, or by the
    catalogued `benchmark`'s: the folder is then checked against its entry first, as `restorch data check
    --benchmark` does, and nothing is computed if it does not match), logged to a new run that is linked
    to the version (tags both ways), with the data as an MLflow dataset input (name, digest, source).
    Returns (record, run id)."""
    from orchestrator.tracking.runs import log_params, numeric_metrics
    from workloads.data import PairedDataset
    from workloads.inference import restore
    from workloads.tasks import get_task

    data = Path(data)
    if benchmark is not None:
        from workloads.benchmarks import check_benchmark

        check = check_benchmark(data, benchmark)
        if task_name is not None and task_name != check.benchmark.task:
            raise ValueError(f"--task {task_name} does not match {benchmark}, a {check.benchmark.task} benchmark: drop --task")
        if check.problems:
            raise ValueError(f"{data} does not match the benchmark {benchmark}: " + "; ".join(check.problems)
                             + f" (`restorch data benchmarks {benchmark}` shows the entry)")
        task_name, data_name, digest = check.benchmark.task, benchmark, check.digest
    elif task_name is None:
        raise ValueError("give --task TASK (the metric protocol) or --benchmark NAME (a catalogued test set names its task)")
    else:
        data_name, digest = data.name, folder_digest(data)
    task = get_task(task_name, sigma=sigma)
    metric_protocol = check.benchmark.protocol(sigma) if benchmark is not None else task.protocol  # RealBlur's aligns
    dataset = PairedDataset(data, task)
    network, version = load_network(reference, uri)
    multiple = getattr(network, "size_multiple", 8)
    per_image = {}
    for index in range(len(dataset)):
        item = dataset[index]
        output = restore(network, item["input"][None], multiple=multiple)[0]
        per_image[item["name"]] = metric_protocol.measure(output.numpy().transpose(1, 2, 0),
                                                          item["target"].numpy().transpose(1, 2, 0))
    model_uri = f"models:/{version.name}/{version.version}"
    record = {"task": task.name, "model": model_uri, "data": str(data), "benchmark": benchmark, "digest": digest,
              **metric_protocol.report(per_image)}
    protocol = f"v{record['protocol']['version']}: {record['protocol']['description']}"

    resolved = resolve_uri(uri)
    client = client_for(resolved)
    source = client.get_run(version.run_id)
    tags = {MODEL_NAME_TAG: version.name, MODEL_VERSION_TAG: str(version.version), MODEL_URI_TAG: model_uri,
            DATA_TAG: str(data), TASK_TAG: task.name, PROTOCOL_TAG: metric_protocol.describe(),
            PROTOCOL_VERSION_TAG: str(record["protocol"]["version"]), **({BENCHMARK_SET_TAG: benchmark} if benchmark else {})}
    run_id = client.create_run(get_or_create_experiment(client, EVALUATION_EXPERIMENT, resolved),
                               run_name=f"eval-{version.name}-v{version.version}-{data_name}", tags=tags).info.run_id
    log_record(client, run_id, datasets={data_name: digest}, dtype=str(next(network.parameters()).dtype).removeprefix("torch."),
               checkpoint=f"registered version {model_uri}")
    log_dataset_input(client, run_id, data_name, digest, data, protocol, context="evaluation")
    # what the numbers are of: the evaluated model's options and size, as its training run logged them
    log_params(client, run_id, {k: v for k, v in source.data.params.items() if k.startswith(MODEL_PREFIX)})
    sizes = {key: source.data.metrics[key] for key in (PARAMS_M, CONV_GMACS) if key in source.data.metrics}
    client.log_batch(run_id, metrics=numeric_metrics({**sizes, **record["mean"]}, 0))
    client.log_dict(run_id, record, EVALUATION_ARTIFACT)
    client.set_terminated(run_id)
    prefix = f"{EVALUATION_PREFIX}{data_name}"
    evaluation = {**{f"{prefix}.{name}": f"{value:.4f}" for name, value in record["mean"].items()},
                  f"{prefix}.run_id": run_id, f"{prefix}.data": str(data), f"{prefix}.protocol": protocol,
                  f"{prefix}.digest": digest, **({f"{prefix}.benchmark": benchmark} if benchmark else {})}
    for key, value in evaluation.items():
        client.set_model_version_tag(version.name, str(version.version), key, value)
    _write_card(client, client.get_model_version(version.name, str(version.version)), resolved)
    return record, run_id
