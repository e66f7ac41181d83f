"""The prefix-affinity benchmark: multi-turn conversations through the gateway in front
of two real llama-server replicas, once per router strategy, on the same workload.

For each strategy (least_in_flight, round_robin, prefix_affinity) it starts two fresh
replicas (xllamacpp + the SmolLM2 GGUF, ``--parallel`` slots each, one thread each:
their KV caches start empty) and the gateway under gunicorn (``--workers``), then runs
each workload: ``--conversations`` clients at once, each holding one conversation of
``--turns`` turns (a streamed chat request, ``max_tokens`` 24, temperature 0), the
answer and a new question appended each turn. Workloads:

* ``shared system prompt``: every conversation opens with the same long system prompt
  (about 500 tokens), then its own question: a support bot, a RAG preamble;
* ``distinct prompts``: every conversation has a system prompt of its own, as long.

Measured by the client: time to first token (the first content chunk), p50 and p99, of
follow-up turns (turn 2 on) and of all turns; from llama-server's usage (its
``timings``): prompt tokens processed (``prompt_tokens - cached_tokens``) and the share
reused from the KV cache on follow-ups; wall time and requests per second.

    make bench-affinity            # or: python bench/affinity.py [--quick] [--workers N]

It writes its table to bench/affinity-results.md and asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's gateway, not an installed one

import openai  # noqa: E402
import yaml  # noqa: E402

from gateway.testing import free_port  # noqa: E402
from gateway.upstream import wait_until_ready  # noqa: E402
from run import stop_all  # noqa: E402  (bench/run.py, beside this file)

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
STRATEGIES = ("least_in_flight", "round_robin", "prefix_affinity")
RULES = ("You are the support assistant of a hardware shop. Answer in one or two sentences. "
         "Name the aisle when you know it, never invent prices, and suggest a safer tool when the customer "
         "asks about something dangerous. ")
QUESTIONS = ["Where are the wood screws?", "Do you sell ladders?", "I need a drill for concrete.",
             "What glue works on glass?", "Can I rent a floor sander?", "Which paint dries fastest?",
             "Where do I find hinges?", "Do you cut keys?"]


def system_prompt(workload: str, n: int) -> str:
    if workload == "shared":
        return RULES * 8
    return f"Conversation {n}. " + (RULES + f"Customer number {n} prefers short answers. ") * 7


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def converse(base: str, workload: str, n: int, turns: int, results: list[dict], barrier: threading.Barrier) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    messages = [{"role": "system", "content": system_prompt(workload, n)},
                {"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]
    barrier.wait()
    for turn in range(turns):
        sent = time.monotonic()
        first = None
        text, usage = "", None
        stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.monotonic()
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        prompt = usage.prompt_tokens if usage else 0
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        cached = (details.cached_tokens or 0) if details else 0
        results.append({"turn": turn, "ttft": (first or time.monotonic()) - sent, "prompt": prompt, "cached": cached,
                        "completion": usage.completion_tokens if usage else 0})
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"Thanks. And what about {turn + 2}?"}]


def run_workload(base: str, workload: str, conversations: int, turns: int) -> dict:
    results: list[dict] = []
    barrier = threading.Barrier(conversations)
    threads = [threading.Thread(target=converse, args=(base, workload, n, turns, results, barrier))
               for n in range(conversations)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    follow = [r for r in results if r["turn"] > 0]
    return {
        "requests": len(results),
        "ttft_follow_p50": percentile([r["ttft"] for r in follow], 0.5),
        "ttft_follow_p99": percentile([r["ttft"] for r in follow], 0.99),
        "ttft_all_p50": percentile([r["ttft"] for r in results], 0.5),
        "ttft_all_p99": percentile([r["ttft"] for r in results], 0.99),
        "processed_follow": sum(r["prompt"] - r["cached"] for r in follow),
        "processed_all": sum(r["prompt"] - r["cached"] for r in results),
        "reuse_follow": sum(r["cached"] for r in follow) / max(1, sum(r["prompt"] for r in follow)),
        "wall": wall,
        "rps": len(results) / wall,
        "tokens_per_s": sum(r["completion"] for r in results) / wall,
    }


def run_strategy(strategy: str, options: argparse.Namespace, logs: Path) -> dict:
    ports = [free_port(), free_port()]
    backends = [start([sys.executable, "-m", "gateway.cli", "backend", "--model", str(options.model), "--port", str(port),
                       "--parallel", str(options.slots), "--ctx", str(options.slots * 2048), "--threads", "1"],
                      logs / f"{strategy}-backend-{port}.log") for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    procs = list(backends)
    try:
        if not wait_until_ready(urls, timeout=120):
            raise SystemExit(f"bench: the llama-servers did not start (logs in {logs})")
        port = free_port()
        config = logs / f"{strategy}-pipelines.yaml"
        config.write_text(yaml.safe_dump({
            "health_interval": 1,
            "backends": {"chat": {"urls": urls}},
            "models": {"smollm2": {"backend": "chat"}},
            "pipelines": {"default": [{"router": {"strategy": strategy}}]},
            "routes": {"/v1/chat/completions": "default"},
        }))
        env = dict(os.environ, GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_CONFIG=str(config),
                   GATEWAY_WORKERS=str(options.workers), PYTHONPATH=str(ROOT))
        procs.append(start([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
                           logs / f"{strategy}-gateway.log", env))
        base = f"http://127.0.0.1:{port}"
        if not wait_until_ready([base], timeout=60):
            raise SystemExit(f"bench: the gateway did not start (logs in {logs})")
        time.sleep(2.0)  # two health rounds (health_interval 1 s): every worker has read both replicas' slots (/props)
        figures = {}
        for workload in options.workloads:
            figures[workload] = run_workload(base, workload, options.conversations, options.turns)
            print(f"{strategy:16} {workload:8} {json.dumps({k: round(v, 3) for k, v in figures[workload].items()})}",
                  file=sys.stderr, flush=True)
        return figures
    finally:
        stop_all(procs)


def fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(results: dict, options: argparse.Namespace) -> list[str]:
    names = {"shared": "shared system prompt", "distinct": "distinct prompts"}
    lines = ["| workload | strategy | TTFT follow-ups p50 / p99, ms | TTFT all p50 / p99, ms | "
             "prompt tokens processed, follow-ups (all) | cache reuse, follow-ups | wall, s | requests/s | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for workload in options.workloads:
        for strategy in STRATEGIES:
            f = results[strategy][workload]
            lines.append(
                f"| {names[workload]} | {strategy} | {fmt(f['ttft_follow_p50'], 1000)} / {fmt(f['ttft_follow_p99'], 1000)} | "
                f"{fmt(f['ttft_all_p50'], 1000)} / {fmt(f['ttft_all_p99'], 1000)} | "
                f"{f['processed_follow']} ({f['processed_all']}) | {fmt(f['reuse_follow'], 100)}% | "
                f"{fmt(f['wall'], 1, 1)} | {fmt(f['rps'], 1, 2)} | {fmt(f['tokens_per_s'], 1, 1)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4, help="llama-server slots per replica")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers of the gateway")
    parser.add_argument("--workloads", nargs="+", choices=("shared", "distinct"), default=["shared", "distinct"])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--quick", action="store_true", help="3 conversations, 3 turns, the shared workload only")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "affinity-results.md")
    options = parser.parse_args()
    if options.quick:
        options.conversations, options.turns, options.workloads = 3, 3, ["shared"]
    if not options.model.is_file():
        raise SystemExit(f"bench: no model at {options.model} (make model)")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="llamagate-affinity-") as directory:
        results = {strategy: run_strategy(strategy, options, Path(directory)) for strategy in STRATEGIES}
    head = (f"Run {datetime.date.today()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"load average {load_before:.1f} before it; two replicas x {options.slots} slots, 1 thread each; "
            f"gateway {options.workers} worker(s); {options.conversations} conversations at once x {options.turns} "
            f"turns, 24 tokens an answer.")
    text = "\n".join(["# Prefix-affinity benchmark (bench/affinity.py)", "", head, "", *table(results, options), ""])
    options.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
