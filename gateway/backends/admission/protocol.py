"""What admission is (:class:`Admission`) and what it needs of a backend, a replica and a
request (:class:`AdmittedBackend`, :class:`AdmittedReplica`, :class:`Admitted`);
:mod:`gateway.backends.upstream` provides them."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from ...context import RequestContext
from ...errors import GatewayError
from ...storage.shared import Shared
from ..turns import QueuePlace


class AdmittedReplica(Protocol):
    """What shared admission needs of a replica (:class:`gateway.backends.upstream.Replica`)."""

    @property
    def available(self) -> bool:
        """Not known to be down: shared admission hands out no slot on one that is."""
        ...


class AdmittedBackend(Protocol):
    """What admission needs of a backend (:class:`gateway.backends.upstream.Backend`)."""

    name: str

    @property
    def limit(self) -> int: ...

    @property
    def replicas(self) -> Sequence[AdmittedReplica]: ...

    def replica_slots(self) -> list[int]: ...


class Admitted(Protocol):
    """What admission needs of a request (:class:`gateway.backends.upstream.InFlight`)."""

    ctx: RequestContext
    wake: Callable[[], Any] | None  # set while queued: a cancel wakes the wait
    replica: Any  # the replica shared admission gave a slot on

    @property
    def stopped(self) -> GatewayError | None: ...


class Admission(Protocol):
    """Admission to one backend.

    Attributes:
        shared: The Redis link the slots are counted in, None for this worker's own.
        in_flight: Requests this worker has admitted.
        queued: Requests of this worker waiting.
    """

    shared: Shared | None
    max_queue: int
    timeout: float

    @property
    def in_flight(self) -> int: ...

    @property
    def queued(self) -> int: ...

    def acquire(self, place: QueuePlace, in_flight: Admitted | None = None) -> float:
        """Take a slot, waiting if need be; returns the seconds waited. A cancel of
        ``in_flight`` ends the wait; the slot is never lost, whatever interrupts it.

        Raises:
            ServiceUnavailableError: the queue (or the client's share of it) is full, or
                the wait timed out.
            RequestCancelledError: cancelled while it waited.
        """
        ...

    def release(self, in_flight: Admitted | None = None) -> None: ...

    def adopt(self, backend: AdmittedBackend, max_queue: int, timeout: float) -> None:
        """A reload changed the backend: admit for ``backend`` from now on."""
        ...
