"""The load test: real llama-server backends (xllamacpp + SmolLM2), the gateway with the
shipped pipelines.yaml (2 workers sharing a Redis of its own, ``admission: redis``), and
rising concurrency. Prints errors, p50/p99 latency, time to first byte, throughput, the
mean wait for a slot (from the gateway's /metrics) and the most requests llama-server had
in flight at once (its /slots) and deferred; asserts nothing. Loopback only, bounded in time.

    make loadtest                  # or: python bench/loadtest.py --seconds 10
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

from run import ROOT, load, stop_all  # first: it puts the checkout's gateway on sys.path

from gateway.testing import free_port  # noqa: E402
from gateway.backends.upstream import wait_until_ready  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUEST = {"model": "smollm2", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Write one sentence about llamas."}]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per row")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--parallel", type=int, default=4, help="slots per backend")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--admission", choices=("redis", "local"), default="redis")
    args = parser.parse_args()

    ports = [free_port(), free_port()]
    backends = [f"http://127.0.0.1:{port}" for port in ports]
    gateway_port = free_port()
    gateway = f"http://127.0.0.1:{gateway_port}"
    key = "sk-loadtest-" + "0" * 20
    config = Path(tempfile.mkdtemp()) / "pipelines.yaml"
    env = dict(os.environ, EMBEDDINGS_BACKEND_URL=backends[0],
               GATEWAY_BIND=f"127.0.0.1:{gateway_port}", GATEWAY_CONFIG=str(config),
               LLAMAGATE_API_KEY=key, LLAMAGATE_LOG_LEVEL="WARNING", LLAMAGATE_ACCESS_LOG=os.devnull)
    # the shipped pipelines.yaml, with the chat backend's two replicas
    doc = yaml.safe_load((ROOT / "pipelines.yaml").read_text())
    doc["backends"]["chat"] = {k: v for k, v in doc["backends"]["chat"].items() if k != "launch"} | {"urls": backends}
    doc["backends"]["embeddings"] = {"urls": ["${EMBEDDINGS_BACKEND_URL}"]}
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    doc["shared"] = {"redis_url": redis_url, "admission": args.admission}
    env.update(GATEWAY_WORKERS=str(args.workers), RATELIMIT_STORE="redis", REDIS_URL=redis_url)
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    children = [subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(0.3)  # redis-server listens at once; the gateway retries it anyway
    children += [subprocess.Popen([sys.executable, "-m", "gateway.cli", "backend", "--model", str(MODEL),
                                  "--port", str(port), "--parallel", str(args.parallel), "--threads", "1",
                                  "--ctx", str(1024 * args.parallel)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in ports]
    children.append(subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    headers = {"Authorization": f"Bearer {key}"}  # bench/client.py sends Content-Type itself: twice is a 400
    try:
        if not wait_until_ready(backends + [gateway], timeout=60):
            raise SystemExit("loadtest: the backends or the gateway did not start")
        load(gateway, 2, 1.0, False, headers, REQUEST)  # warm up
        print(f"Llamagate load test: SmolLM2-135M Q4_1 on 2 llama-server replicas x {args.parallel} slots "
              f"(1 core each), {args.workers} gateway workers, admission {args.admission}, "
              f"{args.seconds:g} s per row, max_tokens 16\n")
        print(f"{'mode':<7} {'conc':>4} | {'req/s':>6} {'~tok/s':>6} {'p50 ms':>7} {'p99 ms':>8} "
              f"{'ttfb p50':>8} {'ttfb p99':>8} {'errors':>6} {'queue ms':>8} {'busy max':>8} {'deferred':>8}")
        for stream in (False, True):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                before = queue_wait(gateway, headers)
                with SlotWatch(backends) as watch:
                    row = load(gateway, concurrency, args.seconds, stream, headers, REQUEST)
                after = queue_wait(gateway, headers)
                waited = (after[0] - before[0]) / max(1, after[1] - before[1]) * 1000
                mode = "stream" if stream else "json"
                print(f"{mode:<7} {concurrency:>4} | {row['rps']:>6.1f} {row['rps'] * 16:>6.0f} {row['p50']:>7.0f} "
                      f"{row['p99']:>8.0f} {row['ttfb_p50']:>8.0f} {row['ttfb_p99']:>8.0f} {row['errors']:>6} "
                      f"{waited:>8.0f} {f'{watch.busy}/{2 * args.parallel}':>8} {watch.deferred:>8.0f}",
                      flush=True)
                if row["errors"]:
                    print(f"        answers: {row['statuses']}", flush=True)
    finally:
        config.unlink(missing_ok=True)
        stop_all(children)


def queue_wait(gateway: str, headers: dict[str, str]) -> tuple[float, float]:
    """The gateway's total seconds waited for a chat slot and the requests that waited
    (its /metrics, every worker summed)."""
    text = requests.get(gateway + "/metrics", headers=headers, timeout=10).text
    figures = {}
    for line in text.splitlines():
        for name in ("llamagate_queue_wait_seconds_sum", "llamagate_queue_wait_seconds_count"):
            if line.startswith(name + "{") and 'backend="chat"' in line:
                figures[name] = float(line.rsplit(" ", 1)[1])
    return figures.get("llamagate_queue_wait_seconds_sum", 0.0), figures.get("llamagate_queue_wait_seconds_count", 0.0)


class SlotWatch(threading.Thread):
    """The most slots busy at once over the replicas (llama-server's /slots) and the most
    requests llama-server deferred (its own queue: sent while every slot was busy)."""

    def __init__(self, backends: list[str]) -> None:
        super().__init__(daemon=True)
        self.backends = backends
        self.busy = 0
        self.deferred = 0.0
        self.done = threading.Event()

    def __enter__(self) -> "SlotWatch":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()

    def run(self) -> None:
        while not self.done.wait(0.05):
            busy = deferred = 0.0
            for url in self.backends:
                busy += sum(bool(s.get("is_processing")) for s in requests.get(url + "/slots", timeout=5).json())
                deferred += sum(float(line.rsplit(" ", 1)[1]) for line in
                                requests.get(url + "/metrics", timeout=5).text.splitlines()
                                if line.startswith("llamacpp:requests_deferred "))
            self.busy, self.deferred = max(self.busy, int(busy)), max(self.deferred, deferred)


if __name__ == "__main__":
    main()
