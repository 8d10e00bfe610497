"""The MLflow names restorch writes and reads: tags, metrics, params and artifacts.

Trials and `restorch train` jobs (orchestrator/tracking/runs.py, orchestrator/run/trial_job.py) write them; the
registry, `restorch status` and the reports read them. Both sides import the name from here, so a reader
never looks for a key that no writer logs.
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

# tags: what the run holds and how it ended
CHECKPOINT_TAG = "restorch.checkpoint"  # the job's latest checkpoint location
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

# tags of registered model versions
SOURCE_RUN_TAG = "restorch.source_run"  # the run a version was registered from

# metrics (besides the task's own: psnr, ssim, ... and the training reports' iteration, loss, lr, ...)
ITERATION = "iteration"
PARAMS_M = "params_m"
CONV_GMACS = "conv_gmacs"
TOTAL_GMACS = "total_gmacs"
IMAGES_PER_S = "images_per_s"

# params: the job config's sections, flattened (model.glmha.alpha, train.lr, ...)
TASK_PARAM = "task.name"
MODEL_PREFIX = "model."

# artifacts
SPEC_ARTIFACT = "spec.yaml"  # a sweep's spec (parent run) or a job's (its run)
MODEL_ARTIFACT = "model/model.pt"
