# Entry points: `make demo` runs the main job, `make test` the fast suite, `make test-all` the whole suite (CI).
# Each creates .venv on first use. constraints.txt pins the CPU torch wheel for this machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install system-deps clean

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

# The programs the tests need from Debian (g++ for DeepSpeed's CPU op, Chromium for the HTML report
# test, PostgreSQL for the shared-tracking tests): installed when missing (as root, like CI), else
# named with the command that installs them, before any test runs.
system-deps:
	@missing=""; command -v g++ >/dev/null || missing="$$missing g++"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing from Debian:$$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "the tests need:$$missing (sudo apt-get install -y$$missing)"; exit 1; fi; fi

# `make test` skips the tests marked `slow` (multi-minute Ray/MLflow/S3/PostgreSQL end-to-end runs);
# `make test-all`, CI's command, runs them too, and fails if any test other than a GPU test skips.
test: system-deps $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

test-all: system-deps $(STAMP)
	$(BIN)/python -m pytest tests --no-skips --durations=30

clean:
	rm -rf $(VENV)
