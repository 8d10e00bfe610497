"""The MLflow names restorch writes and reads: tags, metrics, params and artifacts.

Trials and `restorch train` jobs (orchestrator/tracking/runs.py, orchestrator/run/trial_job.py), ablations
(orchestrator/run/ablation_run.py) and benchmarks write them; the model registry, `restorch status`, the
reports and the service read them. Both sides import the name from here, so a reader never looks for a key
that no writer logs (tests/test_report.py registers and reports the runs of a trained ablation).
"""
from __future__ import annotations

# tags: lineage
PARENT_TAG = "mlflow.parentRunId"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
SWEEP_TAG = "restorch.sweep"  # a sweep's storage location: identifies its parent run
JOB_TAG = "restorch.job"  # a `restorch train` job's storage location: identifies its run
TRIAL_TAG = "restorch.trial_id"
EXPLOIT_TAG = "restorch.pbt.exploit"  # + ".{job}": that job of the trial continued another trial's checkpoint
REPLACES_TAG = "restorch.replaces"  # a resumed attempt's run: the run it took over (now deleted)
REPLACED_BY_TAG = "restorch.replaced_by"  # on that deleted run: the run that continues it
ATTEMPT_TAG = "restorch.attempt"  # 1, 2, ...: how many times the job started over from a checkpoint
WARM_START_TAG = "restorch.warm_start"  # a sweep's parent run: the earlier sweeps it started from, "name (run id), ..."

# tags: where and with what a sweep or job ran
HOST_TAG = "host"
PLATFORM_TAG = "platform"
USER_TAG = "mlflow.user"
VERSION_PREFIX = "version."  # + a package's name: its installed version
GIT_DIRTY_TAG = "restorch.git_dirty"
BEST_PREFIX = "best."  # on a sweep's parent run, + a results column: the best trial's value

# tags: ablations (orchestrator/spec/ablation.py): the parent run carries the ablation's name; each child run
# its variant, factor and seed
ABLATION_TAG = "restorch.ablation"
VARIANT_TAG = "restorch.ablation.variant"
FACTOR_TAG = "restorch.ablation.factor"
SEED_TAG = "restorch.ablation.seed"

# tags: what the run holds and how it ended
CHECKPOINT_PATH_TAG = "restorch.checkpoint"  # the job's latest checkpoint location (not DeepSpeed's checkpoint tag)
MODEL_TAG = "restorch.model"  # the consolidated model's artifact path, once logged
STOPPED_BY_TAG = "restorch.stopped_by"  # a trial that a scheduler (asha) or the time budget ended early
STOPPED_AT_TAG = "restorch.stopped_at"  # ... at this iteration

# tags: what the numbers mean
PROTOCOL_TAG = "restorch.protocol"  # the task's metric protocol, described
PROTOCOL_VERSION_TAG = "restorch.protocol_version"
DATA_TAG = "restorch.data"  # the validation data the metrics come from (folders, and digests of remote sets)
MACHINE_TAG = "restorch.machine"  # where rank 0 ran (host, CPU or GPU): the machine the timings were measured on

# tags of evaluation runs (restorch evaluate --model)
MODEL_NAME_TAG = "restorch.model_name"
MODEL_VERSION_TAG = "restorch.model_version"
MODEL_URI_TAG = "restorch.model_uri"
TASK_TAG = "task"

# tags of benchmark runs (restorch bench)
KIND_TAG = "restorch.kind"
BENCHMARK_TAG = "restorch.benchmark"

# tags of registered model versions (model_registry.version_tags): the run's lineage and numbers, the task under
# TASK_TAG and the sizes and speed under their metrics' names; `restorch registry` and the model card read them
SOURCE_RUN_TAG = "restorch.source_run"  # the run a version was registered from
VALIDATION_PREFIX = "val."  # + a metric: the run's final validation value
EVALUATION_PREFIX = "eval."  # + a dataset's name + ".": an evaluation's metrics, run_id, data and protocol

# metrics (besides the task's own: psnr, ssim, ... and the training reports' iteration, loss, lr, ...)
ITERATION = "iteration"
LOSS = "loss"
PARAMS_M = "params_m"
CONV_GMACS = "conv_gmacs"
TOTAL_GMACS = "total_gmacs"
IMAGES_PER_S = "images_per_s"
# ... and MLflow's system metrics (orchestrator/tracking/system_metrics.py): the machine of the job's rank 0
SYSTEM_PREFIX = "system/"  # their steps count samples, not iterations
SYSTEM_CPU_PERCENT = f"{SYSTEM_PREFIX}cpu_utilization_percentage"
SYSTEM_MEMORY_MB = f"{SYSTEM_PREFIX}system_memory_usage_megabytes"
SYSTEM_GPU_PREFIX = f"{SYSTEM_PREFIX}gpu_"  # + the GPU's index + one of these two
SYSTEM_GPU_PERCENT, SYSTEM_GPU_MEMORY_MB = "_utilization_percentage", "_memory_usage_megabytes"

# params: the job config's sections, flattened (model.glmha.alpha, train.lr, ...)
TASK_PARAM = "task.name"
MODEL_PREFIX = "model."
# params of a sweep's parent run
SPACE_PREFIX = "space."  # + a searched key: its domain
SEARCH_PREFIX = "search."  # + a search setting
TRIALS_PARAM = "trials"

# artifacts
SPEC_ARTIFACT = "spec.yaml"  # a sweep's spec (parent run) or a job's (its run)
MODEL_ARTIFACT = "model/model.pt"
REGISTRY_ARTIFACTS = "registry"  # what registering adds to a run: these files, and each version's model card
TRAIN_SPEC_ARTIFACT = f"{REGISTRY_ARTIFACTS}/train_spec.yaml"  # the spec that trains the run again
REGISTERED_MODEL_ARTIFACT = "registered_model"  # the pyfunc model a registered version points at
EVALUATION_ARTIFACT = "evaluation.json"  # an evaluation run's result record
REPORT_ARTIFACTS = "report"  # an ablation's report, in its parent run: these files
CSV_FILE, MARKDOWN_FILE, LATEX_FILE, HTML_FILE = "table.csv", "table.md", "table.tex", "report.html"

# the reproducibility record (orchestrator/tracking/record.py): on every training run, trial, evaluation, import
# and benchmark run, besides GIT_COMMIT_TAG, GIT_DIRTY_TAG, VERSION_PREFIX, HOST_TAG and PLATFORM_TAG
RUN_SEED_TAG = "restorch.seed"
DATA_DIGEST_PREFIX = "restorch.data_digest."  # + a dataset's location or benchmark name: its digest
DEVICE_TAG = "restorch.device"  # cpu, cuda: NVIDIA H200, ...
DTYPE_TAG = "restorch.dtype"
THREADS_TAG = "restorch.threads"  # torch's intra-op threads of the process that made the record
GPUS_TAG = "restorch.gpus"  # GPUs visible to it
REPORTED_CHECKPOINT_TAG = "restorch.reported_checkpoint"  # which checkpoint the metrics are of: "last", "best by psnr"
REPORTED_ITERATION_TAG = "restorch.reported_iteration"  # ... written at this iteration
TIMING_TAG = "restorch.timing"  # how speed numbers were measured: synchronised, warm-up, repeats, input size, batch
RECORD_ARTIFACTS = "reproducibility"
PACKAGES_ARTIFACT = f"{RECORD_ARTIFACTS}/packages.txt"  # every installed distribution, name==version
GIT_DIFF_ARTIFACT = f"{RECORD_ARTIFACTS}/git.diff"  # the uncommitted changes, when the tree is dirty

# tags of imported checkpoints (restorch registry import) and of evaluations on a catalogued benchmark
SOURCE_FILE_TAG = "restorch.source.file"
SOURCE_ARCH_TAG = "restorch.source.arch"
SOURCE_FORMAT_TAG = "restorch.source.format"
SOURCE_SHA256_TAG = "restorch.source.sha256"
BENCHMARK_SET_TAG = "restorch.benchmark_set"  # a catalogued test set (workloads/benchmarks.py), not a speed benchmark
# a training run's validation sets that are catalogued benchmarks (data.val: {NAME: {benchmark, path}}): + the set's
# NAME, the benchmark / its protocol ("y v1: PSNR/SSIM on Y ..."); its content digest under DATA_DIGEST_PREFIX + benchmark
VAL_BENCHMARK_PREFIX = "restorch.val_benchmark."
VAL_PROTOCOL_PREFIX = "restorch.val_protocol."
