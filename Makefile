# seed-cluster: the two commands a user needs are `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := pkg-config g++ libturbojpeg0-dev libopencv-dev dataset-fashion-mnist \
	slurmctld slurmd slurm-client munge slurmdbd mariadb-server
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean-runs

setup: $(STAMP)

# Idempotent: apt only installs what is missing; the venv is rebuilt only when pyproject changes.
$(STAMP): pyproject.toml
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing apt packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m seed_cluster.demo

test: setup
	$(VENV)/bin/ruff check seed_cluster launch ffcv_build tests bench
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow and not slurm"

lint: setup
	$(VENV)/bin/ruff check seed_cluster launch ffcv_build tests bench
