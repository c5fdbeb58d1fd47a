"""ipyparallel launchers that start a Parallax hub and Parallax engines.

Registered as the ``parallax`` entry point of
``ipyparallel.controller_launchers`` and ``ipyparallel.engine_launchers``,
so ``ipp.Cluster(controller="parallax", engines="parallax", n=4)`` and
``ipcluster start --controller=parallax --engines=parallax -n 4`` use them.
They are ipyparallel's local launchers with another command: ``parallax
hub`` and ``parallax engine`` take the arguments those launchers pass
(ipcontroller's and ipengine's traitlets options, $IPP_PROFILE_DIR,
$IPP_CLUSTER_ID). Engines run user code in the Python that runs ipyparallel
(``sys.executable``), which has ipyparallel for (de)serialization.
"""

import sys

from ipyparallel.cluster.launcher import (
    LocalControllerLauncher,
    LocalEngineLauncher,
    LocalEngineSetLauncher,
)
from traitlets import default

from . import binary


def _engine_cmd():
    return [binary(), "engine", f"--python={sys.executable}"]


class ParallaxControllerLauncher(LocalControllerLauncher):
    """``parallax hub`` as a local process, in place of ipcontroller."""

    entrypoint_name = "parallax"

    @default("controller_cmd")
    def _default_controller_cmd(self):
        return [binary(), "hub"]


class ParallaxEngineLauncher(LocalEngineLauncher):
    """One ``parallax engine`` as a local process, in place of ipengine."""

    @default("engine_cmd")
    def _default_engine_cmd(self):
        return _engine_cmd()


class ParallaxEngineSetLauncher(LocalEngineSetLauncher):
    """N ``parallax engine`` processes on this machine."""

    entrypoint_name = "parallax"
    launcher_class = ParallaxEngineLauncher

    @default("engine_cmd")
    def _default_engine_cmd(self):
        return _engine_cmd()
