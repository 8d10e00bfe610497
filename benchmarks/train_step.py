"""Training-step images/s of one worker, DeepSpeed (ZeRO-1) vs plain PyTorch, for CSA-Restormer,
GLMHA-Restormer and HINT; on a GPU also the model-FLOPs utilisation.

    .venv/bin/python benchmarks/train_step.py --patch 128 --repeats 3   # = restorch bench train ...
"""
import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
