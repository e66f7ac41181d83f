"""Local admission (gateway.backends.admission.LocalAdmission): a wait that ends any other way than with
the slot never loses the slot nor leaves a ghost in the queue. The queue's order, the
per-client places, a full queue and the queue timeout are in test_reliability.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import pytest

from gateway import Principal
from gateway.config import BackendConfig
from gateway.context import RequestContext
from gateway.errors import RequestCancelledError
from gateway.backends.turns import QueuePlace
from gateway.backends.admission.local import LocalAdmission, _Waiter
from gateway.backends.upstream import Backend, InFlight

ALICE, BOB, CAROL = (QueuePlace.of(Principal(client_id=name)) for name in ("alice", "bob", "carol"))


def one_slot(max_queue: int = 8) -> LocalAdmission:
    return Backend(BackendConfig("b", ("http://x",), max_in_flight=1, max_queue=max_queue, queue_timeout=5)).admission


def in_flight() -> InFlight:
    return InFlight(RequestContext(request_id="r", method="POST", route="/v1/chat/completions"))


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in 5 s"
        time.sleep(0.01)


def test_a_request_cancelled_while_queued_leaves_the_queue_and_the_next_one_gets_the_slot():
    admission = one_slot()
    admission.acquire(ALICE)
    pool = ThreadPoolExecutor(2)
    hold = in_flight()
    cancelled = pool.submit(admission.acquire, BOB, hold)
    until(lambda: admission.queued == 1)
    behind = pool.submit(admission.acquire, CAROL)
    until(lambda: admission.queued == 2)
    hold.cancel()
    with pytest.raises(RequestCancelledError):
        cancelled.result(5)
    assert admission.queued == 1 and hold.wake is None
    admission.release()  # alice's slot goes to carol, not to bob's abandoned place
    behind.result(5)
    assert admission.in_flight == 1 and admission.queued == 0
    admission.release()
    assert admission.in_flight == 0


def test_a_slot_handed_to_a_request_that_was_cancelled_meanwhile_passes_on():
    """The cancel lands between the hand-over and the waiter waking: the waiter must
    give the slot it was handed to the next one, or the backend loses a slot for good."""
    admission = one_slot()
    admission.acquire(ALICE)
    pool = ThreadPoolExecutor(2)
    hold = in_flight()
    first: Future[float] = pool.submit(admission.acquire, BOB, hold)
    until(lambda: admission.queued == 1)
    second = pool.submit(admission.acquire, CAROL)
    until(lambda: admission.queued == 2)
    hold.ctx.cancelled = True  # cancelled, but not woken: the hand-over wakes it
    admission.release()
    with pytest.raises(RequestCancelledError):
        first.result(5)
    second.result(5)  # bob's slot came on to carol
    assert admission.in_flight == 1 and admission.queued == 0


def test_a_wait_interrupted_after_the_hand_over_gives_the_slot_back(monkeypatch):
    """An exception in the wait (a gevent Timeout, a worker shutting down) as the slot
    arrives: the slot is released, not kept by a request that is gone."""
    admission = one_slot()
    admission.acquire(ALICE)

    class Interrupted(BaseException):
        pass

    class HandedOverThenInterrupted(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            admission.release()  # alice is done: the slot is handed to this waiter
            raise Interrupted

    monkeypatch.setattr("gateway.backends.admission.local._Waiter", lambda: _Waiter(event=HandedOverThenInterrupted()))
    with pytest.raises(Interrupted):
        admission.acquire(BOB)
    assert admission.in_flight == 0 and admission.queued == 0
    assert admission.acquire(CAROL) == 0.0  # the slot is free at once


def test_a_wait_interrupted_before_the_hand_over_leaves_the_queue(monkeypatch):
    admission = one_slot()
    admission.acquire(ALICE)

    class Interrupted(BaseException):
        pass

    class InterruptedWait(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            raise Interrupted

    monkeypatch.setattr("gateway.backends.admission.local._Waiter", lambda: _Waiter(event=InterruptedWait()))
    with pytest.raises(Interrupted):
        admission.acquire(BOB)
    assert admission.queued == 0 and admission.in_flight == 1
    admission.release()
    assert admission.in_flight == 0


def test_a_freed_slot_goes_to_the_queue_not_to_a_newcomer():
    """The slot is handed straight to the waiter: a request arriving between the release
    and the waiter waking up queues behind it."""
    admission = one_slot()
    admission.acquire(ALICE)
    pool = ThreadPoolExecutor(2)
    waiting = pool.submit(admission.acquire, BOB)
    until(lambda: admission.queued == 1)
    admission.release()
    newcomer = pool.submit(admission.acquire, CAROL)
    waiting.result(5)
    until(lambda: admission.queued == 1)  # carol waits: bob holds the slot
    assert not newcomer.done() and admission.in_flight == 1
    admission.release()
    newcomer.result(5)
    assert admission.in_flight == 1 and admission.queued == 0
