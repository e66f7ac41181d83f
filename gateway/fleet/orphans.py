"""No orphans: a child asks Linux to signal it when its parent dies.

It imports only the standard library: gunicorn's master imports it.
"""

from __future__ import annotations

import ctypes

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when the thread that forked it ends
    (its parent's, for a single-threaded parent); a no-op elsewhere. Called in the
    child between fork and exec (``preexec_fn``): it survives the exec."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return
