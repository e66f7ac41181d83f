"""The saved-KV-states benchmark (docs/kv-states.md): conversations that lose their
llama-server slot, or their model, and come back, with the gateway's saved states on and
off, every conversation a tenant of its own (its own API key: tenant isolation on).

The gateway (gunicorn, one gevent worker) launches SmolLM2 through its fleet: ``chat``,
two replicas x 2 slots (ctx 2048, one thread each), and for the swap ``other``, one
replica, at most one of them resident (``max_resident: 1``, ``group_wait: 0``). Each setup
starts afresh (its own gateway, fleet, slot table and states folder). Setups:

* ``saved states``: ``prefix_affinity``, the gateway's saved states on (the default);
* ``prefix_affinity``: the same router, ``LLAMAGATE_KV_STATES_BUDGET=0`` (today's
  behaviour: an evicted conversation, or one whose model stopped, comes back cold);
* ``least_in_flight``: that router, saved states off.

Workloads:

* **evictions**: ``--conversations`` (8) conversations x ``--turns`` (5) over the 4
  slots, each opening with the same ~600-token system prompt and its own question, then its
  own history; turn by turn across the conversations, one request at a time (users who
  pause between turns), so every follow-up finds its slot taken by another conversation;
* **never evicted** (the reference): 4 conversations, as many as slots, the same way;
* **swap**: 3 conversations on ``chat`` (turn 1), one request to ``other`` (``chat`` is
  swapped out), then the 3 conversations' next turns (``chat`` swapped back in).

Reported per workload and setup: follow-up turns' prompt tokens evaluated (prompt minus
cached, from llama-server's usage) and their share of the prompt, first-token p50/p99 of
follow-ups (client side, streamed), the saves and restores (count, ms p50, MB per state,
from the access log's ``kv`` field) and the states folder's bytes at the end.

    make bench-kv                  # or: python bench/kv.py [--quick]

It writes bench/kv-results.md and asserts nothing.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's gateway, not an installed one

import openai  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402

from affinity import QUESTIONS, RULES, percentile, tenant_key  # noqa: E402  (bench/affinity.py, beside this file)
from gateway.backends import kvstates  # noqa: E402
from gateway.testing import free_port, free_ports  # noqa: E402
from run import stop_all  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WORKLOADS = ("evictions", "never evicted", "swap")
SETUPS = {"saved states": ("prefix_affinity", True), "prefix_affinity": ("prefix_affinity", False),
          "least_in_flight": ("least_in_flight", False)}
SYSTEM = RULES * 12  # ~600 tokens
ADMIN = "sk-kv-bench-admin-" + "0" * 24


class Conversation:
    """One tenant's conversation on ``model``; each :meth:`step` streams one turn."""

    def __init__(self, base: str, model: str, n: int) -> None:
        self.client = openai.OpenAI(base_url=base + "/v1", api_key=tenant_key(n), max_retries=0, timeout=600)
        self.model = model
        self.messages = [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"I am customer {n}. {QUESTIONS[n % len(QUESTIONS)]}"}]

    def step(self, turn: int) -> dict:
        sent = time.monotonic()
        first, text, usage = None, "", None
        stream = self.client.chat.completions.create(model=self.model, messages=self.messages, max_tokens=16,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        details = getattr(usage, "prompt_tokens_details", None)
        self.messages += [{"role": "assistant", "content": text},
                          {"role": "user", "content": f"Thanks. And what about item {turn + 2}?"}]
        return {"turn": turn, "ttft": (first or time.monotonic()) - sent, "prompt": usage.prompt_tokens,
                "cached": (details.cached_tokens or 0) if details else 0}


def start_gateway(strategy: str, saved: bool, logs: Path, tag: str) -> tuple[list[subprocess.Popen], str, Path]:
    ports = free_ports(4)
    launch = {"model": str(MODEL), "ctx": 2048, "parallel": 2, "threads": 1, "replicas": 2, "start": "eager"}
    access = logs / f"{tag}-access.log"
    doc = {
        "admin_pipeline": "default",
        "health_interval": 1,
        "fleet": {"ports": {"first": ports[0], "last": ports[-1]}, "log_dir": str(logs / f"{tag}-fleet"),
                  "max_resident": 1, "group_wait": 0},
        "backends": {"chat": {"launch": launch},
                     "other": {"launch": {**launch, "replicas": 1, "parallel": 1, "ctx": 1024, "start": "on_demand"}}},
        "models": {"chat": {"backend": "chat"}, "other": {"backend": "other"}},
        "pipelines": {"default": [{"accesslog": {"path": str(access)}},
                                  {"auth": {"env_keys": {"KV_BENCH_KEYS": "user", "LLAMAGATE_API_KEY": "admin"},
                                            "allow_missing_keys_file": True, "keys_file": str(logs / "none.yaml")}},
                                  {"router": {"strategy": strategy}}]},
        "routes": {"/v1/chat/completions": "default", "/v1/models": "default"},
    }
    config = logs / f"{tag}-pipelines.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    slots_dir = logs / f"{tag}-slots"
    port = free_port()
    env = dict(os.environ, GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_CONFIG=str(config), GATEWAY_WORKERS="1",
               LLAMAGATE_LOG_LEVEL="warning", LLAMAGATE_API_KEY=ADMIN, LLAMAGATE_SLOTS_DIR=str(slots_dir),
               LLAMAGATE_KV_STATES_BUDGET="4GiB" if saved else "0",
               KV_BENCH_KEYS=",".join(f"{tenant_key(n)}:tenant-{n}" for n in range(64)),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")], cwd=ROOT,
                            env=env, stdout=open(logs / f"{tag}-gateway.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # the gateway up and chat's two llama-servers ready
        try:
            status = requests.get(base + "/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
            if status.status_code == 200 and status.json()["models"]["chat"]["state"] == "ready":
                time.sleep(2.0)  # two health rounds: the worker knows both replicas' slots
                return [proc], base, access
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop_all([proc])
    raise SystemExit(f"bench: the gateway did not start (logs in {logs})")


def turns_in_turn(talks: list[Conversation], turns: int) -> list[dict]:
    return [talk.step(turn) for turn in range(turns) for talk in talks]


def swap(base: str, talks: list[Conversation]) -> list[dict]:
    for talk in talks:
        talk.step(0)
    Conversation(base, "other", 63).step(0)  # max_resident 1: chat is swapped out
    return [talk.step(1) for talk in talks]


def figures(results: list[dict], access: Path, states: Path) -> dict:
    follow = [r for r in results if r["turn"] > 0]
    kv = [json.loads(line).get("kv") or {} for line in access.read_text().splitlines()]
    saves = [k for k in kv if k.get("saves")]
    restores = [k for k in kv if k.get("restores")]
    disk = sum(p.stat().st_size for p in states.glob("*.kv")) if states.is_dir() else 0
    return {
        "follow": len(follow),
        "evaluated": sum(r["prompt"] - r["cached"] for r in follow),
        "prompt": sum(r["prompt"] for r in follow),
        "ttft_p50": percentile([r["ttft"] for r in follow], 0.5),
        "ttft_p99": percentile([r["ttft"] for r in follow], 0.99),
        "saves": sum(k["saves"] for k in saves),
        "restores": sum(k["restores"] for k in restores),
        "save_ms": percentile([k["save_ms"] / k["saves"] for k in saves], 0.5),
        "restore_ms": percentile([k["restore_ms"] / k["restores"] for k in restores], 0.5),
        "state_mb": (sum(k["save_bytes"] for k in saves) / max(1, sum(k["saves"] for k in saves))) / 1e6
        if saves else None,
        "failures": sum(k.get("restore_failures", 0) + k.get("save_failures", 0) for k in kv),
        "disk_mb": disk / 1e6,
    }


def run(setup: str, workload: str, options: argparse.Namespace, logs: Path) -> dict:
    strategy, saved = SETUPS[setup]
    tag = f"{setup.replace(' ', '-')}-{workload}"
    procs, base, access = start_gateway(strategy, saved, logs, tag)
    try:
        if workload == "evictions":
            results = turns_in_turn([Conversation(base, "chat", n) for n in range(options.conversations)],
                                    options.turns)
        elif workload == "never evicted":
            results = turns_in_turn([Conversation(base, "chat", n) for n in range(4)], options.turns)
        else:
            results = swap(base, [Conversation(base, "chat", n) for n in range(3)])
        found = figures(results, access, Path(kvstates.states_directory(str(logs / f"{tag}-slots"))))
        print(f"{setup:16} {workload:14} {json.dumps(found)}", file=sys.stderr, flush=True)
        return found
    finally:
        stop_all(procs)


def fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(results: dict[tuple[str, str], dict]) -> list[str]:
    lines = ["| workload | setup | follow-ups | prompt tokens evaluated (share) | first token p50 / p99, ms | "
             "saves / restores | save / restore ms p50 | MB a state | states on disk, MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (workload, setup), f in results.items():
        lines.append(f"| {workload} | {setup} | {f['follow']} | {f['evaluated']} of {f['prompt']} "
                     f"({fmt(f['evaluated'] / max(1, f['prompt']), 100, 1)}%) | {fmt(f['ttft_p50'], 1000)} / "
                     f"{fmt(f['ttft_p99'], 1000)} | {f['saves']} / {f['restores']} | {fmt(f['save_ms'], 1, 1)} / "
                     f"{fmt(f['restore_ms'], 1, 1)} | {fmt(f['state_mb'], 1, 1)} | {fmt(f['disk_mb'], 1, 1)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="6 conversations x 3 turns")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "kv-results.md")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    if options.quick:
        options.conversations, options.turns = 6, 3
    if not MODEL.is_file():
        raise SystemExit(f"bench: no model at {MODEL} (make model)")
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="llamagate-kv-") as directory:
        for workload in options.workloads:
            for setup in options.setups:
                if workload == "never evicted" and setup != "saved states":
                    continue  # the reference: nothing to save or restore
                results[(workload, setup)] = run(setup, workload, options, Path(directory))
    head = (f"Run {datetime.date.today()}: {os.cpu_count()} cores, Python {platform.python_version()}, load average "
            f"{load_before:.1f} before it; SmolLM2 135M Q4_1; chat: two replicas x 2 slots, ctx 2048, 1 thread each; "
            f"gateway 1 worker; every conversation its own tenant (kv_sharing none); evictions: "
            f"{options.conversations} conversations x {options.turns} turns, one request at a time, turn by turn; "
            f"~600-token shared system prompt, 16 tokens an answer.")
    text = "\n".join(["# Saved KV states benchmark (bench/kv.py)", "", head, "", *table(results), ""])
    options.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
