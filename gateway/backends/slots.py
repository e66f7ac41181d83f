"""The tenant boundary on llama-server's KV cache: which slot a request runs in, and
whether it may reuse what that slot holds.

llama-server answers a prompt sooner, and says so in ``cached_tokens``, when the slot it
runs in still holds the prompt's beginning. A tenant that could land in a slot holding
another tenant's prompt could learn, by time or by the count, what the other asked. So
for every attempt on a replica the core takes a slot here (:meth:`SlotTable.take`) and
sends ``id_slot`` and ``cache_prompt`` itself: ``cache_prompt`` is true only when, at
take time, the slot was idle and its recorded owner is the request's own sharing scope
(:func:`kv_scope`: the client, a group the operator declared, or everyone). The rest
of the boundary is llama-server's launch options, which the fleet sets: no host-memory
prompt cache (``--cache-ram 0``: it restores a prompt cached in one slot into another)
and ``--no-cache-prompt`` (a request that does not say ``cache_prompt`` reuses nothing:
``/v1/messages`` drops the field on its way to the slot).

Rules (one record per slot: owner, requests holding it, when last touched):

* a take of an idle slot records the taker's scope as owner; a take of a busy slot
  records no owner (llama-server may run the queued requests in another order than
  they were taken, so nobody knows whose prompt ends up there);
* a release after an answer read to its end with a 2xx status keeps the owner; any
  other end (an error, a cut stream, a cancel, a failed attempt) forgets it: the
  request may not have replaced what the slot held, or may still be queued there;
* routes whose requests llama-server places itself (it ignores ``id_slot`` on
  ``/v1/messages``, embeddings and rerank) hold every slot of the replica and forget
  every owner (:meth:`SlotTable.take_all`).

The table is the host's, not the worker's: a small file per replica URL in a private
folder (``LLAMAGATE_SLOTS_DIR``), mapped into memory and changed under ``flock``, so
every worker and every gateway on the host agree (microseconds a take). Anything odd
makes takes fresh, never shared: a record untouched for :data:`OWNER_TTL` or written
before the host's last boot, a busy count older than :data:`BUSY_TTL` (a worker that
died holding it), a file of another format, and a folder that cannot be used (logged
once; requests are then still pinned, never with reuse). Several hosts sharing one
llama-server are not covered: each host keeps its own table.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import stat
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any, Mapping

log = logging.getLogger("llamagate")

# Routes whose requests llama-server runs in the slot named by id_slot, reusing its
# cache when cache_prompt is true.
PINNED_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/completion", "/infill"})
# Routes whose requests run in a slot llama-server picks itself: it drops id_slot and
# cache_prompt on /v1/messages (converted to chat), and embeddings and rerank ignore
# id_slot but leave their tokens in the slot, where a completion could reuse them.
UNPINNED_ROUTES = frozenset({"/v1/messages", "/v1/embeddings", "/embedding", "/v1/rerank", "/v1/reranking",
                             "/rerank", "/reranking"})

MAX_SLOTS = 256  # records per file: the schema's most slots per llama-server
OWNER_TTL = 3600.0  # seconds an idle slot's owner is trusted for reuse
BUSY_TTL = 3600.0  # seconds after which a slot still counted busy was left so by a dead process
UNKNOWN = bytes(16)  # no owner: the next take is fresh

_MAGIC = b"LGSLOTS2"
_HEADER = struct.Struct("<8s16s")  # magic, boot id
_RECORD = struct.Struct("<16s16sId")  # owner, conversation state held, busy, last touched (time.time())
_SIZE = _HEADER.size + MAX_SLOTS * _RECORD.size


def kv_scope(sharing: str, groups: Mapping[str, str], principal: Any) -> str:
    """Who a request's cached prompts are shared with: ``client:<id>`` (nobody else),
    ``group:<name>`` (the clients of a group the operator declared), ``global``
    (every client), or ``anonymous`` (requests without a principal: no auth plugin, so
    no tenants to keep apart).

    Args:
        sharing: The backend's ``kv_sharing``: ``none``, ``groups`` or ``global``.
        groups: Client id -> group name, with ``groups``.
        principal: The request's :class:`gateway.context.Principal`, or None.
    """
    if sharing == "global":
        return "global"
    if principal is None:
        return "anonymous"
    group = groups.get(principal.client_id)
    return f"group:{group}" if group is not None else f"client:{principal.client_id}"


def scope_id(scope: str) -> bytes:
    """The 16 bytes a scope is recorded as (never all zero: that is :data:`UNKNOWN`)."""
    return blake2b(scope.encode("utf-8", "surrogatepass"), digest_size=16, person=b"llamagate-kv").digest()


def check_private_directory(directory: str) -> None:
    """Make the folder (0700) if missing, and refuse one other users could read or change
    (the slot table, and the tenants' saved KV states in it).

    Raises:
        OSError: with the reason.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(0, "not a folder")
    if info.st_uid != os.geteuid():
        raise OSError(0, "owned by another user")
    if info.st_mode & 0o077:
        raise OSError(0, f"mode {stat.S_IMODE(info.st_mode):o}: other users could read or change it (must be 0700)")


@dataclass(eq=False)
class SlotHold:
    """One attempt's hold on a replica's slots.

    Attributes:
        slot: The slot the request is pinned to; None when it holds every slot (a
            route llama-server places itself, or a replica whose slot count is unknown).
        reuse: Whether the request may reuse what the slot holds (``cache_prompt``).
        state: The conversation state the request leaves in the slot
            (:func:`gateway.backends.kvstates.state_id`; :data:`UNKNOWN`: none known).
        held_owner, held_state: What the slot held when it was taken idle (the scope and
            the conversation state of its last clean answer), to save before this request
            replaces it; :data:`UNKNOWN` when the slot was busy or held nothing known.
    """

    table: SlotTable
    url: str
    slot: int | None
    count: int
    reuse: bool
    state: bytes = UNKNOWN
    held_owner: bytes = UNKNOWN
    held_state: bytes = UNKNOWN
    restored: int = 0  # tokens restored into the slot from a saved state for this request
    released: bool = False

    def fields(self) -> dict[str, Any]:
        """What the core writes into the payload it sends."""
        if self.slot is None:
            return {"cache_prompt": False}
        return {"id_slot": self.slot, "cache_prompt": self.reuse}

    def release(self, clean: bool) -> None:
        """Give the hold back (idempotent). ``clean``: the answer was a 2xx read to its
        end, so the slot now holds this request's prompt and its owner stands."""
        if self.released:
            return
        self.released = True
        self.table.release(self, clean)


class SlotTable:
    """The host-wide record of every replica's slots (see the module doc).

    Args:
        directory: The private folder of the files (created 0700 if missing).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._files: dict[str, mmap.mmap] = {}
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._turn = 0
        self._boot = _boot_id()
        self.broken: str | None = None  # why the folder cannot be used, once found
        try:
            check_private_directory(directory)
        except OSError as exc:
            self._broke(f"{directory}: {exc.strerror or exc}")


    def _broke(self, reason: str) -> None:
        if self.broken is None:
            log.error("slot table unusable (%s): no request reuses a cached prompt until it is fixed; "
                      "set LLAMAGATE_SLOTS_DIR to a private folder", reason)
        self.broken = reason

    # --- taking and releasing -------------------------------------------------------------

    def take(self, url: str, count: int | None, scope: str, preferred: int | None,
             state: bytes = UNKNOWN) -> SlotHold:
        """Pin one attempt on the replica ``url`` to a slot: ``preferred`` when it is
        one of the ``count`` slots, else an idle slot holding the conversation ``state``,
        else an idle slot the scope owns, else an idle slot nobody owns, else the idle
        one untouched longest, else the least busy. A replica whose slot count is unknown
        gets no slot: it is held whole (:meth:`take_all`)."""
        if not count:
            return self.take_all(url, None)
        count = min(count, MAX_SLOTS)
        owner = scope_id(scope)
        with self._locked(url) as records:
            if records is None:
                slot = preferred if preferred is not None and 0 <= preferred < count else self._next(count)
                return SlotHold(self, url, slot, count, reuse=False)
            now = time.time()
            if preferred is not None and 0 <= preferred < count:
                slot = preferred
                was, held, busy, _ = _read(records, slot, now)
            else:
                slots = _read_all(records, count, now)
                slot = _choose(slots, owner, state)
                was, held, busy, _ = slots[slot]
            reuse = busy == 0 and was == owner
            if busy:
                _write(records, slot, UNKNOWN, UNKNOWN, busy + 1, now)
                return SlotHold(self, url, slot, count, reuse=False, state=state)
            _write(records, slot, owner, state, 1, now)
        return SlotHold(self, url, slot, count, reuse=reuse, state=state, held_owner=was, held_state=held)

    def take_holding(self, url: str, count: int | None, state: bytes) -> SlotHold | None:
        """The idle slot of the replica ``url`` that holds the conversation ``state``,
        held (its record unchanged) while the gateway saves it for another replica; None
        when no idle slot holds it."""
        if not count or state == UNKNOWN:
            return None
        count = min(count, MAX_SLOTS)
        with self._locked(url) as records:
            if records is None:
                return None
            now = time.time()
            for slot, (owner, held, busy, _) in enumerate(_read_all(records, count, now)):
                if not busy and held == state and owner != UNKNOWN:
                    _write(records, slot, owner, held, 1, now)
                    return SlotHold(self, url, slot, count, reuse=False, state=state, held_owner=owner,
                                    held_state=held)
        return None

    def held(self, url: str, count: int) -> list[tuple[int, bytes, bytes]]:
        """The idle slots of the replica ``url`` that hold a known conversation:
        (slot, owner, state) each, for the fleet to save before it stops the replica."""
        count = min(count, MAX_SLOTS)
        with self._locked(url) as records:
            if records is None:
                return []
            return [(slot, owner, state) for slot, (owner, state, busy, _) in
                    enumerate(_read_all(records, count, time.time()))
                    if not busy and owner != UNKNOWN and state != UNKNOWN]

    def forget(self, url: str) -> None:
        """Every slot of the replica ``url`` holds nothing known: its llama-server was
        (re)started, with empty slots."""
        with self._locked(url) as records:
            if records is not None:
                _write_all(records, [(UNKNOWN, UNKNOWN, 0)] * MAX_SLOTS, time.time())

    def take_all(self, url: str, count: int | None) -> SlotHold:
        """Hold every slot of the replica (``count``, or all the file has room for when
        unknown) for a request that runs where llama-server puts it: every owner is
        forgotten, and every take until its release is fresh."""
        count = min(count or MAX_SLOTS, MAX_SLOTS)
        with self._locked(url) as records:
            if records is not None:
                now = time.time()
                _write_all(records, [(UNKNOWN, UNKNOWN, busy + 1) for _, _, busy, _ in _read_all(records, count, now)],
                           now)
        return SlotHold(self, url, None, count, reuse=False)

    def release(self, hold: SlotHold, clean: bool) -> None:
        with self._locked(hold.url) as records:
            if records is None:
                return
            now = time.time()
            if hold.slot is None:
                _write_all(records, [(UNKNOWN, UNKNOWN, max(0, busy - 1))
                                     for _, _, busy, _ in _read_all(records, hold.count, now)], now)
            else:
                owner, state, busy, _ = _read(records, hold.slot, now)
                if clean:
                    _write(records, hold.slot, owner, state, max(0, busy - 1), now)
                else:
                    _write(records, hold.slot, UNKNOWN, UNKNOWN, max(0, busy - 1), now)

    def _next(self, count: int) -> int:
        """Slots in turn, for a table that cannot record."""
        self._turn += 1
        return self._turn % count

    # --- the files ----------------------------------------------------------------------

    def _locked(self, url: str) -> _Locked:
        return _Locked(self, url)

    def _map(self, url: str) -> mmap.mmap | None:
        """The replica's file, mapped (opened once per process), or None when unusable."""
        if self.broken is not None:
            return None
        if os.getpid() != self._pid:  # a forked child: the parent's descriptors share its locks
            self._files, self._fds, self._pid = {}, {}, os.getpid()
        mapped = self._files.get(url)
        if mapped is not None:
            return mapped
        path = os.path.join(self.directory, blake2b(url.encode(), digest_size=16).hexdigest() + ".slots")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._broke(f"{path}: {exc.strerror or exc}")
            return None
        try:
            info = os.fstat(fd)
            if info.st_uid != os.geteuid():
                raise OSError(0, "owned by another user")
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if info.st_size != _SIZE or os.pread(fd, _HEADER.size, 0) != _HEADER.pack(_MAGIC, self._boot):
                    # new, of another format, or from before the last boot: every slot unknown
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, _SIZE)
                    os.pwrite(fd, _HEADER.pack(_MAGIC, self._boot), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            mapped = mmap.mmap(fd, _SIZE)
        except OSError as exc:
            os.close(fd)
            self._broke(f"{path}: {exc.strerror or exc}")
            return None
        self._files[url], self._fds[url] = mapped, fd
        return mapped


class _Locked:
    """``with table._locked(url) as records``: the replica's mapped records under the
    process's lock and the file's ``flock`` (None when the table cannot record)."""

    __slots__ = ("table", "url", "fd")

    def __init__(self, table: SlotTable, url: str) -> None:
        self.table, self.url, self.fd = table, url, None

    def __enter__(self) -> mmap.mmap | None:
        self.table._lock.acquire()
        try:
            records = self.table._map(self.url)
            if records is not None:
                self.fd = self.table._fds[self.url]
                fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.table._lock.release()
            raise
        return records

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.fd is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.table._lock.release()


def _read(records: mmap.mmap, slot: int, now: float) -> tuple[bytes, bytes, int, float]:
    """A slot's (owner, state, busy, touched), with the stale parts forgotten: a busy
    count older than BUSY_TTL (its holder died), an owner idle longer than OWNER_TTL."""
    return _fresh(_RECORD.unpack_from(records, _HEADER.size + slot * _RECORD.size), now)


def _read_all(records: mmap.mmap, count: int, now: float) -> list[tuple[bytes, bytes, int, float]]:
    """The first ``count`` slots as :func:`_read` sees each, in one pass (a take that
    chooses, and a whole-replica hold, read every slot: 64 calls of ``_read`` cost ~70 µs)."""
    start = _HEADER.size
    return [_fresh(record, now) for record in _RECORD.iter_unpack(records[start:start + count * _RECORD.size])]


def _fresh(record: tuple[bytes, bytes, int, float], now: float) -> tuple[bytes, bytes, int, float]:
    owner, state, busy, touched = record
    age = now - touched
    if busy and not 0 <= age <= BUSY_TTL:
        return UNKNOWN, UNKNOWN, 0, touched
    if not busy and not 0 <= age <= OWNER_TTL:
        return UNKNOWN, UNKNOWN, 0, touched
    return record


def _write(records: mmap.mmap, slot: int, owner: bytes, state: bytes, busy: int, now: float) -> None:
    _RECORD.pack_into(records, _HEADER.size + slot * _RECORD.size, owner, state, busy, now)


def _write_all(records: mmap.mmap, slots: list[tuple[bytes, bytes, int]], now: float) -> None:
    """Slots 0.. rewritten in one slice assignment."""
    start = _HEADER.size
    records[start:start + len(slots) * _RECORD.size] = b"".join(
        _RECORD.pack(owner, state, busy, now) for owner, state, busy in slots)


def _choose(slots: list[tuple[bytes, bytes, int, float]], owner: bytes, state: bytes = UNKNOWN) -> int:
    idle = [i for i, (_, _, busy, _) in enumerate(slots) if not busy]
    if not idle:
        return min(range(len(slots)), key=lambda i: slots[i][2])
    if state != UNKNOWN:
        holding = [i for i in idle if slots[i][0] == owner and slots[i][1] == state]
        if holding:
            return holding[0]  # the slot that holds the conversation
    own = [i for i in idle if slots[i][0] == owner]
    if own:
        return max(own, key=lambda i: slots[i][3])  # the one it used last: most likely its conversation
    free = [i for i in idle if slots[i][0] == UNKNOWN]
    return (free or [min(idle, key=lambda i: slots[i][3])])[0]


def _boot_id() -> bytes:
    """This boot of the host (records from before it describe llama-servers long gone)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            return blake2b(handle.read().strip(), digest_size=16).digest()
    except OSError:
        return bytes(16)


def default_directory() -> str:
    """Where the table lives when ``LLAMAGATE_SLOTS_DIR`` is not set: one folder per user
    in the temporary folder, shared by every gateway that user runs on the host."""
    return os.path.join(tempfile.gettempdir(), f"llamagate-slots-{os.geteuid()}")


_table: SlotTable | None = None


def table() -> SlotTable:
    """The process's table, made on first use from the settings."""
    global _table
    if _table is None:
        from .. import settings

        _table = SlotTable(settings.current().slots_dir or default_directory())
    return _table
