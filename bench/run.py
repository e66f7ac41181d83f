"""The overhead benchmark: the same load sent straight to a canned llama-server and
through the gateway (the shipped pipelines.yaml, default pipeline).

It prints requests/s and p50/p99 latency at concurrency 1, 16 and 64 for
non-streamed chat, and time to first byte for streams. It prints figures and
asserts nothing. Everything runs on loopback and stops by itself.

    make bench                     # or: python bench/run.py --seconds 3
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

from gateway.testing import free_port  # noqa: E402
from gateway.upstream import wait_until_ready  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CANNED = """
from gevent import monkey; monkey.patch_all()
import socket, sys
from gevent.pywsgi import WSGIServer
from gateway.testing import canned_llama_app
listener = socket.socket()
# Like llama-server (and gunicorn): Nagle off, inherited by accepted sockets on Linux.
listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(1024)
WSGIServer(listener, canned_llama_app, log=None).serve_forever()
"""
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


class Connection(http.client.HTTPConnection):
    """A keep-alive connection with Nagle off, as HTTP client libraries set it."""

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def one_request(conn, path, body, headers, stream):
    """Send one request; returns (status, seconds to first body byte, seconds in all)."""
    start = time.perf_counter()
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    first = resp.read(1)
    ttfb = time.perf_counter() - start
    resp.read()
    assert first
    return resp.status, ttfb, time.perf_counter() - start


def load(base, concurrency, seconds, stream, headers, request=CHAT):
    """``concurrency`` keep-alive clients sending ``request`` back to back for ``seconds``."""
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps(dict(request, stream=stream)).encode()
    latencies, ttfbs, errors = [], [], 0
    deadline = time.perf_counter() + seconds

    def client():
        nonlocal errors
        conn = Connection(host, int(port), timeout=30)
        while time.perf_counter() < deadline:
            try:
                status, ttfb, total = one_request(conn, "/v1/chat/completions", body, headers, stream)
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = Connection(host, int(port), timeout=30)
                continue
            if status != 200:
                errors += 1
            latencies.append(total)
            ttfbs.append(ttfb)
        conn.close()

    started = time.perf_counter()
    gevent.joinall([gevent.spawn(client) for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    return {"rps": len(latencies) / elapsed, "p50": percentile(latencies, 0.5) * 1000,
            "p99": percentile(latencies, 0.99) * 1000, "ttfb_p50": percentile(ttfbs, 0.5) * 1000,
            "ttfb_p99": percentile(ttfbs, 0.99) * 1000, "errors": errors, "n": len(latencies)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers")
    parser.add_argument("--config", default=str(ROOT / "pipelines.yaml"), help="pipelines file (default: the shipped one)")
    args = parser.parse_args()

    canned_port, gateway_port = free_port(), free_port()
    canned_url = f"http://127.0.0.1:{canned_port}"
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    env = dict(os.environ, CHAT_BACKEND_URL=canned_url, EMBEDDINGS_BACKEND_URL=canned_url,
               GATEWAY_BIND=f"127.0.0.1:{gateway_port}", GATEWAY_WORKERS=str(args.workers),
               GATEWAY_CONFIG=str(Path(args.config).resolve()), LLAMAGATE_LOG_LEVEL="WARNING")
    env.setdefault("LLAMAGATE_API_KEY", "sk-bench-" + "0" * 24)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {env['LLAMAGATE_API_KEY']}"}
    children = [
        subprocess.Popen([sys.executable, "-c", CANNED, str(canned_port)], cwd=ROOT, env=env),
        subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        if not wait_until_ready([canned_url, gateway_url], timeout=30):
            raise SystemExit("bench: the canned backend or the gateway did not start")
        for target in (canned_url, gateway_url):  # warm up connections and caches
            load(target, 4, 0.5, False, headers)
        print(f"Llamagate overhead benchmark: {os.cpu_count()} cores, {args.workers} gateway worker(s), "
              f"{args.seconds:g} s per row, canned llama-server on loopback\n")
        print(f"{'mode':<8} {'conc':>4} | {'direct rps':>10} {'p50 ms':>7} {'p99 ms':>7} | "
              f"{'gateway rps':>11} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
        for stream in (False, True):
            for concurrency in (1, 16, 64):
                direct = load(canned_url, concurrency, args.seconds, stream, headers)
                via = load(gateway_url, concurrency, args.seconds, stream, headers)
                mode = "stream" if stream else "json"
                print(f"{mode:<8} {concurrency:>4} | {direct['rps']:>10.0f} {direct['p50']:>7.2f} {direct['p99']:>7.2f} | "
                      f"{via['rps']:>11.0f} {via['p50']:>7.2f} {via['p99']:>7.2f} {via['errors']:>6}")
                if stream:
                    print(f"{'':<8} {'':>4} | ttfb p50 {direct['ttfb_p50']:>6.2f} p99 {direct['ttfb_p99']:>6.2f} | "
                          f"ttfb p50 {via['ttfb_p50']:>6.2f} p99 {via['ttfb_p99']:>6.2f}")
    finally:
        stop_all(children)


def stop_all(children):
    for child in children:
        child.terminate()
    for child in children:
        child.wait(timeout=15)


if __name__ == "__main__":
    main()
