# Thin wrappers: each target is one or two commands. `make run` and `make test` are the README's
# two set-up commands; both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install run train serve test format bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[train,serve,fast,dev]' && touch $@

install: $(STAMP)

FMNIST := /usr/share/datasets/fashion-mnist

# Train (if models/ is empty), index the gallery, serve. As root on Debian it installs the data set.
run: install
	@test -d $(FMNIST) || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	$(PY) -m training.quickstart

train: install
	$(PY) -m training.run

serve: install
	$(PY) -m service

test: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks $(BENCH_ARGS)

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .
