"""``llamagate``: the operator's command line.

    llamagate check [FILE]            check a pipelines file, print the chains
    llamagate serve [--config FILE] [--bind HOST:PORT]
                                      run the gateway under gunicorn (gevent)
    llamagate backend --model PATH [--port N] [--embeddings] [--parallel N] [--ctx N]
                                      run one llama-server
    llamagate up [--config FILE]      the gateway, whose fleet launches the config's
                                      llama-servers, with a curl line; until Ctrl-C
    llamagate plugins                 list the plugins that can be used, their hooks and fields
    llamagate routes [FILE]           which model goes to which backend replicas
    llamagate status [--url URL]      a running gateway's /admin/status as a table
    llamagate models [load|unload ID] the fleet's launched models (/admin/models); load or unload one
    llamagate keys add|list|revoke    the API keys file
    llamagate keys add|list|revoke|rotate [--db URL]
                                      the API keys file, or the keys database
    llamagate usage --db URL [--client C] [--from DAY] [--to DAY] [--top N]
                                      usage from the ledger, per day, client and model
    llamagate settings                every setting from the environment: value, default, description

Every command but ``settings`` first checks the settings (``gateway/settings.py``) and
refuses bad values with one line each.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from . import backend, keydb, keys, ledger, pg, settings
from .config import Config, ConfigError, load_config
from .fleet.spec import fleet_problems
from .pipeline import build_pipelines, discover
from .redact import key_hint, redact_url
from .upstream import wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
# make serve's operator key when LLAMAGATE_API_KEY is not set (git-ignored, mode 0600).
OPERATOR_KEY_FILE = Path(".llamagate-api-key")


def replica_urls(config: Config, backend_name: str) -> str:
    """A backend's replica URLs for the operator's eyes, userinfo redacted."""
    return ", ".join(redact_url(url) for url in config.backends[backend_name].urls)


def checked_config(path: str) -> Config | None:
    """The config at ``path`` with its plugins built and its launched backends checked, or
    None after printing every problem (``file: path: reason``) on stderr."""
    try:
        config = load_config(path)
        problems = fleet_problems(config)
        if problems:
            raise ConfigError(path, problems)
        build_pipelines(config)
    except ConfigError as exc:
        print(redact_url(str(exc)), file=sys.stderr)
        return None
    return config


def cmd_check(args: argparse.Namespace) -> int:
    config = checked_config(args.file)
    if config is None:
        return 1
    print(f"{args.file}: OK")
    for route, name in config.routes.items():
        chain = " -> ".join(entry.name for entry in config.pipelines[name]) or "(no plugins)"
        print(f"  {route}  [{name}]  {chain}")
    for route, name in config.plugin_routes.items():
        chain = " -> ".join(entry.name for entry in config.pipelines[name])
        print(f"  {route}  [{name}]  {chain}  (answered by a plugin)")
    for prefix, target in config.prefix_routes.items():
        chain = " -> ".join(entry.name for entry in config.pipelines[target.pipeline]) or "(no plugins)"
        urls = replica_urls(config, target.backend)
        print(f"  {prefix}/*  [{target.pipeline}]  {chain}  => {target.backend}: {urls}")
    for model in config.models.values():
        aliases = f" (aliases: {', '.join(model.aliases)})" if model.aliases else ""
        urls = replica_urls(config, model.backend)
        print(f"  model {model.id}{aliases} -> {model.backend}: {urls}")
    return 0


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


def admin_call(args: argparse.Namespace, method: str, path: str, timeout: float = 5) -> dict | None:
    """An admin endpoint of a running gateway, with the operator's key; None (and a line
    on stderr) when it fails."""
    import requests

    key = args.key or settings.current().api_key or (
        OPERATOR_KEY_FILE.read_text().strip() if OPERATOR_KEY_FILE.exists() else "")
    try:
        resp = requests.request(method, args.url.rstrip("/") + path, headers={"Authorization": f"Bearer {key}"},
                                timeout=timeout)
    except requests.RequestException as exc:
        print(f"llamagate {args.command}: {args.url} did not answer: {type(exc).__name__}", file=sys.stderr)
        return None
    if resp.status_code != 200:
        print(f"llamagate {args.command}: HTTP {resp.status_code}: {resp.text[:300]}", file=sys.stderr)
        return None
    return resp.json()


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
    model = admin_call(args, "POST", f"/admin/models/{args.id}/{args.action}", timeout=600)
    if model is None:
        return 1
    print(f"{model['backend']}: {model['state']}" + (f" ({model['reason']})" if model.get("reason") else ""))
    return 0 if model["state"] == ("ready" if args.action == "load" else "stopped") else 1


def gunicorn_command(config: str, bind: str | None) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, GATEWAY_CONFIG=str(Path(config).resolve()))
    if bind:
        env["GATEWAY_BIND"] = bind
    return [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF)], env


def cmd_serve(args: argparse.Namespace) -> int:
    if checked_config(args.config) is None:
        return 1
    command, env = gunicorn_command(args.config, args.bind)
    os.execve(command[0], command, env)
    return 0  # not reached


def cmd_backend(args: argparse.Namespace) -> int:
    backend.run(backend.BackendOptions(model=args.model, host=args.host, port=args.port,
                                       embeddings=args.embeddings, parallel=args.parallel,
                                       ctx=args.ctx, binary=args.binary, threads=args.threads,
                                       api_key=args.api_key or settings.current().llama_api_key or None,
                                       cache_ram=args.cache_ram,
                                       extra_args=tuple(a for a in args.extra if a != "--")))
    return 0


def operator_key() -> str:
    """LLAMAGATE_API_KEY, or the key kept in OPERATOR_KEY_FILE, made on first use."""
    return operator_key_source()[0]


def operator_key_source() -> tuple[str, str]:
    """The operator key and where it came from: ``env`` (LLAMAGATE_API_KEY), ``file``
    (OPERATOR_KEY_FILE, made by an earlier run) or ``new`` (made now, kept in the file)."""
    if settings.current().api_key:
        return settings.current().api_key, "env"
    if OPERATOR_KEY_FILE.exists():
        return OPERATOR_KEY_FILE.read_text().strip(), "file"
    key = keys.new_key()
    fd = os.open(OPERATOR_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    print(f"Made an operator API key, kept in {OPERATOR_KEY_FILE} (readable only by you).")
    return key, "new"


def banner_authorization(key: str, source: str) -> tuple[str, str]:
    """The ``-H`` argument of the start-up banner's curl line, and a note on the key.

    Only a key made just now is shown, once; one the operator already has (from the
    environment or the key file) is named, and the curl line reads it from there."""
    if source == "new":
        return f"'Authorization: Bearer {key}'", f"(the key is shown only this once; it is kept in {OPERATOR_KEY_FILE})"
    if source == "env":
        return ('"Authorization: Bearer $LLAMAGATE_API_KEY"',
                f"(the key is LLAMAGATE_API_KEY's value, {key_hint(key)})")
    return (f'"Authorization: Bearer $(cat {OPERATOR_KEY_FILE})"',
            f"(the key is the one kept in {OPERATOR_KEY_FILE}, {key_hint(key)})")


def cmd_up(args: argparse.Namespace) -> int:
    """``make serve``: the gateway, whose fleet launches the config's llama-servers, with
    a curl line to try; until Ctrl-C (which stops the gateway and every llama-server)."""
    api_key, key_source = operator_key_source()
    os.environ["LLAMAGATE_API_KEY"] = api_key
    if checked_config(args.config) is None:
        return 1
    command, env = gunicorn_command(args.config, args.bind)
    gateway = subprocess.Popen(command, env=env)

    def stop(*_: object) -> None:
        if gateway.poll() is None:
            gateway.terminate()
        try:
            gateway.wait(timeout=40)  # the master stops the fleet, which stops the llama-servers
        except subprocess.TimeoutExpired:
            gateway.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        bind = args.bind or settings.current().bind
        if not wait_until_ready([f"http://{bind}"], timeout=120):
            print("llamagate up: the gateway did not become ready", file=sys.stderr)
            stop()
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Say hello"}]})
        authorization, key_note = banner_authorization(api_key, key_source)
        print("\nLlamagate is up. Try:\n", flush=True)
        print(f"  curl -s http://{bind}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
              f"    -H {authorization} -d '{body}'\n  {key_note}\n", flush=True)
        print("`llamagate models` shows the llama-servers the gateway runs. Ctrl-C stops it all.", flush=True)
        gateway.wait()
        print("llamagate up: the gateway exited", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    stop()
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    try:
        plugin_dirs = load_config(args.config).plugin_dirs if args.config else ()
        available = discover(plugin_dirs)
    except ConfigError as exc:
        print(redact_url(str(exc)), file=sys.stderr)
        return 1
    for spec in available.values():
        print(f"{spec.name}  ({spec.source})  hooks: {', '.join(spec.hooks)}")
        for field, prop in spec.schema.get("properties", {}).items():
            default = f" [default {json.dumps(prop['default'])}]" if "default" in prop else ""
            print(f"    {field}: {prop.get('description', '')}{default}")
    return 0


def key_limits(args: argparse.Namespace) -> dict[str, int]:
    return {name: value for name, value in (("requests_per_minute", args.rpm), ("tokens_per_minute", args.tpm),
                                            ("tokens_per_day", args.tokens_per_day),
                                            ("tokens_per_month", args.tokens_per_month),
                                            ("requests_per_day", args.requests_per_day)) if value is not None}


def cmd_keys(args: argparse.Namespace) -> int:
    if args.db:
        return cmd_keys_db(args)
    try:
        if args.action == "add":
            models = [m for m in (args.models or "").split(",") if m]
            if args.priority is not None or args.expires is not None:
                raise ValueError("--priority and --expires need the keys database (--db)")
            key = keys.add_key(args.file, args.client, args.role, models, key_limits(args))
            print(f"New key for {args.client} ({args.role}); it is shown only this once:\n{key}")
        elif args.action == "list":
            keys.load_keys_file(args.file)  # refuses a malformed file, naming the entry
            for entry in keys.read_entries(args.file):
                models = ",".join(entry.get("models") or []) or "*"
                print(f"{entry['client']:<20} {entry.get('role', 'user'):<6} models={models:<20} "
                      f"limits={json.dumps(entry.get('limits') or {})} sha256={entry['sha256'][:12]}")
        elif args.action == "rotate":
            raise ValueError("rotate needs the keys database (--db); with a file, add a key then revoke the old one")
        else:
            removed = keys.revoke(args.file, args.who)
            print(f"revoked {removed} key(s)")
            return 0 if removed else 1
    except (OSError, ValueError) as exc:
        print(f"llamagate keys: {exc}", file=sys.stderr)
        return 1
    return 0


def expiry(text: str | None) -> datetime | None:
    """``--expires``: an ISO time (UTC when it names no zone) or a number of days."""
    if text is None:
        return None
    if text.isdigit():
        return datetime.now(timezone.utc) + timedelta(days=int(text))
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("--expires takes an ISO time (2027-01-31T00:00) or a number of days") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def cmd_keys_db(args: argparse.Namespace) -> int:
    conn = None
    try:
        conn = pg.connect(args.db)
        keydb.prepare(conn)
        if args.action == "add":
            models = [m for m in (args.models or "").split(",") if m]
            key, row = keydb.add_key(conn, args.client, args.role, models, key_limits(args), args.priority,
                                     expiry(args.expires))
            print(f"New key {row.key_id} for {row.client} ({row.role}); it is shown only this once:\n{key}")
        elif args.action == "list":
            for row in keydb.list_keys(conn, client=args.client, include_revoked=args.all):
                models = ",".join(row.models) or "*"
                state = f"revoked {row.revoked:%Y-%m-%d %H:%M}" if row.revoked else \
                    f"expires {row.expires:%Y-%m-%d %H:%M}" if row.expires else "live"
                print(f"{row.key_id}  {row.client:<20} {row.role:<6} models={models:<20} "
                      f"limits={json.dumps(row.limits)} priority={row.priority if row.priority is not None else '-'} "
                      f"{state}")
        elif args.action == "rotate":
            key, row = keydb.rotate(conn, args.who, args.grace)
            old = f"expires in {args.grace:g} s" if args.grace > 0 else "is revoked"
            print(f"New key {row.key_id} for {row.client}; the old one {old}. Shown only this once:\n{key}")
        else:
            revoked = keydb.revoke(conn, args.who)
            print(f"revoked {revoked} key(s)")
            return 0 if revoked else 1
    except (ValueError, RuntimeError, *pg.ERRORS) as exc:
        print(f"llamagate keys: {exc}", file=sys.stderr)
        return 1
    finally:
        pg.close_quietly(conn)
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    if not args.db:
        print("llamagate usage: give --db URL or set LLAMAGATE_DATABASE_URL", file=sys.stderr)
        return 1
    conn = None
    try:
        today = datetime.now(timezone.utc).date()
        first, last = ledger.day_range(args.start, args.end, today)
        conn = pg.connect(args.db)
        ledger.prepare(conn)
        if args.top:
            rows = ledger.top_clients(conn, last, args.top)
        else:
            rows = ledger.usage(conn, first, last, client=args.client)
    except (ValueError, RuntimeError, *pg.ERRORS) as exc:
        print(f"llamagate usage: {exc}", file=sys.stderr)
        return 1
    finally:
        pg.close_quietly(conn)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.top:
        print(f"{'client':<24} {'requests':>9} {'tokens':>12}   ({last})")
        for row in rows:
            print(f"{row['client']:<24} {row['requests']:>9} {row['total_tokens']:>12}")
        return 0
    print(f"{'day':<10} {'client':<20} {'model':<20} {'requests':>9} {'prompt':>10} {'completion':>10} {'total':>10}")
    for row in rows:
        print(f"{row['day']:<10} {row['client']:<20} {str(row['model']):<20} {row['requests']:>9} "
              f"{row['prompt_tokens']:>10} {row['completion_tokens']:>10} {row['total_tokens']:>10}")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    return settings.print_settings()


def main(argv: list[str] | None = None) -> int:
    try:
        env, problems = settings.current(), []
    except settings.SettingsError as exc:  # refused below, unless the command is `settings`
        env, problems = settings.Settings(), exc.problems
    parser = argparse.ArgumentParser(prog="llamagate", description="An OpenAI-compatible gateway for llama-server.")
    sub = parser.add_subparsers(dest="command", required=True)
    default_config = env.config

    p = sub.add_parser("check", help="check a pipelines file and print the resolved chains")
    p.add_argument("file", nargs="?", default=default_config)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("serve", help="run the gateway under gunicorn with gevent workers")
    p.add_argument("--config", default=default_config)
    p.add_argument("--bind", default=None, help="HOST:PORT (default GATEWAY_BIND or 127.0.0.1:8000)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("backend", help="run one llama-server (binary or xllamacpp)")
    p.add_argument("--model", required=True, help="path to a GGUF file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--embeddings", action="store_true", help="serve embeddings (mean pooling)")
    p.add_argument("--parallel", type=int, default=2, help="slots (default 2)")
    p.add_argument("--ctx", type=int, default=4096, help="context size shared by the slots")
    p.add_argument("--binary", default=None, help="llama-server executable (default: LLAMA_SERVER_BIN, PATH)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--api-key", default=None, help="a key callers must send (default: LLAMA_API_KEY, else none)")
    p.add_argument("--cache-ram", type=int, default=0,
                   help="MiB of prompt cache in host memory, shared by every client across slots (default 0: off)")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more llama-server arguments (binary only)")
    p.set_defaults(func=cmd_backend)

    p = sub.add_parser("up", help="the gateway and the llama-servers it launches, until Ctrl-C (make serve)")
    p.add_argument("--config", default=default_config)
    p.add_argument("--bind", default=None)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("keys", help="manage the API keys file (hashes only)")
    keys_sub = p.add_subparsers(dest="action", required=True)
    k = keys_sub.add_parser("add", help="make a key, print it once, store its hash")
    k.add_argument("--client", required=True)
    k.add_argument("--role", choices=["user", "admin"], default="user")
    k.add_argument("--models", help="comma-separated model ids the key may use (default: all)")
    k.add_argument("--rpm", type=int, help="requests per minute for this key")
    k.add_argument("--tpm", type=int, help="tokens per minute for this key")
    k.add_argument("--tokens-per-day", type=int, help="quota: tokens per UTC day")
    k.add_argument("--tokens-per-month", type=int, help="quota: tokens per UTC month")
    k.add_argument("--requests-per-day", type=int, help="quota: requests per UTC day")
    k.add_argument("--priority", type=int, help="queue priority, 0 (default) to 100: higher goes first, after admins (--db only)")
    k.add_argument("--expires", help="an ISO time or a number of days (--db only)")
    k = keys_sub.add_parser("list", help="list clients, roles and key ids")
    k.add_argument("--all", action="store_true", help="revoked keys too (--db only)")
    k.add_argument("--client", default=None, help="only this client's keys (--db only)")
    k = keys_sub.add_parser("revoke", help="revoke the keys of a client or one key by its id (sha256 prefix)")
    k.add_argument("who", help="client name or key id (sha256 prefix, 8 digits at least)")
    k = keys_sub.add_parser("rotate", help="a new key in place of a client's one key (--db only)")
    k.add_argument("who", help="client name or key id")
    k.add_argument("--grace", type=float, default=0.0, help="seconds the old key keeps working (default 0)")
    for k in keys_sub.choices.values():
        k.add_argument("--file", default=env.keys_file, help="keys file (default LLAMAGATE_KEYS_FILE or keys.yaml)")
        k.add_argument("--db", default=env.database_url or None, metavar="URL",
                       help="the keys database instead of the file: postgresql://... (default "
                            "LLAMAGATE_DATABASE_URL; when set, the file is not used)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("usage", help="usage from the ledger: per day, client and model, or the top clients")
    p.add_argument("--db", default=env.database_url or None, metavar="URL",
                   help="the ledger database: postgresql://... (default LLAMAGATE_DATABASE_URL)")
    p.add_argument("--client", default=None)
    p.add_argument("--from", dest="start", default=None, help="first UTC day, YYYY-MM-DD (default: 30 days ago)")
    p.add_argument("--to", dest="end", default=None, help="last UTC day, YYYY-MM-DD (default: today)")
    p.add_argument("--top", type=int, default=None, help="the N clients that used the most tokens on the last day")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("routes", help="which model goes to which backend replicas")
    p.add_argument("file", nargs="?", default=default_config)
    p.set_defaults(func=cmd_routes)

    p = sub.add_parser("status", help="a running gateway's /admin/status as a table")
    p.add_argument("--url", default="http://" + env.bind, help="default http:// and GATEWAY_BIND")
    p.add_argument("--key", default=None, help="an admin key (default: LLAMAGATE_API_KEY, then .llamagate-api-key)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("models", help="the fleet's launched models; load or unload one")
    p.add_argument("action", nargs="?", choices=["load", "unload"], default=None)
    p.add_argument("id", nargs="?", help="a model id or alias, or a launched backend's name")
    p.add_argument("--url", default="http://" + env.bind, help="default http:// and GATEWAY_BIND")
    p.add_argument("--key", default=None, help="an admin key (default: LLAMAGATE_API_KEY, then .llamagate-api-key)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("plugins", help="list the plugins that can be used")
    p.add_argument("--config", default=None, help="also the drop-ins of this file's plugin_dirs")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("settings", help="every setting from the environment: value, default, description")
    p.set_defaults(func=cmd_settings)

    args = parser.parse_args(argv)
    if problems and args.func is not cmd_settings:
        for line in problems:
            print(f"llamagate: {line}", file=sys.stderr)
        return 1
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
