"""The commands that show where requests go and what serves them: ``routes`` (from the
config), ``status`` and ``models`` (from a running gateway's admin endpoints)."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Callable

from .. import settings
from ..config import ConfigError, load_config
from ..redact import redact_url
from .registry import FromSettings, arg, command
from .serving import CONFIG, OPERATOR_KEY_FILE, replica_urls

# Where a running gateway is, and the operator's key, for the commands that call it.
ADMIN_ARGS = (arg("--url", default=FromSettings(lambda env: "http://" + env.bind),
                  help="default http:// and GATEWAY_BIND"),
              arg("--key", default=None, help="an admin key (default: LLAMAGATE_API_KEY, then .llamagate-api-key)"))


@command("routes", "which model goes to which backend replicas", arg("file", nargs="?", default=CONFIG))
def cmd_routes(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(redact_url(str(exc)), file=sys.stderr)
        return 1
    print(f"{'model':<28} {'backend':<14} replicas")
    for model in config.models.values():
        names = ", ".join((model.id, *model.aliases))
        upstream = f" (sent as {model.upstream_model})" if model.upstream_model else ""
        print(f"{names + upstream:<28} {model.backend:<14} {replica_urls(config, model.backend)}")
    for prefix, target in config.prefix_routes.items():
        print(f"{prefix + '/*':<28} {target.backend:<14} {replica_urls(config, target.backend)}")
    return 0


def operator_key(args: argparse.Namespace) -> str:
    """``--key``, else LLAMAGATE_API_KEY, else the key ``llamagate up`` wrote."""
    return args.key or settings.current().api_key or (
        OPERATOR_KEY_FILE.read_text().strip() if OPERATOR_KEY_FILE.exists() else "")


def admin_call(args: argparse.Namespace, method: str, path: str, timeout: float = 5) -> dict | None:
    """An admin endpoint of a running gateway, with the operator's key; None (and a line
    on stderr) when it fails."""
    import requests

    try:
        resp = requests.request(method, args.url.rstrip("/") + path, timeout=timeout,
                                headers={"Authorization": f"Bearer {operator_key(args)}"})
    except requests.RequestException as exc:
        print(f"llamagate {args.command}: {args.url} did not answer: {type(exc).__name__}", file=sys.stderr)
        return None
    if resp.status_code != 200:
        print(f"llamagate {args.command}: HTTP {resp.status_code}: {resp.text[:300]}", file=sys.stderr)
        return None
    return resp.json()


def status_table(status: dict) -> str:
    """``/admin/status`` as text an operator reads at a glance."""
    lines = [f"worker pid {status['pid']}  requests in flight {status['in_flight']}"
             f"{'  DRAINING' if status['draining'] else ''}", "",
             f"{'backend':<14} {'limit':>5} {'in flight':>9} {'queued':>6}  replica"
             f"{'':<24} {'ready':<5} {'slots':>5} {'busy':>4}  breaker"]
    for name, group in status["backends"].items():
        for i, replica in enumerate(group["replicas"]):
            head = (f"{name:<14} {group['limit']:>5} {group['in_flight']:>9} {group['queued']:>6}" if i == 0
                    else " " * 38)
            lines.append(f"{head}  {redact_url(replica['url']):<31} {'yes' if replica['ready'] else 'no':<5} "
                         f"{replica['slots'] if replica['slots'] is not None else '?':>5} {replica['in_flight']:>4}  "
                         f"{replica['breaker']}")
    lines += workers_table(status)
    lines += ["", "pipelines:"]
    lines += [f"  {name}: {' -> '.join(label.rsplit('.', 1)[-1] for label in chain) or '(no plugins)'}"
              for name, chain in status["pipelines"].items()]
    return "\n".join(lines)


def workers_table(status: dict) -> list[str]:
    """Every worker of every host (one with no shared Redis), and their totals; none
    from a gateway older than the shared status."""
    totals = status.get("totals")
    if totals is None:
        return []
    shared = {"off": "", "ok": "  (from the shared redis)", "unreachable": "  (shared redis UNREACHABLE: this worker only)"}
    lines = ["", f"workers {totals['workers']} on {totals['hosts']} host(s){shared[status['shared']]}",
             f"{'worker':<40} {'in flight':>9} {'req/s':>7} {'requests':>8} {'errors':>6}  backends (in flight/queued)"]
    for w in status["workers"] + [dict(totals, worker="total")]:
        backends = " ".join(f"{name} {b['in_flight']}/{b['queued']}" for name, b in w["backends"].items())
        lines.append(f"{w['worker'] + (' DRAINING' if w['draining'] is True else ''):<40} {w['in_flight']:>9} "
                     f"{w['requests_per_s']:>7} {w['requests']:>8} {w['errors']:>6}  {backends}")
    return lines


@command("status", "a running gateway's /admin/status as a table", *ADMIN_ARGS)
def cmd_status(args: argparse.Namespace) -> int:
    status = admin_call(args, "GET", "/admin/status")
    if status is None:
        return 1
    print(status_table(status))
    return 0


def models_table(fleet: dict) -> str:
    lines = [f"{'backend':<16} {'state':<9} {'pids':<14} {'ports':<12} {'rss MiB':>8} {'in flight':>9} "
             f"{'queued':>6} {'idle s':>7} {'restarts':>8}  models"]
    for name, m in fleet["models"].items():
        lines.append(f"{name:<16} {m['state']:<9} {','.join(map(str, m['pids'])) or '-':<14} "
                     f"{','.join(map(str, m['ports'])):<12} {m['resident_bytes'] / 2**20:>8.0f} {m['in_flight']:>9} "
                     f"{m['queued']:>6} {m['idle_for']:>7} {m['restarts']:>8}  {', '.join(m['models'])}")
        if m.get("reason"):
            lines.append(f"  {m['reason']}")
    lines.append(f"swaps: {fleet['swaps']}  resident: {fleet['resident']}  max_resident: {fleet['max_resident']}  "
                 f"memory_budget: {fleet['memory_budget']}")
    return "\n".join(lines)


@command("models", "the fleet's launched models; load or unload one",
         arg("action", nargs="?", choices=["load", "unload"], default=None),
         arg("id", nargs="?", help="a model id or alias, or a launched backend's name"), *ADMIN_ARGS)
def cmd_models(args: argparse.Namespace) -> int:
    if args.action is None:
        fleet = admin_call(args, "GET", "/admin/models")
        if fleet is None:
            return 1
        print(models_table(fleet))
        return 0
    if not args.id:
        print(f"llamagate models {args.action}: name a model (or launched backend)", file=sys.stderr)
        return 2
    model = with_progress(args, lambda: admin_call(args, "POST", f"/admin/models/{args.id}/{args.action}",
                                                   timeout=600))
    if model is None:
        return 1
    print(f"{model['backend']}: {model['state']}" + (f" ({model['reason']})" if model.get("reason") else ""))
    return 0 if model["state"] == ("ready" if args.action == "load" else "stopped") else 1


# Seconds before the first look at the fleet while a load or unload runs (soon: silence
# is what this replaces), and between the looks after it.
PROGRESS_FIRST, PROGRESS_EVERY = 0.2, 0.5


def with_progress(args: argparse.Namespace, call: Callable[[], dict | None]) -> dict | None:
    """``call`` (a load or unload, which answers only when it is done), with what the
    fleet is doing meanwhile on stderr: the model's state, the seconds so far, its
    processes' memory, and the models stopping to make room. On a terminal one line is
    rewritten; otherwise a line is printed when something other than the clock changes."""
    result: list[dict | None] = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    started = time.monotonic()
    worker.start()
    terminal, shown = sys.stderr.isatty(), ""
    wait = PROGRESS_FIRST
    while True:
        worker.join(wait)
        wait = PROGRESS_EVERY
        if not worker.is_alive():
            break
        line = progress_line(args, time.monotonic() - started)
        if line is None:
            continue
        if terminal:
            print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
        elif line.split(" (")[0] != shown:
            print(line, file=sys.stderr, flush=True)
        shown = line.split(" (")[0]
    if terminal and shown:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    return result[0] if result else None


def progress_line(args: argparse.Namespace, elapsed: float) -> str | None:
    """One look at ``/admin/models`` as ``name: state, others (seconds, memory)``."""
    import requests

    try:
        fleet = requests.get(args.url.rstrip("/") + "/admin/models", timeout=2,
                             headers={"Authorization": f"Bearer {operator_key(args)}"}).json()["models"]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return None
    target = next((m for name, m in fleet.items() if args.id == name or args.id in m["models"]), None)
    if target is None:
        return None
    making_room = [f"{name} {m['state']}" for name, m in fleet.items()
                   if m is not target and m["state"] in ("draining", "stopping")]
    room = f", making room: {', '.join(making_room)}" if making_room else ""
    return (f"{target['backend']}: {target['state']}{room} "
            f"({elapsed:.0f} s, {target['resident_bytes'] / 2**20:.0f} MiB)")
