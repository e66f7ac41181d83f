"""The bench's load generator, in a process of its own so that its CPU is never counted
as the server's: keep-alive HTTP/1.1 clients on raw gevent sockets (a minimal parser,
cheaper than http.client), Nagle off as client libraries set it.

    python bench/client.py '{"url": "http://127.0.0.1:8000", "body": {...}, "concurrency": 16, "requests": 1000}'

The spec (JSON, the first argument): ``url``; ``path`` (/v1/chat/completions);
``body`` (a JSON object, sent as is); ``headers``; ``concurrency`` connections; then
either ``requests`` in all or ``seconds`` of sending; ``together``: every connection
is opened first, then each sends one request at the same moment (concurrent streams);
``stagger`` seconds: connection i starts i/concurrency of it late, so that streams of
about that length do not start in lockstep (each start then meets the steady traffic of
the others, not 15 other starts at the same instant).
It prints one JSON object: counts, requests/s, latency percentiles in ms, time to the
first body byte (``ttfb``) and to the first ``data:`` event (``ttfe``), how many
answers were complete (JSON with choices, or a stream ending ``data: [DONE]``), the
most requests open at once and its own CPU seconds.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402


def percentile(values: list[float], fraction: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else None


class Connection:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def exchange(self, request: bytes) -> dict:
        """Send one request, read its whole answer."""
        start = time.perf_counter()
        self.sock.sendall(request)
        read, readline = self.file.read, self.file.readline
        status_line = readline()
        if not status_line:
            raise ConnectionError("closed before an answer")
        status = int(status_line.split()[1])
        headers = {}
        while (line := readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        first_byte = first_event = None
        tail = b""
        events = 0
        if headers.get(b"transfer-encoding") == b"chunked":
            while True:
                size = int(readline().split(b";")[0], 16)
                if size == 0:
                    while readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = read(size + 2)[:-2]
                if len(data) != size:
                    raise ConnectionError("closed mid-chunk")
                if first_byte is None:
                    first_byte = time.perf_counter()
                found = data.count(b"data:")
                if found and first_event is None:
                    first_event = time.perf_counter()
                events += found
                tail = (tail + data)[-64:]
        else:
            length = int(headers.get(b"content-length", b"0"))
            data = read(length) if length else b""
            if len(data) != length:
                raise ConnectionError("closed mid-body")
            first_byte = time.perf_counter()
            tail = data
        end = time.perf_counter()
        stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        complete = status == 200 and (tail.rstrip().endswith(b"data: [DONE]") if stream else b'"choices"' in data)
        return {"status": status, "start": start, "first_byte": first_byte or end, "first_event": first_event,
                "end": end, "complete": complete, "events": events,
                "keep": headers.get(b"connection") != b"close"}


def run(spec: dict) -> dict:
    url = urlsplit(spec["url"])
    host, port = url.hostname, url.port or 80
    path = spec.get("path", "/v1/chat/completions")
    body = json.dumps(spec["body"]).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in (spec.get("headers") or {}).items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    concurrency = int(spec["concurrency"])
    together = bool(spec.get("together"))
    total = concurrency if together else spec.get("requests")
    deadline = time.perf_counter() + float(spec.get("seconds") or 0) if total is None else None
    timeout = float(spec.get("timeout", 60))
    state = {"taken": 0, "open": 0, "max_open": 0, "errors": 0, "connected": 0}
    results: list[dict] = []
    statuses: Counter = Counter()
    go = Event()

    stagger = float(spec.get("stagger") or 0)

    def client(i: int) -> None:
        conn = None
        if stagger:
            gevent.sleep(stagger * i / concurrency)
        if together:
            try:
                conn = Connection(host, port, timeout)
            except OSError:
                state["errors"] += 1
            state["connected"] += 1
            if state["connected"] == concurrency:
                go.set()
            go.wait()
            if conn is None:
                return
        while True:
            if total is not None:
                if state["taken"] >= total:
                    break
                state["taken"] += 1
            elif time.perf_counter() >= deadline:
                break
            try:
                if conn is None:
                    conn = Connection(host, port, timeout)
                state["open"] += 1
                state["max_open"] = max(state["max_open"], state["open"])
                try:
                    result = conn.exchange(request)
                finally:
                    state["open"] -= 1
            except (OSError, ValueError, IndexError):
                state["errors"] += 1
                statuses["failed"] += 1
                if conn is not None:
                    conn.close()
                conn = None
                if together:
                    return
                continue
            statuses[result["status"]] += 1
            if result["status"] != 200:
                state["errors"] += 1
            results.append(result)
            if not result["keep"]:
                conn.close()
                conn = None
            if together:
                break
        if conn is not None:
            conn.close()

    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    gevent.joinall([gevent.spawn(client, i) for i in range(concurrency)])
    elapsed = time.perf_counter() - started
    used = resource.getrusage(resource.RUSAGE_SELF)
    latencies = [r["end"] - r["start"] for r in results]
    ttfb = [r["first_byte"] - r["start"] for r in results]
    ttfe = [r["first_event"] - r["start"] for r in results if r["first_event"] is not None]

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000

    return {"n": len(results), "errors": state["errors"], "elapsed": elapsed,
            "rps": len(results) / elapsed if elapsed else 0.0,
            "p50": ms(percentile(latencies, 0.5)), "p99": ms(percentile(latencies, 0.99)),
            "ttfb_p50": ms(percentile(ttfb, 0.5)), "ttfb_p99": ms(percentile(ttfb, 0.99)),
            "ttfe_p50": ms(percentile(ttfe, 0.5)), "ttfe_p99": ms(percentile(ttfe, 0.99)),
            "complete": sum(1 for r in results if r["complete"]),
            "events": sum(r["events"] for r in results), "max_open": state["max_open"],
            "statuses": {str(k): v for k, v in statuses.items()},
            "client_cpu": (used.ru_utime + used.ru_stime) - (cpu.ru_utime + cpu.ru_stime)}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
