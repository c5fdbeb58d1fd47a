# Parallax: two commands on a fresh machine — `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON3 ?= python3
CARGO ?= cargo
STAMP := $(VENV)/.requirements.stamp
BIN := target/release/parallax
# the Rust engine (evcxr and rust-analyzer's crates: most of a cold build)
# is the cargo feature rust-engine; `make build` leaves it out
RUST_FEATURES := --features rust-engine
# the wheel (maturin, `bindings = "bin"`): make wheel
MATURIN := $(VENV)/bin/maturin
DIST := dist
# one-time installs outside the venv (Debian chromium, node modules for the
# JupyterLab browser test, tmux for the jupyter console test), recorded by
# stamp files so they are not redone
STAMPS := .stamps
CHROMIUM := /usr/bin/chromium
TMUX := /usr/bin/tmux
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# JupyterLab refuses to run as root without --allow-root
LAB_ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
# the venv's python3 and jupyter first on PATH: engines run user code with
# the first python3 on PATH, and the kernelspec is installed into the venv
VENV_ENV = VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH
# the Parallax kernelspec in the venv; its engines run the venv's Python
# however Jupyter was started
KERNELSPEC_INSTALL = $(VENV_ENV) $(BIN) kernelspec install --sys-prefix \
	--env PARALLAX_PYTHON=$(abspath $(VENV))/bin/python3

# test-wheel: the wheel in a fresh venv (tests/wheel)
.PHONY: all venv build build-rust wheel test-wheel run run-rust demo-hub lab lab-deps console console-deps test test-rust test-python test-launch bench device-bundle lint clean

all: build

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# the Python path: hub, Python engines, kernel, cluster commands
build:
	$(CARGO) build --release --locked

# the same binary with the Rust engine (Rust kernel, `parallax engine
# --language rust`); both builds share target/, so switching relinks only
build-rust: $(STAMPS)/rust-src
	$(CARGO) build --release --locked $(RUST_FEATURES)

# dist/parallax_jupyter-VERSION-py3-none-PLATFORM.whl: the `parallax` binary
# (Python path), the parallax-python kernelspec and the parallax_jupyter
# package (kernel launcher, ipyparallel launchers); maturin builds in
# target/ like `make build`
wheel: venv
	rm -f $(DIST)/parallax_jupyter-*.whl
	$(MATURIN) build --release --locked --out $(DIST)
	# maturin's binary (no Rust engine, stripped) replaced target/release/parallax;
	# removing it makes the next cargo build link its own binary there again
	rm -f $(BIN)

# Rust engines: evcxr's embedded rust-analyzer infers the types of cell
# variables from the standard library's sources (the rust-src component)
$(STAMPS)/rust-src:
	mkdir -p $(STAMPS)
	if rustup component add rust-src; then touch $@; else \
		echo "warning: rustup could not add rust-src; Rust cells cannot infer the types of standard-library values" >&2; fi

# the Parallax kernel in the venv's Jupyter, then notebooks/overview.ipynb
# executed headless (nbclient) with its outputs printed as text
run: venv build
	$(KERNELSPEC_INSTALL) --all
	$(VENV_ENV) $(PY) scripts/run_notebook.py notebooks/overview.ipynb

# the Rust notebook (notebooks/rust-overview.ipynb) on the Parallax Rust kernel
run-rust: venv build-rust
	$(KERNELSPEC_INSTALL) --all
	$(VENV_ENV) $(PY) scripts/run_notebook.py notebooks/rust-overview.ipynb

# the earlier demo: parallax hub + 4 parallax engines driven by the stock
# ipyparallel Client
demo-hub: venv build
	PARALLAX_BIN=$(abspath $(BIN)) $(PY) scripts/demo_hub.py

# JupyterLab on notebooks/ with the Parallax kernel installed into the venv
# (extra options: make lab LAB_ARGS="--no-browser --port=9999")
LAB_ARGS ?=
lab: venv build
	$(KERNELSPEC_INSTALL) --all
	$(VENV_ENV) $(VENV)/bin/jupyter lab --ServerApp.root_dir=$(abspath notebooks) $(LAB_ROOT_FLAG) \
		--LabApp.news_url=None --LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate $(LAB_ARGS)

lab-deps: $(STAMPS)/chromium $(STAMPS)/lab-node

$(STAMPS)/chromium:
	mkdir -p $(STAMPS)
	test -x $(CHROMIUM) || $(APT_INSTALL) chromium || { $(SUDO) apt-get update && $(APT_INSTALL) chromium; }
	test -x $(CHROMIUM)
	touch $@

# jupyter console on the Parallax kernel (extra options: make console
# CONSOLE_ARGS="--kernel parallax-rust")
CONSOLE_ARGS ?= --kernel parallax-python
console: venv build
	$(KERNELSPEC_INSTALL) --all
	$(VENV_ENV) $(VENV)/bin/jupyter console $(CONSOLE_ARGS)

# the jupyter console test drives the console in a real terminal: tmux
console-deps: $(STAMPS)/tmux

$(STAMPS)/tmux:
	mkdir -p $(STAMPS)
	test -x $(TMUX) || $(APT_INSTALL) tmux || { $(SUDO) apt-get update && $(APT_INSTALL) tmux; }
	test -x $(TMUX)
	touch $@

$(STAMPS)/lab-node: tests/lab/package.json tests/lab/package-lock.json
	mkdir -p $(STAMPS)
	cd tests/lab && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# the tests need the Rust engine (tests/kernel/test_rust_*.py,
# tests/engine/test_rustc_cache.py, the engine crate's Rust cells).
# test-python builds the wheel first, then links the featured binary
# again (cargo does not re-link an up-to-date build on its own, hence the
# explicit cargo line) and checks it has the Rust engine
test: venv build-rust test-rust test-python

test-rust:
	$(CARGO) test --release --locked --workspace $(RUST_FEATURES)

# the batch systems and MPI the launcher tests start by hand (tests/launch):
# Slurm (+ munge), Son of Grid Engine, OpenMPI and MPICH from Debian. No
# daemon is started by the install (no systemd); the test fixtures start and
# stop them.
LAUNCHER_PACKAGES := slurmctld slurmd slurm-client munge openmpi-bin mpich \
	gridengine-master gridengine-exec gridengine-client \
	libslurm-perl libslurmdb-perl libswitch-perl openssh-server openssh-client
$(STAMPS)/launchers:
	mkdir -p $(STAMPS)
	command -v sbatch >/dev/null && test -x /usr/sbin/slurmctld && command -v mpiexec >/dev/null \
		&& test -x /usr/sbin/sge_qmaster && test -x /usr/sbin/sshd \
		|| $(APT_INSTALL) $(LAUNCHER_PACKAGES) || { $(SUDO) apt-get update && $(APT_INSTALL) $(LAUNCHER_PACKAGES); }
	command -v sbatch >/dev/null && command -v mpiexec >/dev/null
	touch $@

# Slurm's PBS wrappers (qsub/qstat/qdel over Slurm) for tests/launch/test_pbs.py,
# unpacked here: installing slurm-wlm-torque would remove Grid Engine (both
# own /usr/bin/qsub)
$(STAMPS)/torque/usr/bin/qsub: $(STAMPS)/launchers
	rm -rf $(STAMPS)/torque $(STAMPS)/torque.tmp && mkdir -p $(STAMPS)/torque.tmp
	cd $(STAMPS)/torque.tmp && apt-get download slurm-wlm-torque
	dpkg-deb -x $(STAMPS)/torque.tmp/slurm-wlm-torque_*.deb $(STAMPS)/torque
	rm -rf $(STAMPS)/torque.tmp
	test -x $@

test-python: venv wheel build-rust lab-deps console-deps $(STAMPS)/launchers $(STAMPS)/torque/usr/bin/qsub
	$(CARGO) build --release --locked $(RUST_FEATURES)
	grep -q EVCXR_IS_RUNTIME $(BIN) || { echo "$(BIN) was built without the Rust engine: make build-rust" >&2; exit 1; }
	PARALLAX_BIN=$(abspath $(BIN)) $(PY) -m pytest tests -q -p no:cacheprovider --ignore=tests/wheel
	# the wheel in a fresh venv: kernelspec, a notebook, ipp.Cluster(controller="parallax")
	PARALLAX_WHEEL=$$(ls $(abspath $(DIST))/parallax_jupyter-*.whl) $(PY) -m pytest tests/wheel -q -p no:cacheprovider
	# the interop suite again, with Parallax engines in place of ipengine,
	# against our hub and against stock ipcontroller (not the tests of our
	# SQLite store's own file: ipcontroller's keeps one table per session;
	# nor the hub --restore tests, which restart our hub)
	PARALLAX_ENGINES=parallax PARALLAX_BIN=$(abspath $(BIN)) $(PY) -m pytest tests/interop -q -p no:cacheprovider
	PARALLAX_ENGINES=parallax PARALLAX_HUB_CMD=$(abspath $(VENV))/bin/ipcontroller PARALLAX_BIN=$(abspath $(BIN)) \
		$(PY) -m pytest tests/interop -q -p no:cacheprovider \
		--ignore=tests/interop/test_sqlitedb.py --ignore=tests/interop/test_hub_queries_sqlitedb.py \
		--ignore=tests/interop/test_hub_restart.py

# the launcher tests alone (MPI, Slurm daemons started by the fixtures)
test-launch: venv build-rust $(STAMPS)/launchers $(STAMPS)/torque/usr/bin/qsub
	PARALLAX_BIN=$(abspath $(BIN)) $(PY) -m pytest tests/launch -q -p no:cacheprovider

# BENCH=hub|kernel|rust|scale|launch|db runs one of them (default: all, in that order);
# BENCH_DB_ARGS: bench_db's (the stock-Client rounds beside ipcontroller, then a million tasks from the load generator)
# BENCH_LAUNCH_ARGS: bench_launch's (ipcluster beside parallax cluster through mpiexec and Slurm)
BENCH_DB_ARGS ?= --include-ipcontroller --million
BENCH_LAUNCH_ARGS ?= --n 4 16 64 --rounds 1
bench: venv build-rust $(STAMPS)/launchers
	for b in $(or $(BENCH),hub kernel rust scale launch db); do \
	  args=""; [ "$$b" = db ] && args="$(BENCH_DB_ARGS)"; [ "$$b" = launch ] && args="$(BENCH_LAUNCH_ARGS)"; \
	  PARALLAX_BIN=$(abspath $(BIN)) $(PY) bench/bench_$$b.py $$args || exit $$?; done

# What bench/scale_device.sh needs on a many-core machine with Python 3.12
# and no network: the stripped binary and the wheels of ipyparallel and its
# dependencies at the venv's versions, in .device/ (git-ignored)
DEVICE_PY_VERSION ?= 3.12
device-bundle: venv build-rust
	rm -rf .device && mkdir -p .device/whl
	objcopy --strip-all $(BIN) .device/parallax
	$(PY) -m pip freeze --exclude-editable > .device/constraints.txt
	$(PY) -m pip download -q --only-binary=:all: --python-version $(DEVICE_PY_VERSION) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux1_x86_64 -c .device/constraints.txt -d .device/whl \
	  ipyparallel==$$($(PY) -c 'import ipyparallel; print(ipyparallel.__version__)')
	du -sh .device

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings
	$(CARGO) clippy --release --locked --workspace --all-targets $(RUST_FEATURES) -- -D warnings

clean:
	$(CARGO) clean
	rm -rf $(VENV) $(DIST)
