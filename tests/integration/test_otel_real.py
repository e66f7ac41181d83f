"""Traces through the real parts: a gunicorn gevent worker with the otel plugin, a real
llama-server behind a recording TCP relay (what reached its socket), and an OTLP/HTTP
receiver in the test that decodes what the SDK exports with OpenTelemetry's own proto
package. Then the collector down: a receiver that accepts and never answers."""

from __future__ import annotations

import secrets
import socket
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway.storage import keys

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Name one colour."}], "max_tokens": 4}


def value(any_value: Any) -> Any:
    """An OTLP AnyValue as Python."""
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(item) for item in any_value.array_value.values]
    return getattr(any_value, kind)


class Receiver:
    """An OTLP/HTTP traces endpoint: each export decoded, its spans kept with their resource."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.exports = 0
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    resource = {kv.key: value(kv.value) for kv in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            received.spans.append({
                                "name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(), "kind": span.kind,
                                "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                                "attributes": {kv.key: value(kv.value) for kv in span.attributes},
                                "events": [event.name for event in span.events], "resource": resource,
                                "status": span.status.code})
                received.exports += 1
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, trace_id: str, root: str, timeout: float = 10) -> list[dict[str, Any]]:
        """The spans of ``trace_id`` once its request's span ``root`` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = [span for span in self.spans if span["trace_id"] == trace_id]
            if any(span["name"] == root for span in spans):
                return spans
            time.sleep(0.05)
        pytest.fail(f"no span {root!r} of trace {trace_id} arrived; got {[s['name'] for s in self.spans]}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RecordingRelay:
    """A TCP relay in front of llama-server keeping every byte sent to it: the gateway's
    requests as they reached llama-server's socket."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.sent = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while data := source.recv(65536):
                if record:
                    self.sent += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def otel_doc(backend: str, keys_file: Path, **otel: Any) -> dict[str, Any]:
    return {
        "health_interval": 1,
        "backends": {"chat": {"urls": [backend]}},
        "models": {"smollm2": {"backend": "chat"}},
        "pipelines": {"default": [
            {"otel": {"sample_ratio": 1.0, "schedule_delay": 0.05, "timeout": 2, "service_name": "llamagate-test",
                      **otel}},
            {"auth": {"keys_file": str(keys_file), "env_keys": {}}}]},
        "routes": {"/v1/chat/completions": "default", "/v1/models": "default"},
    }


@pytest.fixture(scope="module")
def keyed(logs):
    keys_file = logs / "otel-keys.yaml"
    return keys_file, keys.add_key(keys_file, "alice", "user")


@pytest.fixture(scope="module")
def traced(start_gateway, chat_backend, keyed):
    receiver, relay = Receiver(), RecordingRelay(chat_backend)
    keys_file, key = keyed
    gw = start_gateway(otel_doc(relay.url, keys_file, endpoint=receiver.url))
    gw.receiver, gw.relay, gw.key = receiver, relay, key
    yield gw
    receiver.close()
    relay.close()


@pytest.fixture(scope="module")
def collector_down(start_gateway, chat_backend, keyed):
    """A gateway whose collector accepts connections and never answers: every export
    waits its whole timeout (2 s), retries and all."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=1024)
    keys_file, key = keyed
    gw = start_gateway(otel_doc(chat_backend, keys_file, max_queue=64,
                                endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}/v1/traces"))
    gw.key = key
    yield gw
    silent.close()


def test_a_streamed_chat_is_one_trace_under_the_clients(traced):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    client = traced.client(api_key=traced.key)
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name one colour."}], max_tokens=8,
        temperature=0.7, top_p=0.9, stream=True, stream_options={"include_usage": True},
        extra_headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    spans = traced.receiver.trace(trace_id, "chat smollm2")
    named = {span["name"]: span for span in spans}
    assert len(named) == len(spans), "one trace, each span once"
    root = named["chat smollm2"]
    assert root["parent"] == client_span and root["kind"] == 2  # SERVER, the client's child
    assert root["resource"]["service.name"] == "llamagate-test"
    attributes = root["attributes"]
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.provider.name"] == "llama.cpp"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "smollm2"
    assert (attributes["gen_ai.request.max_tokens"], attributes["gen_ai.request.temperature"],
            attributes["gen_ai.request.top_p"]) == (8, 0.7, 0.9)
    assert attributes["gen_ai.response.finish_reasons"] == [chunks[-2].choices[0].finish_reason]
    assert attributes["gen_ai.usage.input_tokens"] == chunks[-1].usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == chunks[-1].usage.completion_tokens
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert attributes["llamagate.client"] == "alice" and attributes["http.response.status_code"] == 200
    assert "gen_ai.input.messages" not in attributes  # content only when the operator asks
    upstream = named["llama-server"]
    assert upstream["parent"] == root["span_id"] and upstream["kind"] == 3  # CLIENT
    assert upstream["events"] == ["upstream headers", "upstream first byte"]
    assert root["events"] == ["hooks request_start", "hooks request", "hooks route", "hooks upstream_request"]
    for step in ("admission wait", "stream"):
        assert named[step]["parent"] == upstream["span_id"]
    assert root["start"] <= named["admission wait"]["start"] <= named["stream"]["start"] <= named["stream"]["end"] \
        <= root["end"]
    # llama-server got the trace, its parent the gateway's call to it
    assert f"traceparent: 00-{trace_id}-{upstream['span_id']}-01\r\n".encode() in traced.relay.sent


def test_with_the_collector_down_requests_are_unaffected_and_memory_is_bounded(traced, collector_down):
    def timed(gw: Any, count: int) -> list[float]:
        took = []
        with requests.Session() as session:
            for _ in range(count):
                start = time.monotonic()
                resp = session.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=30,
                                    headers={"Authorization": f"Bearer {gw.key}"})
                took.append(time.monotonic() - start)
                assert resp.status_code == 200, resp.text
        return took

    timed(traced, 1), timed(collector_down, 1)  # each worker's first request: its connections, imports
    up, down = timed(traced, 12), timed(collector_down, 12)
    # each export to the silent collector waits 2 s: had it held the worker, requests would too
    assert max(down) < 1.0, down
    assert statistics.median(down) < statistics.median(up) * 1.5 + 0.05, (up, down)

    # 700 traced requests (refused on their body: fast) against a queue of 64 spans (a
    # queue without that bound grows about 17 MiB a thousand requests here)
    def burst(count: int) -> None:
        with requests.Session() as session:
            for _ in range(count):
                resp = session.post(collector_down.url + "/v1/chat/completions", json={"model": "smollm2"},
                                    headers={"Authorization": f"Bearer {collector_down.key}"}, timeout=10)
                assert resp.status_code == 400

    burst(100)
    before = worker_rss(collector_down)
    burst(600)
    grown = worker_rss(collector_down) - before
    assert grown < 3 * 2**20, f"the worker grew {grown / 2**20:.1f} MiB over 600 requests whose spans could not be sent"
    log = collector_down.proc.output()
    assert "Queue full" in log  # the bound was met: spans were dropped, not kept
    assert log.count("Queue full") <= 2  # said once a minute, not once a span


def worker_rss(gw: Any) -> int:
    """The resident bytes of the gateway's worker processes (the master's children)."""
    master = gw.proc.popen.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    total = 0
    for pid in children:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total
