"""Saved KV states (gateway.backends.kvstates), without llama-server: which conversation a
slot holds in the host's table, the names, the budget, and the attempt layer's saves and
restores against a stand-in for llama-server's ``/slots`` actions (the real ones:
tests/integration/test_kv_states.py)."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway.backends import kvstates, slots
from gateway.backends.kvstates import Budget, Outcome, States, enforce_budget, file_name
from gateway.backends.slots import UNKNOWN, SlotTable, scope_id

URL = "http://127.0.0.1:8081"
A, B = "client:alice", "client:bob"
SA, SB = scope_id(A), scope_id(B)
ONE, TWO = b"\x01" * 16, b"\x02" * 16


@pytest.fixture
def table(tmp_path):
    return SlotTable(str(tmp_path / "slots"))


def test_a_slot_remembers_the_conversation_of_its_last_clean_answer(table):
    first = table.take(URL, 2, A, 0, ONE)
    assert (first.held_owner, first.held_state) == (UNKNOWN, UNKNOWN)
    first.release(clean=True)
    second = table.take(URL, 2, B, 0, TWO)
    assert (second.held_owner, second.held_state) == (SA, ONE)  # Alice's, to save before Bob's turn
    second.release(clean=False)  # a cut answer: nobody knows what the slot holds
    third = table.take(URL, 2, A, 0, ONE)
    assert (third.held_owner, third.held_state) == (UNKNOWN, UNKNOWN)


def test_a_busy_slot_is_never_saved_from(table):
    running = table.take(URL, 2, A, 0, ONE)
    queued = table.take(URL, 2, B, 0, TWO)
    assert queued.held_state == UNKNOWN and queued.held_owner == UNKNOWN
    running.release(clean=True)
    queued.release(clean=True)


def test_a_choosing_take_finds_the_slot_holding_the_conversation(table):
    for slot, state in ((0, ONE), (1, TWO)):
        table.take(URL, 3, A, slot, state).release(clean=True)
    again = table.take(URL, 3, A, None, ONE)
    assert again.slot == 0 and again.reuse and again.held_state == ONE


def test_held_lists_idle_known_conversations_and_forget_empties_the_replica(table):
    table.take(URL, 3, A, 0, ONE).release(clean=True)
    busy = table.take(URL, 3, B, 1, TWO)
    table.take(URL, 3, B, 2, UNKNOWN).release(clean=True)  # no key: nothing to save
    assert table.held(URL, 3) == [(0, SA, ONE)]
    busy.release(clean=True)
    table.forget(URL)
    assert table.held(URL, 3) == []
    assert not table.take(URL, 3, A, 0, ONE).reuse


def test_take_holding_holds_the_slot_while_it_is_saved_elsewhere(table):
    table.take(URL, 2, A, 1, ONE).release(clean=True)
    held = table.take_holding(URL, 2, ONE)
    assert held is not None and held.slot == 1 and held.held_owner == SA
    assert table.take_holding(URL, 2, ONE) is None  # busy now
    held.release(clean=True)
    assert table.held(URL, 2) == [(1, SA, ONE)]  # still holds it
    assert table.take_holding(URL, 2, TWO) is None


def test_names_are_opaque_and_scoped():
    key_a = kvstates.conversation_key({"messages": [{"role": "user", "content": "secret"}]},
                                      "/v1/chat/completions", "m", A)
    key_b = kvstates.conversation_key({"messages": [{"role": "user", "content": "secret"}]},
                                      "/v1/chat/completions", "m", B)
    tag = kvstates.model_tag("/no/such/model.gguf", 1024, 2)
    name_a, name_b = file_name(SA, kvstates.state_id(tag, key_a)), file_name(SB, kvstates.state_id(tag, key_b))
    assert name_a != name_b and "secret" not in name_a and "alice" not in name_a
    assert name_a.startswith(SA.hex() + "-")
    assert kvstates.state_id(kvstates.model_tag("/no/such/model.gguf", 2048, 2), key_a) != \
        kvstates.state_id(tag, key_a)  # another context: another state


def write(folder: Path, name: str, size: int, age: float) -> None:
    path = folder / name
    path.write_bytes(b"x" * size)
    os.utime(path, (1_000_000 - age, 1_000_000 - age))


def test_the_budget_removes_a_tenants_oldest_beyond_its_share_then_anyones_oldest(tmp_path):
    for i in range(4):
        write(tmp_path, file_name(SA, bytes([i]) * 16), 100, age=10 - i)  # Alice: 400 bytes, oldest first
    write(tmp_path, file_name(SB, b"\x09" * 16), 100, age=20)  # Bob's, older than all of hers
    removed = enforce_budget(str(tmp_path), Budget(total=1000, tenant_share=0.25), SA)
    assert removed == [file_name(SA, bytes([0]) * 16), file_name(SA, bytes([1]) * 16)]  # hers, down to 250
    removed = enforce_budget(str(tmp_path), Budget(total=150, tenant_share=1.0), SA)
    # her share is 150 now: her oldest goes; then the folder's oldest, Bob's
    assert removed == [file_name(SA, bytes([2]) * 16), file_name(SB, b"\x09" * 16)]
    assert sorted(os.listdir(tmp_path)) == [file_name(SA, bytes([3]) * 16)]


class FakeSlots(BaseHTTPRequestHandler):
    """llama-server's /slots actions over a folder: save writes, restore reads."""

    folder = ""
    calls: list[tuple[str, int, str]] = []

    def do_POST(self):  # noqa: N802
        slot, action = self.path.split("/slots/")[1].split("?action=")
        name = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["filename"]
        self.calls.append((action, int(slot), name))
        path = os.path.join(self.folder, name)
        if action == "save":
            Path(path).write_bytes(b"state" * 100)
            answer, status = {"n_saved": 50}, 200
        elif os.path.exists(path) and Path(path).read_bytes().startswith(b"state"):
            answer, status = {"n_restored": 50}, 200
        else:
            answer, status = {"error": {"message": "failed to restore"}}, 400
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake(tmp_path):
    folder = tmp_path / "states"
    states = States(str(folder), Budget(10_000, 1.0))
    FakeSlots.folder, FakeSlots.calls = str(folder), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSlots)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield states, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_the_states_folder_is_private(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    assert not States(str(folder), Budget(100, 1.0)).enabled
    assert States(str(tmp_path / "new"), Budget(100, 1.0)).enabled
    assert (os.stat(tmp_path / "new").st_mode & 0o777) == 0o700
    assert not States(str(tmp_path / "off"), Budget(0, 1.0)).enabled
    States(str(tmp_path / "slots" / "states"), Budget(100, 1.0))  # a slot folder not made yet: made private too
    assert (os.stat(tmp_path / "slots").st_mode & 0o777) == 0o700


def test_save_then_restore_counts_bytes_and_tokens(fake):
    states, url = fake
    outcome = Outcome()
    assert states.save(url, 1, SA, ONE, None, outcome)
    assert outcome.saved_bytes == 500 and not outcome.save_failed
    assert states.restore(url, 0, SA, ONE, None, outcome)
    assert outcome.restored_tokens == 50 and outcome.restored_bytes == 500
    assert [call[:2] for call in FakeSlots.calls] == [("save", 1), ("restore", 0)]


def test_a_corrupt_or_missing_state_is_a_counted_failure_and_not_tried_again(fake):
    states, url = fake
    outcome = Outcome()
    assert not states.restore(url, 0, SA, ONE, None, outcome)  # missing
    assert outcome.restore_failed and not FakeSlots.calls
    Path(states.path(file_name(SA, TWO))).write_bytes(b"garbage")
    outcome = Outcome()
    assert not states.restore(url, 0, SA, TWO, None, outcome)
    assert outcome.restore_failed and not states.has(file_name(SA, TWO))


def test_a_save_that_lands_outside_the_folder_is_a_failure(fake, tmp_path):
    states, url = fake
    FakeSlots.folder = str(tmp_path)  # the llama-server's save path is another folder
    outcome = Outcome()
    assert not states.save(url, 0, SA, ONE, None, outcome) and outcome.save_failed


def test_an_unreachable_llama_server_fails_the_action_not_the_caller(tmp_path):
    states = States(str(tmp_path / "s"), Budget(100, 1.0))
    outcome = Outcome()
    assert not states.save("http://127.0.0.1:9", 0, SA, ONE, None, outcome) and outcome.save_failed


def test_the_slot_table_file_format_changed_so_old_files_start_over(tmp_path):
    assert slots._MAGIC == b"LGSLOTS2" and slots._RECORD.size == 16 + 16 + 4 + 8


def test_a_conversation_evicted_on_a_backend_without_saved_states_is_counted_not_saved(monkeypatch):
    """An external backend (``urls:``): its llama-servers do not save into the host's folder,
    so the gateway saves nothing, and says so."""
    from gateway.testing import Harness

    with Harness([]) as harness:
        harness.gateway.upstreams.backends["test"].replicas[0].slots = 1
        first = harness.chat("the first conversation")
        second = harness.chat("another conversation")
        again = harness.chat("another conversation")
    assert first.status == second.status == again.status == 200
    assert "kv.not_saved" not in first.ctx.counters
    assert second.ctx.counters.get("kv.not_saved") == 1  # the first conversation lost the one slot
    assert "kv.not_saved" not in again.ctx.counters  # its own slot: nothing lost
    assert all(not name.startswith("kv.save") for name in second.ctx.counters)
