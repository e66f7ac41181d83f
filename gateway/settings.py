"""The gateway's settings: every environment variable it reads, declared once.

Each field of :class:`Settings` is one setting, declared with :func:`setting`: its
environment variable, its default, how its text is parsed and checked, and a one-line
description. :meth:`Settings.from_environ` reads them all at once and refuses bad
values with one :class:`SettingsError` naming every problem, a line each::

    GATEWAY_WORKERS: 'x' is not an integer
    LLAMAGATE_LOG_LEVEL: 'loud' is not one of debug, info, warning, error, critical (any case)

An unset or empty variable takes the default. Modules read the settings through
:func:`current`, built on first use and kept for the life of the process (gunicorn's
workers inherit the master's); tests call :func:`reset` after changing the environment.

``gateway.settings`` is a documented public module for plugins: ``current().workers``
is the number of gunicorn worker processes, for instance.

``python -m gateway.settings`` (or ``llamagate settings``) prints every setting with its
value, its default and its description; ``python -m gateway.settings --markdown``
prints ``docs/configuration-environment.md``.

The variables a pipelines file names as ``${VAR}`` (``gateway/config.py``) and the key
variables an auth plugin's ``env_keys`` lists are not settings: the file names them.

It imports only the standard library (and ``gateway.redact``): gunicorn's master imports it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import LlamagateError
from .redact import key_hint

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SHOWN_CHARS = 80  # a bad value is quoted up to this many characters


class SettingsError(LlamagateError, ValueError):
    """Settings that could not be read; ``problems`` has one line per bad value."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- parsers: text -> value, or ValueError("<what is wrong with it>") ------------------------------

def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("is not an integer") from None
        _check_range(value, minimum, maximum)
        return value

    parse.kind = "integer" + _range_text(minimum, maximum)
    return parse


def number(minimum: float | None = None, above: float | None = None) -> Callable[[str], float]:
    """A finite number; ``minimum`` inclusive, ``above`` exclusive."""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError("is not a number") from None
        if not math.isfinite(value):
            raise ValueError("is not a finite number")
        if above is not None and value <= above:
            raise ValueError(f"must be more than {above:g}")
        _check_range(value, minimum, None)
        return value

    parse.kind = "number" + (f" > {above:g}" if above is not None else _range_text(minimum, None))
    return parse


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size(text: str) -> int:
    """Bytes: an integer, or a number with a unit (``600MiB``, ``2GB``, ``0``)."""
    value = text.strip()
    number_part = value.rstrip("bBkKmMgGtTiI ")
    unit = value[len(number_part):].strip().lower()
    try:
        amount = float(number_part)
    except ValueError:
        raise ValueError("is not a size (bytes, or a number with B, KB, MB, GB, KiB, MiB, GiB)") from None
    if unit not in _SIZE_UNITS or not math.isfinite(amount) or amount < 0:
        raise ValueError("is not a size (bytes, or a number with B, KB, MB, GB, KiB, MiB, GiB)")
    return int(amount * _SIZE_UNITS[unit])


size.kind = "size (bytes, or 600MiB, 2GB)"


def fraction(text: str) -> float:
    """A number more than 0 and at most 1."""
    value = number(above=0)(text)
    if value > 1:
        raise ValueError("must be at most 1")
    return value


fraction.kind = "number > 0, <= 1"


def choice(options: tuple[str, ...]) -> Callable[[str], str]:
    """One of ``options``, in any case; the value is the option (lower case)."""

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"is not one of {', '.join(options)} (any case)")
        return value

    parse.kind = f"{', '.join(options)} (any case)"
    return parse


def text(kind: str = "text") -> Callable[[str], str]:
    def parse(value: str) -> str:
        return value

    parse.kind = kind
    return parse


def bind_address(value: str) -> str:
    """What gunicorn binds: ``HOST:PORT`` (``[v6]:PORT`` for IPv6), ``unix:PATH`` or ``fd://N``."""
    value = value.strip()
    if value.startswith("unix:") and len(value) > len("unix:"):
        return value
    if value.startswith("fd://") and value[len("fd://"):].isascii() and value[len("fd://"):].isdigit():
        return value
    host, sep, port = value.rpartition(":")
    if sep and host and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535 and not any(c.isspace() for c in value) \
            and (":" not in host or (host.startswith("[") and host.endswith("]"))):
        return value
    raise ValueError("is not HOST:PORT (port 1-65535), unix:PATH or fd://N")


bind_address.kind = "HOST:PORT, unix:PATH or fd://N"


def _check_range(value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"must be at least {minimum:g}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be at most {maximum:g}")


def _range_text(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" {minimum:g}-{maximum:g}"
    if minimum is not None:
        return f" >= {minimum:g}"
    return f" <= {maximum:g}" if maximum is not None else ""


# --- declarations --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One setting's declaration (the metadata of a :class:`Settings` field)."""

    env: str  # the environment variable
    default: Any  # the parsed default
    parse: Callable[[str], Any]  # text -> value, ValueError("is not ...") when bad
    description: str  # one line
    read_by: str  # which processes read it: gunicorn (its master), workers, `llamagate <command>`
    secret: bool = False  # shown only as a hint, never whole
    name: str = ""  # the Settings field, filled in below

    @property
    def kind(self) -> str:
        return getattr(self.parse, "kind", "text")

    def show(self, value: Any) -> str:
        """A value as ``llamagate settings`` and the docs show it."""
        if self.secret:
            return key_hint(value) if value else "(not set)"
        if value == "":
            return "(not set)"
        return f"{value:g}" if isinstance(value, float) else str(value)


def setting(env: str, default: Any, parse: Callable[[str], Any], description: str, *, read_by: str,
            secret: bool = False) -> Any:
    """A :class:`Settings` field, declared: see :class:`Setting`."""
    return dataclasses.field(default=default, repr=not secret, metadata={
        "setting": Setting(env, default, parse, description, read_by, secret)})


@dataclass(frozen=True)
class Settings:
    """Every setting, read from the environment once (:func:`current`)."""

    bind: str = setting(
        "GATEWAY_BIND", "127.0.0.1:8000", bind_address,
        "address the gateway listens on", read_by="gunicorn, `llamagate status`, `models`, `up`")
    workers: int = setting(
        "GATEWAY_WORKERS", 1, integer(1),
        "gunicorn worker processes; each admits its share of a backend's slots",
        read_by="gunicorn, workers, `llamagate check`")
    worker_connections: int = setting(
        "GATEWAY_WORKER_CONNECTIONS", 1000, integer(1),
        "concurrent client connections per worker", read_by="gunicorn")
    timeout: int = setting(
        "GATEWAY_TIMEOUT", 30, integer(0),
        "worker heartbeat timeout, s (gevent workers: a long stream does not trip it; 0: none)", read_by="gunicorn")
    graceful_timeout: int = setting(
        "GATEWAY_GRACEFUL_TIMEOUT", 30, integer(0),
        "how long requests in flight survive a stop or a reload, s", read_by="gunicorn")
    keepalive: int = setting(
        "GATEWAY_KEEPALIVE", 5, integer(0),
        "idle keep-alive, s; also how long a client may take to send its headers", read_by="gunicorn")
    log_level: str = setting(
        "LLAMAGATE_LOG_LEVEL", "info", choice(LOG_LEVELS),
        "log level of gunicorn and the gateway", read_by="gunicorn, workers")
    config: str = setting(
        "GATEWAY_CONFIG", "pipelines.yaml", text("path"),
        "the pipelines file", read_by="gunicorn, workers, `llamagate` (its default FILE)")
    client_timeout: float = setting(
        "GATEWAY_CLIENT_TIMEOUT", 30.0, number(above=0),
        "read/write timeout of a client socket, s: a trickled body gets 408, a stalled reader is dropped",
        read_by="workers")
    reload_interval: float = setting(
        "GATEWAY_RELOAD_INTERVAL", 1.0, number(0),
        "seconds between looks at the pipelines file and its watched files for changes (0: never)",
        read_by="workers")
    keys_file: str = setting(
        "LLAMAGATE_KEYS_FILE", "keys.yaml", text("path"),
        "the API keys file `llamagate keys` manages (the shipped pipelines.yaml names it too)",
        read_by="`llamagate keys`")
    fleet_socket: str = setting(
        "LLAMAGATE_FLEET_SOCKET", "", text("path"),
        "the fleet supervisor's Unix socket (gunicorn's master sets it for its workers; not set: no fleet)",
        read_by="workers, `llamagate models`")
    llama_server_bin: str = setting(
        "LLAMA_SERVER_BIN", "", text("path"),
        "llama-server executable (not set: llama-server on PATH, else xllamacpp)", read_by="`llamagate backend`")
    api_key: str = setting(
        "LLAMAGATE_API_KEY", "", text("secret"),
        "the operator's admin key (not set: the one kept in .llamagate-api-key; the shipped pipelines.yaml "
        "lists it in auth's env_keys)", read_by="`llamagate up`, `status`", secret=True)
    llama_api_key: str = setting(
        "LLAMA_API_KEY", "", text("secret"),
        "the key the backend's llama-server requires (not set: none)", read_by="`llamagate backend`", secret=True)
    database_url: str = setting(
        "LLAMAGATE_DATABASE_URL", "", text("secret"),
        "the PostgreSQL URL `llamagate keys --db` (without a URL) and `llamagate usage` use, so that its password "
        "stays out of the process list (not set: give --db URL)", read_by="`llamagate keys`, `usage`", secret=True)

    slots_dir: str = setting(
        "LLAMAGATE_SLOTS_DIR", "", text("path"),
        "private folder (0700) of the host's llama-server slot table, which keeps tenants' cached prompts apart "
        "and is shared by every worker and gateway of the host (not set: llamagate-slots-<uid> in the "
        "temporary folder)", read_by="workers")
    kv_states_budget: int = setting(
        "LLAMAGATE_KV_STATES_BUDGET", 4 * 2**30, size,
        "disk the host's saved KV states may take (the `states` folder beside the slot table), least recently "
        "used removed first; 0: conversations that lose their slot or their model are not saved",
        read_by="workers, the fleet supervisor")
    kv_states_tenant_share: float = setting(
        "LLAMAGATE_KV_STATES_TENANT_SHARE", 0.25, fraction,
        "the part of the saved states' budget one tenant (kv_sharing scope) may take: its own least recently used "
        "states go first", read_by="workers, the fleet supervisor")
    metrics_dir: str = setting(
        "PROMETHEUS_MULTIPROC_DIR", "", text("path"),
        "where the workers keep the prometheus plugin's numbers, summed at each scrape (not set: gunicorn.conf.py "
        "makes one per run of the gateway; outside gunicorn, each process counts alone)",
        read_by="gunicorn, the prometheus plugin")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Every setting from ``environ`` (default ``os.environ``).

        Raises:
            SettingsError: one line per bad value, in declaration order.
        """
        values, problems = _read(os.environ if environ is None else environ)
        if problems:
            raise SettingsError(problems)
        return cls(**values)

    @property
    def logging_level(self) -> str:
        """``log_level`` as Python's logging names it (upper case)."""
        return self.log_level.upper()


def _declare() -> tuple[Setting, ...]:
    declared = []
    for f in dataclasses.fields(Settings):
        spec = dataclasses.replace(f.metadata["setting"], name=f.name)
        declared.append(spec)
    return tuple(declared)


SETTINGS: tuple[Setting, ...] = _declare()
"""Every setting's declaration, in order."""


def _read(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    values: dict[str, Any] = {}
    problems: list[str] = []
    for spec in SETTINGS:
        raw = environ.get(spec.env)
        if raw is None or not raw.strip():
            values[spec.name] = spec.default
            continue
        try:
            values[spec.name] = spec.parse(raw)
        except ValueError as exc:
            problems.append(f"{spec.env}: {_quote(raw)} {exc}")
    return values, problems


def _quote(raw: str) -> str:
    if len(raw) > SHOWN_CHARS:
        return repr(raw[:SHOWN_CHARS]) + f"…[{len(raw)} chars]"
    return repr(raw)


# --- the process's settings ----------------------------------------------------------------------

_current: Settings | None = None


def current() -> Settings:
    """The process's settings, read from ``os.environ`` on first use and kept.

    Raises:
        SettingsError: the environment has bad values (gunicorn's config and the
            ``llamagate`` commands refuse them before anything else runs).
    """
    global _current
    if _current is None:
        _current = Settings.from_environ()
    return _current


def reset() -> None:
    """Forget the settings read so far: the next :func:`current` reads the environment again."""
    global _current
    _current = None


# --- what `llamagate settings` prints and the docs show -------------------------------------------

def table(environ: Mapping[str, str] | None = None) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Rows ``(variable, value, default, description)`` for the settings in ``environ``,
    a bad value shown as given, and the problems (one line each)."""
    environ = os.environ if environ is None else environ
    values, problems = _read(environ)
    rows = []
    for spec in SETTINGS:
        if spec.name in values:
            shown = spec.show(values[spec.name])
        else:
            shown = f"{_quote(environ[spec.env])} (bad)"
        rows.append((spec.env, shown, spec.show(spec.default), spec.description))
    return rows, problems


def render(environ: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """The text ``llamagate settings`` prints, and the problems."""
    rows, problems = table(environ)
    head = ("variable", "value", "default", "description")
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3]
             for row in [head, *rows]]
    return "\n".join(lines), problems


def print_settings(environ: Mapping[str, str] | None = None) -> int:
    """Print every setting; a bad value's problem on stderr, and 1 then."""
    text_, problems = render(environ)
    print(text_)
    for line in problems:
        print(f"llamagate: {line}", file=sys.stderr)
    return 1 if problems else 0


DOC_INTRO = """\
# Configuration: the environment

<!-- Generated from gateway/settings.py by `python -m gateway.settings --markdown`;
     tests/test_settings.py fails when this file and the declarations disagree. -->

Llamagate reads these environment variables, once per process, through
`gateway.settings` (`gateway/settings.py` declares each one: its default, the values it
takes and what it does). An unset or empty variable takes its default. A bad value stops
gunicorn before any worker starts, and every `llamagate` command but `settings`, with one
line per problem on stderr and exit status 1, e.g.

```
llamagate: GATEWAY_WORKERS: 'x' is not an integer
llamagate: LLAMAGATE_LOG_LEVEL: 'loud' is not one of debug, info, warning, error, critical (any case)
```

`llamagate settings` (or `python -m gateway.settings`) prints each setting's value in the
current environment, its default and its description. Keys are shown only as a hint.

The variables a pipelines file names as `${VAR}` or `${VAR:-default}` (the shipped
`pipelines.yaml` reads `LLAMAGATE_ACCESS_LOG`, `STATSD_HOST`,
`RATELIMIT_STORE`, `REDIS_URL`, ...) and the key variables listed in the auth plugin's
`env_keys` belong to the file, not to the settings (`llamagate check` reports those);
`LLAMAGATE_API_KEY` is both: the shipped file lists it in `env_keys`.
"""


def markdown() -> str:
    """``docs/configuration-environment.md``: the intro and one table of every setting."""
    lines = [DOC_INTRO, "| variable | default | values | read by | description |", "|---|---|---|---|---|"]
    for spec in SETTINGS:
        default = spec.show(spec.default)
        default = default if default.startswith("(") else f"`{default}`"
        lines.append(f"| `{spec.env}` | {default} | {spec.kind} | {spec.read_by} | {spec.description} |")
    lines += ["", "Read by: *gunicorn*, its master process (`gunicorn.conf.py`; `llamagate serve` and `up` "
              "pass their environment on), which checks every setting before any worker starts; *workers*, "
              "the gateway in each worker process; `llamagate ...`, the commands (each checks every "
              "setting first).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--markdown"]:
        sys.stdout.write(markdown())
        return 0
    if argv:
        print("usage: python -m gateway.settings [--markdown]", file=sys.stderr)
        return 2
    return print_settings()


if __name__ == "__main__":
    sys.exit(main())
