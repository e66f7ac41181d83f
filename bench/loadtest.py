"""The load test: real llama-server backends (xllamacpp + SmolLM2), the gateway with the
shipped pipelines.yaml, and rising concurrency. Prints errors, p50/p99 latency, time
to first byte and throughput; asserts nothing. Loopback only, bounded in time.

    make loadtest                  # or: python bench/loadtest.py --seconds 10
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from run import ROOT, load, stop_all  # first: it puts the checkout's gateway on sys.path

from gateway.testing import free_port  # noqa: E402
from gateway.upstream import wait_until_ready  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUEST = {"model": "smollm2", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Write one sentence about llamas."}]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per row")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--parallel", type=int, default=4, help="slots per backend")
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
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    children = [subprocess.Popen([sys.executable, "-m", "gateway.cli", "backend", "--model", str(MODEL),
                                  "--port", str(port), "--parallel", str(args.parallel), "--threads", "1",
                                  "--ctx", str(1024 * args.parallel)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in ports]
    children.append(subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    try:
        if not wait_until_ready(backends + [gateway], timeout=60):
            raise SystemExit("loadtest: the backends or the gateway did not start")
        load(gateway, 2, 1.0, False, headers, REQUEST)  # warm up
        print(f"Llamagate load test: SmolLM2-135M Q4_1 on 2 llama-server replicas x {args.parallel} slots "
              f"(1 core each), 1 gateway worker, {args.seconds:g} s per row, max_tokens 16\n")
        print(f"{'mode':<7} {'conc':>4} | {'req/s':>6} {'~tok/s':>6} {'p50 ms':>7} {'p99 ms':>8} "
              f"{'ttfb p50':>8} {'ttfb p99':>8} {'errors':>6}")
        for stream in (False, True):
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                row = load(gateway, concurrency, args.seconds, stream, headers, REQUEST)
                mode = "stream" if stream else "json"
                print(f"{mode:<7} {concurrency:>4} | {row['rps']:>6.1f} {row['rps'] * 16:>6.0f} {row['p50']:>7.0f} "
                      f"{row['p99']:>8.0f} {row['ttfb_p50']:>8.0f} {row['ttfb_p99']:>8.0f} {row['errors']:>6}",
                      flush=True)
    finally:
        config.unlink(missing_ok=True)
        stop_all(children)


if __name__ == "__main__":
    main()
