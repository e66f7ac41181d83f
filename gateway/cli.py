"""``llamagate``: the operator's command line.

    llamagate check [FILE]            check a pipelines file, print the chains
    llamagate serve [--config FILE] [--bind HOST:PORT]
                                      run the gateway under gunicorn (gevent)
    llamagate backend --model PATH [--port N] [--embeddings] [--parallel N] [--ctx N]
                                      run one llama-server
    llamagate up --model PATH         a chat backend, an embeddings backend and the
                                      gateway, until Ctrl-C
    llamagate plugins                 list the plugins that can be used, their hooks and fields
    llamagate routes [FILE]           which model goes to which backend replicas
    llamagate status [--url URL]      a running gateway's /admin/status as a table
    llamagate keys add|list|revoke    the API keys file
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
from pathlib import Path

from . import backend, keys, settings
from .config import Config, ConfigError, load_config
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


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        build_pipelines(config)
    except ConfigError as exc:
        print(redact_url(str(exc)), file=sys.stderr)
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


def cmd_status(args: argparse.Namespace) -> int:
    import requests

    key = args.key or settings.current().api_key or (
        OPERATOR_KEY_FILE.read_text().strip() if OPERATOR_KEY_FILE.exists() else "")
    try:
        resp = requests.get(args.url.rstrip("/") + "/admin/status", headers={"Authorization": f"Bearer {key}"},
                            timeout=5)
    except requests.RequestException as exc:
        print(f"llamagate status: {args.url} did not answer: {type(exc).__name__}", file=sys.stderr)
        return 1
    if resp.status_code != 200:
        print(f"llamagate status: HTTP {resp.status_code}: {resp.text[:300]}", file=sys.stderr)
        return 1
    print(status_table(resp.json()))
    return 0


def gunicorn_command(config: str, bind: str | None) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, GATEWAY_CONFIG=str(Path(config).resolve()))
    if bind:
        env["GATEWAY_BIND"] = bind
    return [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF)], env


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        build_pipelines(load_config(args.config))
    except ConfigError as exc:
        print(redact_url(str(exc)), file=sys.stderr)
        return 1
    command, env = gunicorn_command(args.config, args.bind)
    os.execve(command[0], command, env)
    return 0  # not reached


def cmd_backend(args: argparse.Namespace) -> int:
    backend.run(backend.BackendOptions(model=args.model, host=args.host, port=args.port,
                                       embeddings=args.embeddings, parallel=args.parallel,
                                       ctx=args.ctx, binary=args.binary, threads=args.threads,
                                       api_key=args.api_key or settings.current().llama_api_key or None))
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
    """Start two backends and the gateway; stop them all on Ctrl-C or when one dies."""
    api_key, key_source = operator_key_source()
    chat_url = f"http://127.0.0.1:{args.chat_port}"
    embeddings_url = f"http://127.0.0.1:{args.embeddings_port}"
    env = dict(os.environ, CHAT_BACKEND_URL=chat_url, EMBEDDINGS_BACKEND_URL=embeddings_url, LLAMAGATE_API_KEY=api_key)
    # Split the cores between the two backends: llama.cpp's threads spin while they
    # wait, so two backends that each take every core stall each other.
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    me = [sys.executable, "-m", "gateway.cli", "backend", "--model", args.model, "--threads", threads]
    children = [
        subprocess.Popen(me + ["--port", str(args.chat_port), "--parallel", str(args.parallel)], env=env),
        subprocess.Popen(me + ["--port", str(args.embeddings_port), "--embeddings"], env=env),
    ]

    def stop(*_: object) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        if not wait_until_ready([chat_url, embeddings_url], timeout=120):
            print("llamagate up: the backends did not become ready", file=sys.stderr)
            stop()
        os.environ.update(CHAT_BACKEND_URL=chat_url, EMBEDDINGS_BACKEND_URL=embeddings_url, LLAMAGATE_API_KEY=api_key)
        try:
            build_pipelines(load_config(args.config))
        except ConfigError as exc:
            print(redact_url(str(exc)), file=sys.stderr)
            stop()
        command, genv = gunicorn_command(args.config, args.bind)
        children.append(subprocess.Popen(command, env=genv))
        bind = args.bind or settings.current().bind
        if not wait_until_ready([f"http://{bind}"], timeout=60):
            print("llamagate up: the gateway did not become ready", file=sys.stderr)
            stop()
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Say hello"}]})
        authorization, key_note = banner_authorization(api_key, key_source)
        print("\nLlamagate is up. Try:\n", flush=True)
        print(f"  curl -s http://{bind}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
              f"    -H {authorization} -d '{body}'\n  {key_note}\n", flush=True)
        print("Ctrl-C stops the gateway and both backends.", flush=True)
        while all(child.poll() is None for child in children):
            signal.sigtimedwait([signal.SIGCHLD], 1.0)
        print("llamagate up: a process exited; stopping the rest", file=sys.stderr)
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


def cmd_keys(args: argparse.Namespace) -> int:
    try:
        if args.action == "add":
            models = [m for m in (args.models or "").split(",") if m]
            limits = {name: value for name, value in (("requests_per_minute", args.rpm),
                                                      ("tokens_per_minute", args.tpm)) if value is not None}
            key = keys.add_key(args.file, args.client, args.role, models, limits)
            print(f"New key for {args.client} ({args.role}); it is shown only this once:\n{key}")
        elif args.action == "list":
            keys.load_keys_file(args.file)  # refuses a malformed file, naming the entry
            for entry in keys.read_entries(args.file):
                models = ",".join(entry.get("models") or []) or "*"
                print(f"{entry['client']:<20} {entry.get('role', 'user'):<6} models={models:<20} "
                      f"limits={json.dumps(entry.get('limits') or {})} sha256={entry['sha256'][:12]}")
        else:
            removed = keys.revoke(args.file, args.who)
            print(f"revoked {removed} key(s)")
            return 0 if removed else 1
    except (OSError, ValueError) as exc:
        print(f"llamagate keys: {exc}", file=sys.stderr)
        return 1
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
    p.set_defaults(func=cmd_backend)

    p = sub.add_parser("up", help="a chat backend, an embeddings backend and the gateway, until Ctrl-C")
    p.add_argument("--model", required=True)
    p.add_argument("--config", default=default_config)
    p.add_argument("--bind", default=None)
    p.add_argument("--chat-port", type=int, default=env.chat_port, help="default LLAMAGATE_CHAT_PORT or 8081")
    p.add_argument("--embeddings-port", type=int, default=env.embeddings_port,
                   help="default LLAMAGATE_EMBEDDINGS_PORT or 8082")
    p.add_argument("--parallel", type=int, default=4)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("keys", help="manage the API keys file (hashes only)")
    keys_sub = p.add_subparsers(dest="action", required=True)
    default_keys = env.keys_file
    k = keys_sub.add_parser("add", help="make a key, print it once, store its hash")
    k.add_argument("--client", required=True)
    k.add_argument("--role", choices=["user", "admin"], default="user")
    k.add_argument("--models", help="comma-separated model ids the key may use (default: all)")
    k.add_argument("--rpm", type=int, help="requests per minute for this key")
    k.add_argument("--tpm", type=int, help="tokens per minute for this key")
    k = keys_sub.add_parser("list", help="list clients, roles and hash prefixes")
    k = keys_sub.add_parser("revoke", help="remove the keys of a client or a hash prefix")
    k.add_argument("who", help="client name or sha256 prefix")
    for k in keys_sub.choices.values():
        k.add_argument("--file", default=default_keys, help="keys file (default LLAMAGATE_KEYS_FILE or keys.yaml)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("routes", help="which model goes to which backend replicas")
    p.add_argument("file", nargs="?", default=default_config)
    p.set_defaults(func=cmd_routes)

    p = sub.add_parser("status", help="a running gateway's /admin/status as a table")
    p.add_argument("--url", default="http://" + env.bind, help="default http:// and GATEWAY_BIND")
    p.add_argument("--key", default=None, help="an admin key (default: LLAMAGATE_API_KEY, then .llamagate-api-key)")
    p.set_defaults(func=cmd_status)

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
