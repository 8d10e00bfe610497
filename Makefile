# Entry points: `make demo` runs the main job, `make test` the fast suite, `make test-all` the whole suite (CI).
# Each creates .venv on first use. constraints.txt pins the CPU torch wheel for this machine.
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

# Both fail at once, before any test runs, when a program the tests need from Debian is missing
# (.ci/run installs them). `make test` skips the tests marked `slow` (multi-minute Ray/MLflow/S3/
# PostgreSQL end-to-end runs); `make test-all`, CI's command, runs them too, and fails if any test
# other than a GPU test skips.
NEEDS_CHROMIUM = @command -v chromium >/dev/null || (echo "the HTML report test needs Debian's chromium: apt-get install -y chromium" && exit 1)
NEEDS_POSTGRES = @(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb) >/dev/null 2>&1 || (echo "the shared-tracking tests need PostgreSQL: apt-get install -y postgresql" && exit 1)

test: $(STAMP)
	$(NEEDS_CHROMIUM)
	$(BIN)/python -m pytest tests -m "not slow"

test-all: $(STAMP)
	$(NEEDS_CHROMIUM)
	$(NEEDS_POSTGRES)
	$(BIN)/python -m pytest tests --no-skips --durations=30

clean:
	rm -rf $(VENV)
