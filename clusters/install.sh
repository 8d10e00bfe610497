#!/bin/sh
# Install restorch on a cluster node, the same way on every node and in the image (clusters/Dockerfile,
# aws-gpu.yaml, local.yaml): the versions pinned in constraints.txt (torch, Ray, DeepSpeed, MLflow),
# then DeepSpeed's CPU communication op compiled once (workloads/deepspeed_ops.py), so that no job
# compiles it at its start. On a GPU node at run time DeepSpeed uses NCCL and needs no compiled op.
#
#   sh clusters/install.sh PROJECT_DIR
set -eu
project=$(cd "$1" && pwd)
command -v g++ >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q --no-install-recommends g++; }
pip install --quiet --no-cache-dir -c "$project/constraints.txt" "$project"
# Built for the CPU accelerator even where a GPU is visible: CPU jobs and CPU-only nodes load it.
cd "$project" && DS_ACCELERATOR=cpu python -m workloads.deepspeed_ops
