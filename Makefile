# Parallax: two commands on a fresh machine — `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON3 ?= python3
CARGO ?= cargo
STAMP := $(VENV)/.requirements.stamp
BIN := target/release/parallax

.PHONY: all venv build run test test-rust test-python bench lint clean

all: build

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

build:
	$(CARGO) build --release --locked

run: venv build
	PARALLAX_BIN=$(abspath $(BIN)) $(PY) scripts/demo_hub.py

test: venv build test-rust test-python

test-rust:
	$(CARGO) test --release --locked --workspace

test-python: venv build
	PARALLAX_BIN=$(abspath $(BIN)) $(PY) -m pytest tests -q -p no:cacheprovider
	# the interop suite again, with Parallax engines in place of ipengine,
	# against our hub and against stock ipcontroller
	PARALLAX_ENGINES=parallax PARALLAX_BIN=$(abspath $(BIN)) $(PY) -m pytest tests/interop -q -p no:cacheprovider
	PARALLAX_ENGINES=parallax PARALLAX_HUB_CMD=$(abspath $(VENV))/bin/ipcontroller PARALLAX_BIN=$(abspath $(BIN)) \
		$(PY) -m pytest tests/interop -q -p no:cacheprovider

bench: venv build
	PARALLAX_BIN=$(abspath $(BIN)) $(PY) bench/bench_hub.py

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf $(VENV)
