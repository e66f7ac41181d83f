"""The commands that run the gateway: ``check`` (what ``serve`` and ``up`` check first),
``serve``, ``backend`` (one llama-server) and ``up`` (``make serve``) with its operator key."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..fleet import llamaserver
from ..storage import keys
from .. import settings
from ..config import Config, ConfigError, load_config
from ..fleet.spec import fleet_problems
from ..pipeline import build_pipelines
from ..redact import key_hint, redact_url
from ..backends.upstream import wait_until_ready
from .registry import FromSettings, arg, command

ROOT = Path(__file__).resolve().parent.parent.parent
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
# make serve's operator key when LLAMAGATE_API_KEY is not set (git-ignored, mode 0600).
OPERATOR_KEY_FILE = Path(".llamagate-api-key")
# the pipelines file, when a command is given none: GATEWAY_CONFIG (default pipelines.yaml)
CONFIG = FromSettings(lambda env: env.config)


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


@command("check", "check a pipelines file and print the resolved chains", arg("file", nargs="?", default=CONFIG))
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


def gunicorn_command(config: str, bind: str | None) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, GATEWAY_CONFIG=str(Path(config).resolve()))
    if bind:
        env["GATEWAY_BIND"] = bind
    return [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF)], env


@command("serve", "run the gateway under gunicorn with gevent workers",
         arg("--config", default=CONFIG),
         arg("--bind", default=None, help="HOST:PORT (default GATEWAY_BIND or 127.0.0.1:8000)"))
def cmd_serve(args: argparse.Namespace) -> int:
    if checked_config(args.config) is None:
        return 1
    argv, env = gunicorn_command(args.config, args.bind)
    os.execve(argv[0], argv, env)
    return 0  # not reached


@command("backend", "run one llama-server (binary or xllamacpp)",
         arg("--model", required=True, help="path to a GGUF file"),
         arg("--host", default="127.0.0.1"),
         arg("--port", type=int, default=8081),
         arg("--embeddings", action="store_true", help="serve embeddings (mean pooling)"),
         arg("--parallel", type=int, default=2, help="slots (default 2)"),
         arg("--ctx", type=int, default=4096, help="context size shared by the slots"),
         arg("--binary", default=None, help="llama-server executable (default: LLAMA_SERVER_BIN, PATH)"),
         arg("--threads", type=int, default=None, help="CPU threads (default: all cores)"),
         arg("--api-key", default=None, help="a key callers must send (default: LLAMA_API_KEY, else none)"),
         arg("--cache-ram", type=int, default=0,
             help="MiB of prompt cache in host memory, shared by every client across slots (default 0: off)"),
         arg("--slot-save-path", default=None,
             help="folder of the slots' saved KV states (POST /slots/<id>?action=save|restore; default: off)"),
         arg("extra", nargs=argparse.REMAINDER, help="after --: more llama-server arguments (binary only)"))
def cmd_backend(args: argparse.Namespace) -> int:
    llamaserver.run(llamaserver.BackendOptions(model=args.model, host=args.host, port=args.port,
                                       embeddings=args.embeddings, parallel=args.parallel,
                                       ctx=args.ctx, binary=args.binary, threads=args.threads,
                                       api_key=args.api_key or settings.current().llama_api_key or None,
                                       cache_ram=args.cache_ram, slot_save_path=args.slot_save_path,
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


@command("up", "the gateway and the llama-servers it launches, until Ctrl-C (make serve)",
         arg("--config", default=CONFIG), arg("--bind", default=None))
def cmd_up(args: argparse.Namespace) -> int:
    """``make serve``: the gateway, whose fleet launches the config's llama-servers, with
    a curl line to try; until Ctrl-C (which stops the gateway and every llama-server)."""
    api_key, key_source = operator_key_source()
    os.environ["LLAMAGATE_API_KEY"] = api_key
    if checked_config(args.config) is None:
        return 1
    argv, env = gunicorn_command(args.config, args.bind)
    gateway = subprocess.Popen(argv, env=env)

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
        print(f"The operator console: http://{bind}/admin/ (sign in with the operator key).", flush=True)
        print("`llamagate models` shows the llama-servers the gateway runs. Ctrl-C stops it all.", flush=True)
        gateway.wait()
        print("llamagate up: the gateway exited", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    stop()
    return 0

