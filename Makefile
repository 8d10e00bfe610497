# Two entry points: `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv on first use. constraints.txt pins the CPU torch wheel for this machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml constraints.txt
	@command -v g++ >/dev/null || (echo "g++ is required (DeepSpeed compiles a CPU op): apt-get install g++" && exit 1)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m workloads.deepspeed_ops  # compile DeepSpeed's CPU op once, not in the first job
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/restorch demo

# The suite CI runs. Tests marked `slow` (multi-minute Ray/MLflow/S3/PostgreSQL end-to-end runs)
# are in `make test-all`.
test: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV)
