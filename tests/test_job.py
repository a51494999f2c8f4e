"""What every job task sets up for itself (seed_cluster.job)."""

from __future__ import annotations

import os
import sys
import types

from seed_cluster.job import quiet_numba_finalizers


def _unraisable(exc: BaseException, filename: str):
    """An unraisable-exception record whose innermost frame ran in `filename` (as the interpreter builds one)."""
    code = compile("raise exc", filename, "exec")
    try:
        exec(code, {"exc": exc})
    except BaseException as e:  # noqa: BLE001 - any exception is what an unraisable hook receives
        return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                     err_msg="Exception ignored in", object=None)


def test_numba_finalizer_key_errors_are_dropped_and_every_other_unraisable_exception_is_kept(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    quiet_numba_finalizers()
    quiet_numba_finalizers()  # idempotent: one filter, not two stacked
    numba_file = os.path.join("site-packages", "numba", "core", "dispatcher.py")
    sys.unraisablehook(_unraisable(KeyError("overload"), numba_file))
    kept = [_unraisable(KeyError("mine"), "seed_cluster/cache.py"), _unraisable(ValueError("x"), numba_file)]
    for record in kept:
        sys.unraisablehook(record)
    assert seen == kept
