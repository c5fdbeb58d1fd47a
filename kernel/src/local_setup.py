def _parallax_local_setup(path):
    """Bind rc, dview and lview in the local namespace to the kernel's
    cluster (run by the Parallax kernel when the local interpreter starts,
    after a crash and after %cluster connect). Without ipyparallel, or
    without a cluster to reach, they are stand-ins whose every use raises
    an error saying why."""
    import sys

    g = globals()

    class ParallaxNoClient:
        """Stands in for rc/dview/lview when no ipyparallel client exists."""

        def __init__(self, why):
            self._why = why

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise RuntimeError(self._why)

        def __getitem__(self, key):
            raise RuntimeError(self._why)

        def __call__(self, *args, **kwargs):
            raise RuntimeError(self._why)

        def __repr__(self):
            return f"<no ipyparallel client: {self._why}>"

    old = g.get("_parallax_rc")
    if old is not None:
        try:
            old.close()
        except Exception:
            pass
    why = None
    try:
        import ipyparallel
    except ImportError as e:
        why = (
            f"ipyparallel is not importable in the kernel's Python ({sys.executable}: {e}); "
            "`pip install ipyparallel` there to get rc, dview and lview"
        )
    else:
        if path is None:
            why = "this kernel has no cluster connection file"
        else:
            try:
                rc = ipyparallel.Client(path, timeout=15)
            except Exception as e:
                why = f"could not connect ipyparallel.Client to the kernel's hub ({path}): {e}"
    if why is not None:
        stand_in = ParallaxNoClient(why)
        g.update(rc=stand_in, dview=stand_in, lview=stand_in, _parallax_rc=None)
        return
    g.update(
        rc=rc,
        dview=rc.direct_view("all"),
        lview=rc.load_balanced_view(),
        _parallax_rc=rc,
    )
