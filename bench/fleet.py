"""The fleet's figures: cold start and swap, and the gateway's share of them.

It runs, on free loopback ports, SmolLM2 (models/, as `make model` fetches it):

- **bare**: ``llamagate backend`` started by hand, polled on ``/health`` every 10 ms,
  then one streamed chat request: launch to first token, with no gateway at all (the floor;
  interleaved with the cold starts, so that both see the same machine);
- **cold start**: the gateway (gunicorn, one gevent worker, its fleet supervisor) with the
  model stopped; one streamed request: request to first token;
- **swap**: the gateway with two models (the same GGUF under two ids) and room for one
  (``max_resident: 1``, ``group_wait: 0``: no minimum residency); the resident one idle; a
  request for the other: request to first token (the idle model stopped, the other launched);
- **warm**: a request to a ready model, for reference.

The gateway's share is the gateway's median minus the bare median. Each figure is the
median of ``--runs`` runs (each cold start unloads the model through ``/admin/models``
first). It writes bench/fleet-results.md and asserts nothing.

    python bench/fleet.py [--runs N]      # make bench runs it after bench/run.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's gateway, not an installed one

import yaml  # noqa: E402

from gateway.testing import free_port, free_ports  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LAUNCH = {"model": str(MODEL), "ctx": 512, "parallel": 1, "threads": 1}
KEY = "sk-fleet-bench-" + "0" * 20
BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True, "temperature": 0}


def first_token(url: str, model: str | None, headers: dict[str, str]) -> float:
    """Seconds from sending a streamed chat request to its first event with content."""
    body = dict(BODY, **({"model": model} if model else {}))
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **headers})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as resp:
        for line in resp:
            if line.startswith(b"data: {") and b'"content"' in line:
                elapsed = time.perf_counter() - start
                resp.read()
                return elapsed
    raise RuntimeError("no token in the stream")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def admin(url: str, method: str, path: str) -> dict:
    request = urllib.request.Request(url + path, method=method, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        return json.loads(resp.read())


def bare_start(logs: Path) -> tuple[float, float]:
    """Launch to first token of a llama-server started by hand, polled every 10 ms; and
    launch to ``/health`` 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "backend", "--model", LAUNCH["model"],
                             "--port", str(port), "--ctx", str(LAUNCH["ctx"]), "--parallel", "1",
                             "--threads", "1"], cwd=ROOT, stdout=open(logs / "bare.log", "ab"),
                            stderr=subprocess.STDOUT)
    try:
        while not healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"the bare llama-server exited; see {logs / 'bare.log'}")
            time.sleep(0.01)
        ready = time.perf_counter() - start
        return ready + first_token(url, None, {}), ready
    finally:
        proc.terminate()
        proc.wait()


def gateway(doc: dict, logs: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = logs / f"fleet-bench-{port}.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = dict(os.environ, GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_CONFIG=str(config), GATEWAY_WORKERS="1",
               LLAMAGATE_LOG_LEVEL="warning", LLAMAGATE_API_KEY=KEY,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")], cwd=ROOT,
                            env=env, stdout=open(logs / "gateway.log", "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not start; see {logs / 'gateway.log'}")
        time.sleep(0.1)
    return proc, url


def fleet_doc(models: list[str], logs: Path, **fleet: object) -> dict:
    ports = free_ports(len(models) + 1)  # all of them free, not just the first
    return {
        "admin_pipeline": "default",
        "fleet": {"ports": {"first": ports[0], "last": ports[-1]}, "log_dir": str(logs), **fleet},
        "backends": {name: {"launch": LAUNCH} for name in models},
        "models": {name: {"backend": name} for name in models},
        "pipelines": {"default": [{"auth": {"env_keys": {"LLAMAGATE_API_KEY": "admin"},
                                            "allow_missing_keys_file": True,
                                            "keys_file": str(logs / "no-keys.yaml")}}]},
        "routes": {"/v1/chat/completions": "default", "/v1/models": "default"},
    }


def cold_runs(runs: int, logs: Path) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """Interleaved, so that both see the same machine: a bare start to first token; a
    request to first token through the gateway with the model stopped; the supervisor's own
    launch-to-ready; a warm request's first token."""
    proc, url = gateway(fleet_doc(["one"], logs), logs)
    headers = {"Authorization": f"Bearer {KEY}"}
    bare, bare_ready, cold, loads, warm = [], [], [], [], []
    try:
        bare_start(logs)  # a warm-up: the model file into the page cache
        for _ in range(runs):
            total, ready = bare_start(logs)
            bare.append(total)
            bare_ready.append(ready)
            admin(url, "POST", "/admin/models/one/unload")
            cold.append(first_token(url, "one", headers))
            loads.append(admin(url, "GET", "/admin/models")["models"]["one"]["last_load_seconds"])
            warm.append(first_token(url, "one", headers))
    finally:
        proc.terminate()
        proc.wait()
    return bare, bare_ready, cold, loads, warm


def swap_runs(runs: int, logs: Path) -> tuple[list[float], list[float], int]:
    """Request to first token of the model not resident, the resident one idle; and the
    launch-to-ready part of it."""
    # group_wait 0: the swap itself, without the minimum residency (docs/fleet.md)
    proc, url = gateway(fleet_doc(["one", "two"], logs, max_resident=1, group_wait=0), logs)
    headers = {"Authorization": f"Bearer {KEY}"}
    swaps, loads = [], []
    try:
        first_token(url, "one", headers)
        for i in range(runs):
            time.sleep(0.6)  # idle past the linger (0.5 s), as between two users' turns
            name = "two" if i % 2 == 0 else "one"
            swaps.append(first_token(url, name, headers))
            loads.append(admin(url, "GET", "/admin/models")["models"][name]["last_load_seconds"])
        count = admin(url, "GET", "/admin/models")["swaps"]
    finally:
        proc.terminate()
        proc.wait()
    return swaps, loads, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "bench" / "fleet-results.md"))
    args = parser.parse_args()
    if not MODEL.is_file():
        raise SystemExit(f"no model at {MODEL}: run `make model`")
    logs = Path(tempfile.mkdtemp(prefix="llamagate-fleet-bench-"))
    bare, bare_ready, cold, loads, warm = cold_runs(args.runs, logs)
    # The launch itself (llama.cpp loading the model) swings by a second on a busy machine;
    # what the gateway adds is in the time around it, per run: (request to first token minus
    # launch to ready) through the gateway, minus the same without it.
    share = [(c - l) - (b - r) for c, l, b, r in zip(cold, loads, bare, bare_ready)]
    swap, swap_loads, swaps = swap_runs(args.runs, logs)
    med = statistics.median
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Cold start and swap ({when})",
        "",
        f"SmolLM2-135M-Instruct Q4_1, `ctx: 512`, 1 slot, 1 thread; {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}; the gateway: gunicorn, 1 gevent worker. "
        f"Median of {args.runs} runs (min-max in brackets), seconds. Written by `bench/fleet.py`.",
        "",
        "| figure | seconds | what |",
        "|---|---|---|",
        f"| bare start to first token | {med(bare):.2f} ({min(bare):.2f}-{max(bare):.2f}) | "
        "`llamagate backend` launched by hand, `/health` polled every 10 ms, then the request: no gateway |",
        f"| cold start to first token | {med(cold):.2f} ({min(cold):.2f}-{max(cold):.2f}) | "
        "the model stopped; a request through the gateway until its first token |",
        f"| of which the supervisor's launch to ready | {med(loads):.2f} ({min(loads):.2f}-{max(loads):.2f}) | "
        "`last_load_seconds`: launch until `/health` answered 200 (polled every 0.1 s) |",
        f"| bare launch to ready | {med(bare_ready):.2f} | the same, until `/health` answered 200 |",
        f"| gateway's share of a cold start | {med(share):.2f} ({min(share):.2f}-{max(share):.2f}) | "
        "per run: (cold start minus the supervisor's launch to ready) minus (bare minus bare launch to ready): "
        "the request's path, the lease, the supervisor's 0.1 s tick |",
        f"| swap to first token | {med(swap):.2f} ({min(swap):.2f}-{max(swap):.2f}) | "
        "room for one model (`group_wait: 0`), the other one resident and idle: stop it, launch this one, "
        "first token |",
        f"| of which launch to ready | {med(swap_loads):.2f} | as above, for the model swapped in |",
        f"| gateway's part of a swap | {med([s - l for s, l in zip(swap, swap_loads)]):.2f} | "
        "per run: swap minus its launch to ready (stopping the other model, the request's path, the first token) |",
        f"| warm first token | {med(warm):.3f} | the model ready |",
        "",
        f"Swaps counted by the supervisor in the swap runs: {swaps} (one per request, as asked). Load average "
        f"when it ended: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; on a shared machine the medians "
        "swing by a second, so the shares are taken per run.",
        "",
    ]
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
