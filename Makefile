# Every target sets up .venv itself: a fresh clone needs only python3 (and apt for system packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps image-deps data test image-test lint serve bench bench-overload bench-drift clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch and torchvision are pinned in pyproject; pip takes them from this machine's wheel cache.
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests use: the Fashion-MNIST files (the shipped model's evaluation),
# Prometheus + promtool + docker-compose (the deployment tests) and HAProxy (the rolling update of
# tests/deploy/test_rollout.py), Chromium + chromedriver (the demo page's browser test, tests/browser).
# Installed only when missing.
system-deps:
	@missing=""; \
	[ -f $(FMNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v haproxy >/dev/null || missing="$$missing haproxy"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# Debian packages of `make image-test`: podman with runc (crun fails on this machine's cgroups),
# catatonit (the init `podman run --init` starts, as compose's `init: true` asks; only a Recommends of
# podman), podman-compose, and debootstrap for the base image. Installed only when missing.
image-deps:
	@missing=""; \
	for tool in podman runc podman-compose debootstrap catatonit; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

data:
	@[ -f $(FMNIST) ] || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check erde service tests bench
	$(PY) -m pytest tests

# The image built with podman from docker/Dockerfile and run as docker-compose.yml runs it, then compose's
# api + a Debian Prometheus (tests/image; README, "Deploy with docker-compose"). Needs root.
image-test: $(STAMP) image-deps data
	$(SUDO) $(PY) -m tests.image

lint: $(STAMP)
	$(VENV)/bin/ruff check erde service tests bench

serve: $(STAMP)
	$(VENV)/bin/erde serve

# Benchmarks print tables (never timed asserts); wrk is the loopback load generator.
bench: $(STAMP)
	@command -v wrk >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk)
	$(PY) -m bench.engine > reports/bench-engine.md && cat reports/bench-engine.md
	$(PY) -m bench.http > reports/bench-http.md && cat reports/bench-http.md
	# Latency per exit vs MACs per exit of the student candidates (issue 14): the time a budget really saves.
	$(PY) -m bench.exit_latency > reports/exit-latency.md && cat reports/exit-latency.md
	$(PY) -m bench.collapse > reports/bench-collapse.md && cat reports/bench-collapse.md
	$(PY) -m bench.faults > reports/bench-faults.md && cat reports/bench-faults.md
	# Inference processes per worker or one shared by every worker (issue 21): throughput and memory.
	$(PY) -m bench.sharing > reports/bench-sharing.md && cat reports/bench-sharing.md
	# Large uploads sent together: the server's memory with and without a bound on bodies held at once.
	$(PY) -m bench.uploads > reports/bench-uploads.md && cat reports/bench-uploads.md

# Our service against LitServe, BentoML, Ray Serve and naive FastAPI serving the same artifact (issue 6):
# one venv per peer under .bench/peers/ (built once, rebuilt only when its requirements file changes), then
# every server measured with wrk, interleaved; writes reports/benchmarks.md.
bench-peers: $(STAMP)
	@command -v wrk >/dev/null || ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk)
	PYTHON=$(PYTHON) bash bench/peers/venvs.sh
	$(PY) -m bench.peers.run

# Overload (issue 12): open-loop load from bench/openloop.py at 0.5-3x capacity, ERDE_OVERLOAD=degrade vs reject,
# on the student and (when exported) the teacher; writes reports/overload.md and .png. About 15 minutes;
# `$(PY) -m bench.overload --quick` is a one-minute smoke run of the harness.
bench-overload: $(STAMP) data
	$(PY) -m bench.overload

# Drift (issue 19): budgets and accuracy estimates on shifted images, ERDE_DRIFT=off vs on, both shipped
# models over HTTP, on shifts no test uses (bench/shifts.py UNSEEN); writes reports/drift.md. About 10 minutes.
bench-drift: $(STAMP) data
	$(PY) -m bench.drift
	$(PY) -m bench.estimators

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
