"""The overhead benchmark: the gateway against the floor, in the same run.

It starts, each on a free loopback port: the canned llama-server (bench/upstream.py),
the floor (bench/floor.py: a bare Falcon relay under gunicorn's plain gevent worker),
and the gateway twice, (1) with an empty pipeline and (2) with the plugins of the
shipped pipelines.yaml (or ``--config``): auth with a user key from the environment,
validate, cache (requests carry temperature 0.7, so nothing is cached), ratelimit with
limits raised out of reach, router, accesslog to a file and statsd to a bound UDP
socket that nobody reads. Each server is gunicorn with one worker process.

The load comes from bench/client.py in a process of its own; what is measured is the
server's CPU: utime + stime from /proc/<pid>/stat of the gunicorn master's children
(its worker), before and after each row, per request. Rows: plain answers at
concurrency 1, 16 and 64; 32-event streams at 16; 16 concurrent slow streams (5 ms a
token), with the time to their first event; 1000 concurrent slow streams in the one
worker: all complete? and the worker's peak RSS (VmHWM). Request counts are bounded;
it prints one markdown table with the targets beside the figures and writes it to
bench/results.md. It asserts nothing.

    make bench                     # or: python bench/run.py [--quick] [--config FILE]

``--also-with FILE`` (repeatable) adds a gateway column: the ``--config`` pipelines with
FILE's one plugin entry put first in each (bench/configs/otel-100.yaml: the tracer at 100%;
``make bench-otel`` runs both tracer files). The bench then also runs an OTLP/HTTP sink in
its own process's thread, answering every export (``OTEL_SINK_URL``), and says how many
spans it received.
"""

from __future__ import annotations

import argparse
import datetime
import http.server
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))  # the checkout's gateway, not an installed one

import yaml  # noqa: E402

from gateway.testing import free_port  # noqa: E402

MODEL = "smollm2"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}
KEY = "sk-bench-" + "0" * 24
CONNECTIONS = 1100  # gunicorn worker_connections, the floor's pool, the gateway's backend limits
STREAM_TEXT = " ".join(f"w{i}" for i in range(32))  # the canned backend streams a word an event
PLAIN = dict(CHAT, temperature=0.7)
STREAM = dict(CHAT, temperature=0.7, max_tokens=64, stream=True, canned={"text": STREAM_TEXT})
SLOW = dict(STREAM, canned={"text": STREAM_TEXT, "delay": 0.005})
TARGETS = {"plain": 1.2, "stream": 1.3, "first_event_ms": 3.0, "rss_mb": 300}

# (row, request body, concurrency, requests in a full run, in a quick run, stagger seconds)
ROWS = [
    ("plain c=1", PLAIN, 1, 1500, 300, 0),
    ("plain c=16", PLAIN, 16, 3000, 600, 0),
    ("plain c=64", PLAIN, 64, 3000, 600, 0),
    ("stream c=16", STREAM, 16, 800, 160, 0),
    # 32 events 5 ms apart: ~0.17 s a stream, so the 16 clients start spread over that
    ("slow stream c=16", SLOW, 16, 160, 48, 0.17),
]
MANY = 1000
UPSTREAM_PID: list[int] = []  # the canned llama-server's, for its CPU in the details


# --- measuring the servers ----------------------------------------------------------

def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a gunicorn master's workers)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry.name))
                except (OSError, IndexError, ValueError):
                    pass
        return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Server:
    """A gunicorn master with one worker, its output in a file."""

    def __init__(self, name: str, label: str, args: list[str], env: dict[str, str], port: int, logs: Path,
                 cwd: Path = ROOT) -> None:
        self.name, self.label = name, label
        self.url = f"http://127.0.0.1:{port}"
        self.log = logs / f"{name}.log"
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def workers(self) -> list[int]:
        return children(self.popen.pid)

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.workers())

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def load(base: str, concurrency: int, seconds: float | None, stream: bool | None, headers: dict[str, str],
         request: dict = CHAT, requests: int | None = None, together: bool = False, stagger: float = 0) -> dict:
    """``concurrency`` keep-alive clients (bench/client.py, its own process) sending
    ``request`` back to back, ``requests`` in all or for ``seconds``; its figures."""
    spec = {"url": base, "body": dict(request, stream=stream) if stream is not None else request,
            "headers": headers, "concurrency": concurrency, "requests": requests, "seconds": seconds,
            "together": together, "stagger": stagger}
    done = subprocess.run([sys.executable, str(BENCH / "client.py"), json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"bench: the load generator failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def measure(server: Server, request: dict, concurrency: int, requests: int, headers: dict[str, str],
            together: bool = False, stagger: float = 0) -> dict:
    """One row on one server: the client's figures plus the worker's CPU ms per request."""
    before, upstream_before = server.cpu(), cpu_seconds(UPSTREAM_PID[0]) if UPSTREAM_PID else 0.0
    figures = load(server.url, concurrency, None, None, headers, request, requests=requests, together=together,
                   stagger=stagger)
    time.sleep(0.2)  # the worker's last writes and `complete` hooks
    figures["cpu_ms"] = (server.cpu() - before) * 1000 / max(1, figures["n"])
    figures["upstream_cpu"] = cpu_seconds(UPSTREAM_PID[0]) - upstream_before if UPSTREAM_PID else 0.0
    return figures


def many_streams(server: Server, headers: dict[str, str]) -> dict:
    """1000 slow streams at once in the one worker; its peak RSS during them."""
    worker = server.workers()[0]
    baseline = status_kb(worker, "VmRSS")
    try:  # 5: reset the peak (VmHWM) to the current RSS, so the peak is this row's
        Path(f"/proc/{worker}/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    figures = measure(server, SLOW, MANY, MANY, headers, together=True)
    figures.update(rss_mb=status_kb(worker, "VmRSS") / 1024, baseline_mb=baseline / 1024,
                   peak_mb=status_kb(worker, "VmHWM") / 1024, peak_is_row=reset)
    return figures


# --- the servers' configurations ----------------------------------------------------

def bench_configs(source: Path, directory: Path) -> tuple[Path, Path, list[str]]:
    """The pipelines file twice, the second with an empty pipeline, for the bench: the
    chat backend's limits sized to the bench's connections, and rate limits out of reach
    (the bench key is a user key, so it is counted, but never refused)."""
    doc = yaml.safe_load(source.read_text())
    for name, url in (("chat", "${CHAT_BACKEND_URL}"), ("embeddings", "${EMBEDDINGS_BACKEND_URL}")):
        if "launch" in doc["backends"].get(name, {}):  # the bench's own upstream instead of the fleet's
            doc["backends"][name] = {k: v for k, v in doc["backends"][name].items() if k != "launch"} | {"urls": [url]}
    backend = doc["backends"][doc["models"][MODEL]["backend"]]
    backend.update(max_connections=CONNECTIONS, max_in_flight=CONNECTIONS, max_queue=CONNECTIONS)
    notes = [f"backend `{doc['models'][MODEL]['backend']}`: max_connections, max_in_flight and max_queue "
             f"{CONNECTIONS}"]
    for name, plugins in (doc.get("pipelines") or {}).items():
        for i, entry in enumerate(plugins):
            if entry == "ratelimit" or isinstance(entry, dict) and "ratelimit" in entry:
                options = entry["ratelimit"] if isinstance(entry, dict) else None
                plugins[i] = {"ratelimit": dict(options or {}, requests_per_minute=10**9, tokens_per_minute=10**12)}
                notes.append(f"pipeline `{name}`: ratelimit at 10^9 requests and 10^12 tokens a minute")
    full = directory / "pipelines-full.yaml"
    full.write_text(yaml.safe_dump(doc, sort_keys=False))
    doc["pipelines"] = {name: [] for name in doc["pipelines"]}
    empty = directory / "pipelines-empty.yaml"
    empty.write_text(yaml.safe_dump(doc, sort_keys=False))
    return full, empty, notes


def plugin_names(config: Path) -> str:
    doc = yaml.safe_load(config.read_text())
    pipeline = doc["routes"]["/v1/chat/completions"]
    pipeline = pipeline["pipeline"] if isinstance(pipeline, dict) else pipeline
    return ", ".join(next(iter(e)) if isinstance(e, dict) else str(e) for e in doc["pipelines"][pipeline])


def with_plugin(full: Path, plugin_file: Path, directory: Path) -> Path:
    """The bench's full config with ``plugin_file``'s one plugin entry first in each pipeline."""
    doc = yaml.safe_load(full.read_text())
    entry = yaml.safe_load(plugin_file.read_text())
    if not (isinstance(entry, dict) and len(entry) == 1):
        raise SystemExit(f"bench: {plugin_file} must hold one plugin entry ({{name: config}})")
    for plugins in doc["pipelines"].values():
        plugins.insert(0, entry)
    path = directory / f"pipelines-{plugin_file.stem}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Sink(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP receiver that answers every export and counts what it got (the spans
    of each export decoded with OpenTelemetry's proto package)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.exports = self.spans = 0
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
                request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
                sink.exports += 1
                sink.spans += sum(len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


# --- the table ----------------------------------------------------------------------

def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def table(results: dict, servers: list[Server]) -> list[str]:
    floor, gateways = servers[0], servers[1:]
    head = ["measurement", floor.label] + [g.label for g in gateways] + ["target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, floor_cell: str, cells: list[str], target: str) -> None:
        lines.append("| " + " | ".join([name, floor_cell] + cells + [target]) + " |")

    for label, *_ in ROWS:
        if label.startswith("slow"):
            continue
        kind = "stream" if label.startswith("stream") else "plain"
        base = results[label][floor.name]["cpu_ms"]
        cells = []
        for g in gateways:
            ms = results[label][g.name]["cpu_ms"]
            ratio = ms / base if base else float("inf")
            cells.append(f"{ms:.3f} (×{ratio:.2f}) {mark(ratio <= TARGETS[kind])}")
        row(f"{label}: CPU ms/request", f"{base:.3f}", cells, f"≤ {TARGETS[kind]}× floor")
    slow = results["slow stream c=16"]
    base = slow[floor.name]["ttfe_p50"]
    cells = []
    for g in gateways:
        value = slow[g.name]["ttfe_p50"]
        diff = value - base if value is not None and base is not None else None
        cells.append(f"{fmt(value)} ({'-' if diff is None else f'{diff:+.2f}'}) {mark(diff is not None and diff <= TARGETS['first_event_ms'])}")
    row("slow stream c=16, 5 ms/token: first event p50, ms", fmt(base), cells,
        f"≤ floor + {TARGETS['first_event_ms']:g} ms")
    cells = [f"{slow[g.name]['cpu_ms']:.3f} (×{slow[g.name]['cpu_ms'] / slow[floor.name]['cpu_ms']:.2f})"
             if slow[floor.name]["cpu_ms"] else "-" for g in gateways]
    row("slow stream c=16: CPU ms/request", f"{slow[floor.name]['cpu_ms']:.3f}", cells, "(for information)")
    many = results[f"{MANY} slow streams"]

    def many_cell(server: Server, check: bool) -> tuple[str, str]:
        figures = many.get(server.name)
        if figures is None:
            return "not run", "not run"
        complete = figures["complete"] == MANY
        peak_ok = figures["peak_mb"] < TARGETS["rss_mb"]
        done = f"{figures['complete']}/{MANY} (at once: {figures['max_open']})" + (f" {mark(complete)}" if check else "")
        peak = (f"{figures['peak_mb']:.0f} (from {figures['baseline_mb']:.0f})" + (f" {mark(peak_ok)}" if check else "")
                + ("" if figures["peak_is_row"] else " (peak of the worker's life)"))
        return done, peak

    cells = [many_cell(g, True) for g in gateways]
    floor_cells = many_cell(floor, False)
    row(f"{MANY} concurrent slow streams, one worker: complete", floor_cells[0], [c[0] for c in cells], "all")
    row(f"{MANY} concurrent slow streams: worker peak RSS, MB", floor_cells[1], [c[1] for c in cells],
        f"< {TARGETS['rss_mb']} MB")
    return lines


def details(results: dict, servers: list[Server]) -> list[str]:
    lines = ["| row | server | requests | errors | req/s | p50 ms | p99 ms | first event p50 ms | CPU ms/req | "
             "worker CPU % | upstream CPU % | client CPU % |", "|" + "---|" * 12]
    for label, by_server in results.items():
        for server in servers:
            f = by_server.get(server.name)
            if f is None:
                continue
            lines.append(f"| {label} | {server.label} | {f['n']} | {f['errors']} | {f['rps']:.0f} | {fmt(f['p50'])} | "
                         f"{fmt(f['p99'])} | {fmt(f['ttfe_p50'])} | {f['cpu_ms']:.3f} | "
                         f"{100 * f['cpu_ms'] * f['n'] / 1000 / f['elapsed']:.0f} | "
                         f"{100 * f['upstream_cpu'] / f['elapsed']:.0f} | "
                         f"{100 * f['client_cpu'] / f['elapsed']:.0f} |")
    return lines


# --- the run ------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: fewer requests per row")
    parser.add_argument("--config", default=str(ROOT / "pipelines.yaml"),
                        help="pipelines file for the gateway with plugins (default: the shipped one)")
    parser.add_argument("--many-on", choices=("all", "gateways", "full"), default="all",
                        help=f"servers that take the {MANY} streams row (default: all three)")
    parser.add_argument("--output", default=str(BENCH / "results.md"), help="where to write the table")
    parser.add_argument("--also-with", action="append", default=[], metavar="FILE",
                        help="one more gateway: --config's pipelines with FILE's plugin entry first "
                             "(bench/configs/otel-100.yaml); repeatable")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))  # children inherit it
    workdir = Path(tempfile.mkdtemp(prefix="llamagate-bench-"))
    full_config, empty_config, notes = bench_configs(Path(args.config).resolve(), workdir)
    extra_configs = [(Path(f).stem, with_plugin(full_config, Path(f), workdir)) for f in args.also_with]
    sink = Sink() if extra_configs else None
    statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never read
    statsd.bind(("127.0.0.1", 0))
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("LLAMAGATE_API_KEY", None)  # the bench key is a user key, so that the rate limits count it
    gateway_env = dict(env, CHAT_BACKEND_URL=upstream_url, EMBEDDINGS_BACKEND_URL=upstream_url,
                       GATEWAY_WORKERS="1", GATEWAY_WORKER_CONNECTIONS=str(CONNECTIONS), LLAMAGATE_LOG_LEVEL="WARNING",
                       OPENAI_API_KEYS=f"{KEY}:bench", LLAMAGATE_KEYS_FILE=str(workdir / "keys.yaml"),
                       LLAMAGATE_ACCESS_LOG=str(workdir / "access.log"), STATSD_HOST="127.0.0.1",
                       STATSD_PORT=str(statsd.getsockname()[1]), RATELIMIT_STORE="memory",
                       OTEL_SINK_URL=sink.url if sink else "")
    headers = {"Authorization": f"Bearer {KEY}"}
    upstream = subprocess.Popen([sys.executable, str(BENCH / "upstream.py"), str(upstream_port)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=open(workdir / "upstream.log", "wb"))
    UPSTREAM_PID.append(upstream.pid)
    servers: list[Server] = []
    gunicorn = [sys.executable, "-m", "gunicorn"]
    try:
        port = free_port()
        servers.append(Server("floor", "floor", gunicorn + [
            "-k", "gevent", "-w", "1", "--worker-connections", str(CONNECTIONS), "--keep-alive", "5",
            "--backlog", "2048", "--no-control-socket", "--log-level", "warning", "-b", f"127.0.0.1:{port}",
            "--pythonpath", str(BENCH), "floor:create_app()"],
            dict(env, FLOOR_UPSTREAM=upstream_url, FLOOR_CONNECTIONS=str(CONNECTIONS)), port, workdir,
            cwd=BENCH))  # not the checkout: gunicorn would read its gunicorn.conf.py (hooks, a fleet supervisor)
        for name, label, config in (("empty", "gateway, empty pipeline", empty_config),
                                    ("full", f"gateway, {Path(args.config).name}", full_config),
                                    *((stem, f"gateway, + {stem}", path) for stem, path in extra_configs)):
            port = free_port()
            servers.append(Server(name, label, gunicorn + ["-c", str(ROOT / "gunicorn.conf.py")],
                                  dict(gateway_env, GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_CONFIG=str(config)),
                                  port, workdir))
        if not all(answering(url, healthy=name != "floor", timeout=60)
                   for name, url in [("upstream", upstream_url)] + [(s.name, s.url) for s in servers]):
            for s in servers:
                print(f"--- {s.name}:\n{s.output()}", file=sys.stderr)
            raise SystemExit("bench: the canned backend, the floor or a gateway did not start")
        for server in servers:
            if len(server.workers()) != 1:
                raise SystemExit(f"bench: {server.name} has {len(server.workers())} workers, not 1")
            for body, n in ((PLAIN, 200), (STREAM, 50)):  # warm up: connections, caches, imports
                figures = load(server.url, 4, None, None, headers, body, requests=n)
                if figures["errors"]:
                    raise SystemExit(f"bench: {server.name} answered errors while warming up: {figures['statuses']}"
                                     f"\n{server.output()}")
        load_before = os.getloadavg()
        started = time.monotonic()
        results: dict[str, dict] = {}
        for label, body, concurrency, full_n, quick_n, stagger in ROWS:
            results[label] = {s.name: measure(s, body, concurrency, quick_n if args.quick else full_n, headers,
                                              stagger=stagger) for s in servers}
            print(f"  {label}: " + ", ".join(f"{s.name} {results[label][s.name]['cpu_ms']:.3f} ms CPU/req"
                                             for s in servers), file=sys.stderr, flush=True)
        many_on = {"all": servers, "gateways": servers[1:], "full": servers[2:]}[args.many_on]
        results[f"{MANY} slow streams"] = {s.name: many_streams(s, headers) for s in many_on}
        load_after = os.getloadavg()
        elapsed = time.monotonic() - started
    finally:
        stop_all([s.popen for s in servers] + [upstream])
        statsd.close()
        if sink is not None:
            sink.shutdown()
            notes.append(f"the OTLP sink received {sink.spans} spans in {sink.exports} exports")

    title = (f"Llamagate overhead against the floor ({'quick' if args.quick else 'full'} run, "
             f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z})")
    intro = [
        f"# {title}", "",
        f"{os.cpu_count()} cores, Python {platform.python_version()}; load average before the rows "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f}; rows took {elapsed:.0f} s. One gunicorn worker per "
        f"server; canned llama-server (bench/upstream.py) and the load generator (bench/client.py, its own "
        f"process) on the same cores. CPU: the worker's utime + stime per request.", "",
        f"Gateway plugins ({Path(args.config).name}): {plugin_names(full_config)}. Bench changes: "
        + "; ".join(notes) + ". Requests carry temperature 0.7 (never cached); the key is a user key.", "",
    ]
    legend = ["", "Each gateway cell: its figure, (its ratio to the floor's, or its difference), ✓ or ✗ against "
              "the target.", "", "Details:", ""]
    text = "\n".join(intro + table(results, servers) + legend + details(results, servers)) + "\n"
    print(text)
    Path(args.output).write_text(text)
    print(f"(written to {os.path.relpath(args.output, os.getcwd())})", file=sys.stderr)


def stop_all(children: list[subprocess.Popen]) -> None:
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def answering(url: str, healthy: bool, timeout: float) -> bool:
    """Wait until ``url``/health answers 200 (``healthy``), or answers at all (the floor
    has no /health: its 404 will do)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with opener.open(url + "/health", timeout=2):
                return True
        except urllib.error.HTTPError:
            if not healthy:
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


if __name__ == "__main__":
    main()
