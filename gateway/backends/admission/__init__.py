"""Admission to a backend: at most so many requests in flight, the rest queued in
:class:`gateway.backends.turns.QueuePlace` order (admins first, then keys by priority, then
clients in turn, first come first served within a client), each client in at most
:func:`gateway.backends.turns.client_places` of the queue; a full queue, a client holding its
share of it, or a wait past ``queue_timeout`` is a 503 with ``Retry-After``.

One protocol, :class:`Admission`, two implementations: :class:`LocalAdmission`, this
worker's own slots and queue, and :class:`SharedAdmission`, the whole gateway's in Redis
(``admission: redis``), which falls back to a :class:`LocalAdmission` while Redis cannot
be reached. :func:`admission_for` picks one for a backend, or carries the one in force
over a reload. What admission needs of a backend and of a request is declared apart
(:mod:`.protocol`: :class:`AdmittedBackend`, :class:`Admitted`); :mod:`gateway.backends.upstream` provides them.
"""

from __future__ import annotations

from ...storage.shared import Shared
from .local import LocalAdmission
from .protocol import Admission, Admitted, AdmittedBackend, AdmittedReplica
from .shared import SCRIPTS, SharedAdmission

__all__ = ["Admission", "Admitted", "AdmittedBackend", "AdmittedReplica", "LocalAdmission", "SCRIPTS",
           "SharedAdmission", "admission_for"]


def admission_for(backend: AdmittedBackend, max_queue: int, timeout: float, shared: Shared | None,
                  carried: Admission | None = None) -> Admission:
    """The admission of ``backend``: counted in ``shared`` (None: this worker's own).
    ``carried`` is the one in force before a reload changed the backend: the requests
    it admitted still count against the limit, so it carries over when it counts in
    the same place (else it empties as they complete)."""
    if carried is not None and carried.shared is shared:
        carried.adopt(backend, max_queue, timeout)
        return carried
    local = LocalAdmission(backend, max_queue, timeout)
    return local if shared is None else SharedAdmission(backend, shared, local)
