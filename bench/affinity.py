"""The prefix-affinity benchmark: multi-turn conversations through the gateway in front
of two real llama-server replicas, once per router strategy, on the same workloads.

For each strategy (least_in_flight, round_robin, prefix_affinity) and each workload it
starts two fresh replicas (xllamacpp + the SmolLM2 GGUF, ``--slots`` slots each, one
thread each: their KV caches start empty) and the gateway under gunicorn
(``--workers``), then runs ``--conversations`` conversations of ``--turns`` turns (a
streamed chat request, ``max_tokens`` 24, temperature 0), the answer and a new question
appended each turn. Workloads:

* ``shared``: every conversation opens with the same long system prompt (about 500
  tokens), then its own question (a support bot, a RAG preamble); the clients all at once;
* ``shared-sequential``: the same, one request at a time, turn by turn across the
  conversations (users who pause between turns);
* ``distinct``: every conversation has a system prompt of its own, as long; all at once.

Measured by the client: time to first token (the first content chunk), p50 and p99, of
follow-up turns (turn 2 on) and of all turns; from llama-server's usage (its
``timings``): prompt tokens processed (``prompt_tokens - cached_tokens``) and the share
reused from the KV cache on follow-ups and on all turns; wall time, requests and generated
tokens per second.

Each conversation is a tenant of its own (its own API key, ``--tenants each``, the
default): the gateway keeps tenants' cached prompts apart (``gateway.backends.slots``), so a
conversation reuses only its own turns, never another's system prompt. ``--tenants one``
sends every conversation with one key (one tenant: reuse across conversations allowed), and
``--kv-sharing global`` declares every client one sharing scope (the operator's opt-in).

    make bench-affinity            # or: python bench/affinity.py [--quick] [--workers N]

It writes its table to bench/affinity-results.md and asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
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
from gateway.backends.upstream import wait_until_ready  # noqa: E402
from run import stop_all  # noqa: E402  (bench/run.py, beside this file)

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
STRATEGIES = ("least_in_flight", "round_robin", "prefix_affinity")
WORKLOADS = ("shared", "shared-sequential", "distinct")
RULES = ("You are the support assistant of a hardware shop. Answer in one or two sentences. "
         "Name the aisle when you know it, never invent prices, and suggest a safer tool when the customer "
         "asks about something dangerous. ")
QUESTIONS = ["Where are the wood screws?", "Do you sell ladders?", "I need a drill for concrete.",
             "What glue works on glass?", "Can I rent a floor sander?", "Which paint dries fastest?",
             "Where do I find hinges?", "Do you cut keys?"]


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


class Conversation:
    """One client's conversation: each :meth:`step` sends the history, streamed, and
    appends the answer and a new question."""

    def __init__(self, base: str, shared: bool, n: int, key: str) -> None:
        self.client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=600)
        system = RULES * 8 if shared else f"Conversation {n}. " + (RULES + f"Customer {n} prefers short answers. ") * 7
        self.messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]

    def step(self, turn: int) -> dict:
        sent = time.monotonic()
        first = None
        text, usage = "", None
        stream = self.client.chat.completions.create(model="smollm2", messages=self.messages, max_tokens=24,
                                                     temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.monotonic()
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        self.messages += [{"role": "assistant", "content": text},
                          {"role": "user", "content": f"Thanks. And what about {turn + 2}?"}]
        return {"turn": turn, "ttft": (first or time.monotonic()) - sent, "prompt": usage.prompt_tokens if usage else 0,
                "cached": (details.cached_tokens or 0) if details else 0,
                "completion": usage.completion_tokens if usage else 0}


def tenant_key(n: int) -> str:
    return f"sk-bench-tenant-{n:04d}-" + "x" * 24


def run_workload(base: str, workload: str, conversations: int, turns: int, tenants: str) -> dict:
    """The workload's conversations: at once, each in a thread of its own, or (``-sequential``)
    one request at a time, turn by turn across the conversations (users who pause between
    turns: nobody else's request is in flight when one arrives)."""
    results: list[dict] = []
    talks = [Conversation(base, workload.startswith("shared"), n, tenant_key(n if tenants == "each" else 0))
             for n in range(conversations)]
    began = time.monotonic()
    if workload.endswith("sequential"):
        for turn in range(turns):
            results += [talk.step(turn) for talk in talks]
    else:
        barrier = threading.Barrier(conversations)

        def converse(talk: Conversation) -> None:
            barrier.wait()
            results.extend(talk.step(turn) for turn in range(turns))

        threads = [threading.Thread(target=converse, args=(talk,)) for talk in talks]
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
        "reuse_all": sum(r["cached"] for r in results) / max(1, sum(r["prompt"] for r in results)),
        "wall": wall,
        "rps": len(results) / wall,
        "tokens_per_s": sum(r["completion"] for r in results) / wall,
    }


def run_strategy(strategy: str, workload: str, options: argparse.Namespace, logs: Path) -> dict:
    ports = [free_port(), free_port()]
    backends = [start([sys.executable, "-m", "gateway.cli", "backend", "--model", str(options.model), "--port", str(port),
                       "--parallel", str(options.slots), "--ctx", str(options.slots * 2048), "--threads", "1"],
                      logs / f"{strategy}-{workload}-backend-{port}.log") for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    procs = list(backends)
    try:
        if not wait_until_ready(urls, timeout=120):
            raise SystemExit(f"bench: the llama-servers did not start (logs in {logs})")
        port = free_port()
        config = logs / f"{strategy}-{workload}-pipelines.yaml"
        config.write_text(yaml.safe_dump({
            "health_interval": 1,
            "backends": {"chat": {"urls": urls, "kv_sharing": options.kv_sharing}},
            "models": {"smollm2": {"backend": "chat"}},
            "pipelines": {"default": [{"auth": {"env_keys": {"BENCH_TENANT_KEYS": "user"}}},
                                      {"router": {"strategy": strategy, "load_factor": options.load_factor}}]},
            "routes": {"/v1/chat/completions": "default"},
        }))
        env = dict(os.environ, GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_CONFIG=str(config),
                   GATEWAY_WORKERS=str(options.workers), PYTHONPATH=str(ROOT),
                   LLAMAGATE_SLOTS_DIR=str(logs / f"{strategy}-{workload}-slots"),  # fresh replicas, a fresh table
                   BENCH_TENANT_KEYS=",".join(f"{tenant_key(n)}:tenant-{n}" for n in range(options.conversations)))
        procs.append(start([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
                           logs / f"{strategy}-{workload}-gateway.log", env))
        base = f"http://127.0.0.1:{port}"
        if not wait_until_ready([base], timeout=60):
            raise SystemExit(f"bench: the gateway did not start (logs in {logs})")
        time.sleep(2.0)  # two health rounds (health_interval 1 s): every worker has read both replicas' slots (/props)
        figures = run_workload(base, workload, options.conversations, options.turns, options.tenants)
        print(f"{strategy:16} {workload:18} {json.dumps({k: round(v, 3) for k, v in figures.items()})}",
              file=sys.stderr, flush=True)
        return figures
    finally:
        stop_all(procs)


def fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(results: dict, options: argparse.Namespace) -> list[str]:
    names = {"shared": "shared system prompt, at once", "shared-sequential": "shared system prompt, one at a time",
             "distinct": "distinct prompts, at once"}
    lines = ["| workload | strategy | TTFT follow-ups p50 / p99, ms | TTFT all p50 / p99, ms | "
             "prompt tokens processed, follow-ups (all) | cache reuse, follow-ups (all) | wall, s | requests/s | "
             "tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for workload in options.workloads:
        for strategy in results:
            f = results[strategy][workload]
            lines.append(
                f"| {names[workload]} | {strategy} | {fmt(f['ttft_follow_p50'], 1000)} / {fmt(f['ttft_follow_p99'], 1000)} | "
                f"{fmt(f['ttft_all_p50'], 1000)} / {fmt(f['ttft_all_p99'], 1000)} | "
                f"{f['processed_follow']} ({f['processed_all']}) | {fmt(f['reuse_follow'], 100)}% ({fmt(f['reuse_all'], 100)}%) | "
                f"{fmt(f['wall'], 1, 1)} | {fmt(f['rps'], 1, 2)} | {fmt(f['tokens_per_s'], 1, 1)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4, help="llama-server slots per replica")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers of the gateway")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--load-factor", type=float, default=1.0, help="the router's load_factor (prefix_affinity)")
    parser.add_argument("--tenants", choices=("each", "one"), default="each",
                        help="each: every conversation its own API key (tenant); one: all with one key")
    parser.add_argument("--kv-sharing", choices=("none", "global"), default="none",
                        help="the backend's kv_sharing: none keeps tenants' cached prompts apart")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--quick", action="store_true", help="4 conversations, 3 turns, the shared workloads only")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "affinity-results.md")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    if options.quick:
        options.conversations, options.turns, options.workloads = 4, 3, ["shared", "shared-sequential"]
    if not options.model.is_file():
        raise SystemExit(f"bench: no model at {options.model} (make model)")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="llamagate-affinity-") as directory:
        results = {strategy: {} for strategy in options.strategies}
        for workload in options.workloads:  # the strategies one after the other on each workload
            for strategy in options.strategies:
                results[strategy][workload] = run_strategy(strategy, workload, options, Path(directory))
    head = (f"Run {datetime.date.today()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"load average {load_before:.1f} before it; two replicas x {options.slots} slots, 1 thread each; "
            f"gateway {options.workers} worker(s), load_factor {options.load_factor:g}; {options.conversations} conversations at once x {options.turns} "
            f"turns, 24 tokens an answer; tenants: {options.tenants} (a key per conversation, or one key), "
            f"kv_sharing: {options.kv_sharing}.")
    text = "\n".join(["# Prefix-affinity benchmark (bench/affinity.py)", "", head, "", *table(results, options), ""])
    options.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
