"""Fixtures for the hub interoperability suite (see harness.py)."""

from __future__ import annotations

import atexit
from pathlib import Path

import pytest

from . import harness
from .harness import HubCluster

HERE = Path(__file__).resolve().parent

#: default per-test time limit (includes module-scoped cluster start-up)
DEFAULT_TIMEOUT = 120

atexit.register(harness.cleanup_everything)


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            in_interop = Path(str(item.path)).resolve().is_relative_to(HERE)
        except (AttributeError, ValueError):
            in_interop = False
        if in_interop and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and harness.LIVE:
        for c in harness.LIVE:
            rep.sections.append((f"interop logs: {c.label}", c.log_report()))


def pytest_report_header(config):
    return [
        f"interop hub command: {' '.join(harness.HUB_CMD)}"
        f" ({'stock ipcontroller' if harness.HUB_IS_IPCONTROLLER else 'parallax'})"
    ]


def _module_cluster(request, tmp_path_factory, **overrides):
    mod = request.module
    kwargs = dict(
        engines=getattr(mod, "ENGINES", 2),
        hub_args=getattr(mod, "HUB_ARGS", ()),
        scheme=getattr(mod, "SCHEME", None),
        label=mod.__name__.rsplit(".", 1)[-1],
    )
    kwargs.update(overrides)
    root = tmp_path_factory.mktemp(kwargs["label"])
    return HubCluster(root, **kwargs)


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory):
    """One hub + ENGINES engines shared by a test module (module attributes
    ENGINES, HUB_ARGS, SCHEME customise it)."""
    c = _module_cluster(request, tmp_path_factory)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def rc(cluster):
    """The module cluster's main Client."""
    return cluster.client


@pytest.fixture
def make_cluster(request, tmp_path_factory):
    """Factory for private clusters (for tests that kill engines or the hub)."""
    made = []

    def make(engines=2, hub_args=(), scheme=None, start=True, **kw):
        root = tmp_path_factory.mktemp(request.node.name[:40])
        c = HubCluster(
            root,
            engines=engines,
            hub_args=hub_args,
            scheme=scheme,
            label=request.node.name,
            **kw,
        )
        made.append(c)
        if start:
            c.start()
        return c

    try:
        yield make
    finally:
        for c in made:
            c.stop()


@pytest.fixture
def gate(tmp_path):
    """A harness.Gate that is always opened at teardown, so a failing test
    never leaves engines blocked for the next one."""
    g = harness.Gate(tmp_path)
    try:
        yield g
    finally:
        g.open()
