"""Each model and channel attention inside a full Restormer: params, MACs, fwd and fwd+bwd time.

    .venv/bin/python benchmarks/attention.py --size 128 --repeats 5     # = restorch bench models ...
"""
import sys

from orchestrator.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "models", *sys.argv[1:]]))
