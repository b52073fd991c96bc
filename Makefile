# One command per habit. Every target creates .venv (and installs) when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/discoveryd.yaml

.PHONY: setup run test lint bench image clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/discoveryd run --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check discoveryd adapters tests bench
	$(BIN)/ruff format --check discoveryd adapters tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# The container image (Containerfile). Wheels are built here, outside the image, for
# this Python; IMAGE_BASE must carry the same Python minor version (default: 3.11).
IMAGE ?= discoveryd:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_BASE ?= python:3.11-slim-bookworm
IMAGE_BUILD ?= buildah bud --isolation chroot --layers=false
IMAGE_CONTEXT := build/image

image: $(STAMP)
	rm -rf $(IMAGE_CONTEXT) && mkdir -p $(IMAGE_CONTEXT)/config
	$(BIN)/python -m pip wheel --quiet --wheel-dir $(IMAGE_CONTEXT)/wheels .
	cp config/discoveryd.yaml $(IMAGE_CONTEXT)/config/
	cp -r config/serviceentries $(IMAGE_CONTEXT)/config/
	$(IMAGE_BUILD) --build-arg BASE=$(IMAGE_BASE) -f Containerfile -t $(IMAGE) $(IMAGE_CONTEXT)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
