"""Load and check ``pipelines.yaml``.

The file is read, ``${VAR}`` / ``${VAR:-default}`` are expanded from the
environment, and the result is checked against ``schemas/pipelines.schema.json``
and for references that don't resolve. Every problem is reported at once, each
naming the file, the path inside it and the reason. Plugin configs are checked
when the pipelines are built (:func:`gateway.pipeline.build_pipelines`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import jsonschema
import yaml

from .errors import LlamagateError
from .schemas import SCHEMA_DIR, apply_defaults, compile_schema, format_path, schema_errors

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")
# llama-server's other endpoints that a client names a model for: routed by that model to
# its backend through the pipeline, the answer relayed in its own shape (Anthropic's
# messages, OpenAI's Responses, llama-server's native API). Each maps to the body field
# that bounds its generation, or None when it generates nothing.
LLAMA_SERVER_ROUTES: dict[str, str | None] = {
    "/v1/responses": "max_output_tokens",
    "/v1/messages": "max_tokens",
    "/v1/messages/count_tokens": None,
    "/v1/rerank": None,
    "/v1/reranking": None,
    "/rerank": None,
    "/reranking": None,
    "/completion": "n_predict",
    "/infill": "n_predict",
    "/embedding": None,
    "/tokenize": None,
    "/detokenize": None,
    "/apply-template": None,
}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(LlamagateError):
    """A configuration that cannot be used.

    Args:
        file: The config file's path.
        problems: ``(path inside the file, reason)`` pairs.
    """

    def __init__(self, file: str, problems: Iterable[tuple[str, str]]) -> None:
        self.file = file
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(
            f"{self.file}: {path}: {reason}" if path else f"{self.file}: {reason}"
            for path, reason in self.problems
        )


def _expand(value: Any, path: list[Any], environ: Mapping[str, str], problems: list[tuple[str, str]]) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, path + [k], environ, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, path + [i], environ, problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append((format_path(path), f"environment variable {name} is not set and has no default"))
        return ""

    unresolved = len(problems)
    expanded = _ENV_REF.sub(substitute, value)
    if _ENV_REF.fullmatch(value) and len(problems) == unresolved:
        # A value that is only a reference takes the type its text has in YAML,
        # so `port: ${STATSD_PORT:-8125}` stays an integer.
        try:
            typed = yaml.safe_load(expanded)
        except yaml.YAMLError:
            return expanded
        if isinstance(typed, (int, float, bool)) or typed is None:
            return typed
    return expanded


_SIZE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_size(value: int | str | None) -> int | None:
    """Bytes from an integer or a text like ``600MiB`` / ``2GB`` (the schema checked its form)."""
    if value is None or isinstance(value, int):
        return value
    match = _SIZE.match(value.strip())
    assert match is not None, value
    return int(float(match.group(1)) * _UNITS[match.group(2) or "B"])


@dataclass(frozen=True)
class LaunchConfig:
    """How the fleet supervisor launches a backend's llama-servers (docs/fleet.md)."""

    model: str  # an absolute path
    ports: tuple[int, ...]  # one per replica
    ctx: int = 4096
    parallel: int = 2
    threads: int | None = None
    embeddings: bool = False
    cache_ram: int = 0  # MiB of llama-server's cross-slot prompt cache; 0 only unless kv_sharing is global
    extra_args: tuple[str, ...] = ()
    start: str = "on_demand"
    idle_ttl: float | None = None
    memory: int | None = None  # per replica; None: estimated (gateway.fleet.spec)
    load_timeout: float = 120


@dataclass(frozen=True)
class FleetConfig:
    """The fleet's limits: at most ``max_resident`` launched backends and ``memory_budget``
    bytes resident at once."""

    memory_budget: int | None = None
    max_resident: int | None = None
    first_port: int = 8100
    last_port: int = 8199
    group_wait: float = 5
    max_restarts: int = 3
    log_dir: str | None = None
    log_bytes: int = 1048576


@dataclass(frozen=True)
class BackendConfig:
    name: str
    urls: tuple[str, ...]
    connect_timeout: float = 5
    max_connections: int = 100
    max_in_flight: int | None = None
    max_queue: int = 256
    queue_timeout: float = 300  # as long as first_byte: a burst of several times the slots drains
    breaker_failures: int = 5
    breaker_cooldown: float = 10
    api_key: str | None = field(default=None, repr=False)
    launch: LaunchConfig | None = None  # the fleet launches its replicas (their urls follow from the ports)
    admission: str = "local"  # or "redis": slots and queue shared through SharedConfig's Redis
    kv_sharing: str = "none"  # whose cached prompts a client may reuse: none (its own), groups, global
    kv_groups: tuple[tuple[str, str], ...] = ()  # (client id, group) with kv_sharing "groups"
    kv_states: bool = False  # its conversations are saved and restored (docs/kv-states.md); launched: by default


@dataclass(frozen=True)
class SharedConfig:
    """The Redis every worker and host shares (``shared:``)."""

    redis_url: str = field(repr=False)  # may hold a password
    prefix: str = "llamagate:shared:"
    admission: str = "local"
    lease: float = 10
    status_interval: float = 1


@dataclass(frozen=True)
class Timeouts:
    """How long a request may take, in seconds."""

    first_byte: float = 300
    idle: float = 60
    total: float = 900
    retry_deadline: float = 10


@dataclass(frozen=True)
class ModelConfig:
    id: str
    backend: str
    aliases: tuple[str, ...]
    upstream_model: str | None
    owned_by: str


@dataclass(frozen=True)
class PluginEntry:
    """One plugin in a pipeline, with where it stands in the file."""

    name: str
    config: dict[str, Any]
    path: str


@dataclass(frozen=True)
class PrefixRoute:
    """Requests under a path prefix, relayed to another HTTP backend."""

    pipeline: str
    backend: str


@dataclass(frozen=True)
class Config:
    """A checked ``pipelines.yaml``."""

    file: str
    max_body_bytes: int
    body_timeout: float
    body_min_rate: int
    max_json_depth: int
    admin_pipeline: str | None
    health_detail: bool
    plugin_dirs: tuple[str, ...]
    health_interval: float
    backends: dict[str, BackendConfig]
    models: dict[str, ModelConfig]
    pipelines: dict[str, list[PluginEntry]]
    routes: dict[str, str]
    prefix_routes: dict[str, PrefixRoute] = field(default_factory=dict)
    plugin_routes: dict[str, str] = field(default_factory=dict)
    model_ids: dict[str, str] = field(default_factory=dict)
    timeouts: Timeouts = Timeouts()
    route_timeouts: dict[str, Timeouts] = field(default_factory=dict)
    fleet: FleetConfig = FleetConfig()

    @property
    def launched(self) -> dict[str, BackendConfig]:
        """The backends the fleet supervisor launches, in file order."""
        return {name: b for name, b in self.backends.items() if b.launch is not None}
    shared: SharedConfig | None = None

    def timeouts_for(self, route: str) -> Timeouts:
        return self.route_timeouts.get(route, self.timeouts)

    def resolve_model(self, name: str) -> str | None:
        """The public id for a model id or alias, or None."""
        return self.model_ids.get(name)


_SCHEMA_VALIDATOR: jsonschema.protocols.Validator | None = None


def _kv_sharing(backend: str, spec: str | dict[str, list[str]],
                problems: list[tuple[str, str]]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``kv_sharing`` as (``none``/``global``/``groups``, (client, group) pairs); a client
    in two groups is a problem (which group's prompts would it see?)."""
    if isinstance(spec, str):
        return spec, ()
    group_of: dict[str, str] = {}
    for group, clients in spec.items():
        for client in clients:
            if client in group_of:
                problems.append((f"backends.{backend}.kv_sharing.{group}",
                                 f"client {client!r} is already in group {group_of[client]!r}"))
            group_of.setdefault(client, group)
    return "groups", tuple(group_of.items())


def _validator() -> jsonschema.protocols.Validator:
    global _SCHEMA_VALIDATOR
    if _SCHEMA_VALIDATOR is None:
        schema = json.loads((SCHEMA_DIR / "pipelines.schema.json").read_text())
        _SCHEMA_VALIDATOR = compile_schema(schema)
    return _SCHEMA_VALIDATOR


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and check a config file.

    Args:
        path: The YAML file.
        environ: Variables for ``${VAR}``; default ``os.environ``.

    Raises:
        ConfigError: naming every problem found.
    """
    file = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(file, [("", f"cannot read the file: {exc.strerror}")]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(file, [("", f"not valid YAML: {exc}")]) from None
    return parse_config(raw, file=file, environ=environ)


def parse_config(raw: Any, *, file: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    """Check an already-parsed config document; see :func:`load_config`."""
    problems: list[tuple[str, str]] = []
    data = _expand(raw, [], os.environ if environ is None else environ, problems)
    if problems:  # schema errors caused by a missing variable would only add noise
        raise ConfigError(file, problems)
    problems += schema_errors(_validator(), data)
    if problems:
        raise ConfigError(file, problems)

    schema = _validator().schema
    data = apply_defaults(schema, data)
    shared = SharedConfig(**apply_defaults(schema["properties"]["shared"], data["shared"])) \
        if data["shared"] is not None else None
    base = Path(file).resolve().parent
    fleet_spec = apply_defaults(schema["properties"]["fleet"], data["fleet"])
    ports = apply_defaults(schema["properties"]["fleet"]["properties"]["ports"], fleet_spec.pop("ports"))
    fleet = FleetConfig(**{**fleet_spec, "memory_budget": parse_size(fleet_spec["memory_budget"]),
                           "first_port": ports["first"], "last_port": ports["last"],
                           "log_dir": fleet_spec["log_dir"] and str(base / fleet_spec["log_dir"])})
    next_port = fleet.first_port
    backends = {}
    for name, spec in data["backends"].items():
        spec = apply_defaults(schema["$defs"]["backend"], spec)
        launch = None
        if "launch" in spec:
            # Launched replicas get the next ports of the fleet's range, in file order:
            # every worker and the supervisor derive the same URLs from the same file.
            launch_spec = apply_defaults(schema["$defs"]["launch"], spec.pop("launch"))
            count = launch_spec.pop("replicas")
            replica_ports = tuple(range(next_port, next_port + count))
            next_port += count
            if replica_ports[-1] > fleet.last_port:
                problems.append((f"backends.{name}.launch.replicas", f"the fleet's ports {fleet.first_port}-"
                                 f"{fleet.last_port} run out (more launched replicas than ports)"))
            launch = LaunchConfig(**{**launch_spec, "model": str(base / launch_spec["model"]),
                                     "extra_args": tuple(launch_spec["extra_args"]),
                                     "memory": parse_size(launch_spec["memory"]), "ports": replica_ports})
            spec["urls"] = [f"http://127.0.0.1:{port}" for port in replica_ports]
        sharing, groups = _kv_sharing(name, spec.pop("kv_sharing"), problems)
        if launch is not None and launch.cache_ram and sharing != "global":
            problems.append((f"backends.{name}.launch.cache_ram", "llama-server's prompt cache in host memory "
                             "restores one client's cached prompt for another: it needs kv_sharing: global"))
        kv_states = spec.pop("kv_states")
        backends[name] = BackendConfig(name=name, kv_sharing=sharing, kv_groups=groups,
                                       kv_states=launch is not None if kv_states is None else kv_states,
                                       **{**spec, "launch": launch,
                                                     "urls": tuple(u.rstrip("/") for u in spec["urls"]),
                                                     "admission": spec.get("admission") or
                                                     (shared.admission if shared else "local")})
    for name, backend in backends.items():
        if backend.admission == "redis" and shared is None:
            problems.append((f"backends.{name}.admission", "redis admission needs shared.redis_url"))
    models: dict[str, ModelConfig] = {}
    model_ids: dict[str, str] = {}
    for model_id, spec in data["models"].items():
        spec = apply_defaults(schema["$defs"]["model"], spec)
        if spec["backend"] not in backends:
            problems.append((f"models.{model_id}.backend", f"no backend named {spec['backend']!r} (known: {', '.join(backends)})"))
        models[model_id] = ModelConfig(id=model_id, backend=spec["backend"], aliases=tuple(spec["aliases"]),
                                       upstream_model=spec["upstream_model"], owned_by=spec["owned_by"])
        for i, name in enumerate([model_id, *spec["aliases"]]):
            if name in model_ids and model_ids[name] != model_id:
                problems.append((f"models.{model_id}.aliases[{i - 1}]", f"{name!r} already names model {model_ids[name]!r}"))
            model_ids.setdefault(name, model_id)

    pipelines: dict[str, list[PluginEntry]] = {}
    for pipeline_name, entries in data["pipelines"].items():
        pipelines[pipeline_name] = []
        for i, entry in enumerate(entries):
            name, config = (entry, None) if isinstance(entry, str) else next(iter(entry.items()))
            pipelines[pipeline_name].append(PluginEntry(name=name, config=config or {}, path=f"pipelines.{pipeline_name}[{i}].{name}"))

    routes: dict[str, str] = {}
    prefix_routes: dict[str, PrefixRoute] = {}
    plugin_routes: dict[str, str] = {}
    for route, target in data["routes"].items():
        openai_route = route in OPENAI_ROUTES or route in LLAMA_SERVER_ROUTES
        prefix = route.endswith("/*")
        if openai_route == isinstance(target, dict) or (prefix and "backend" not in target) or \
                (not prefix and not openai_route and "backend" in target):
            problems.append((f"routes.{route}", "an OpenAI or llama-server model route takes a pipeline name, a "
                                                "prefix route (ending in /*) {pipeline, backend}, any other path "
                                                "{pipeline}"))
            continue
        pipeline_name = target if openai_route else target["pipeline"]
        if pipeline_name not in pipelines:
            problems.append((f"routes.{route}", f"no pipeline named {pipeline_name!r} (known: {', '.join(pipelines)})"))
        if openai_route:
            routes[route] = pipeline_name
        elif prefix:
            if target["backend"] not in backends:
                problems.append((f"routes.{route}.backend", f"no backend named {target['backend']!r}"))
            prefix_routes[route[:-2]] = PrefixRoute(pipeline=pipeline_name, backend=target["backend"])
        else:
            plugin_routes[route] = pipeline_name
    if data["admin_pipeline"] is not None and data["admin_pipeline"] not in pipelines:
        problems.append(("admin_pipeline", f"no pipeline named {data['admin_pipeline']!r}"))
    for route in data["timeouts"].get("routes", {}):
        if route not in routes and route not in plugin_routes and route[:-2] not in prefix_routes:
            problems.append((f"timeouts.routes.{route}", "not a route under routes"))
    if problems:
        raise ConfigError(file, problems)

    timeouts_spec = apply_defaults(schema["properties"]["timeouts"], data["timeouts"])
    per_route = timeouts_spec.pop("routes")
    timeouts = Timeouts(**timeouts_spec)
    return Config(
        fleet=fleet,
        timeouts=timeouts,
        route_timeouts={route: replace(timeouts, **spec) for route, spec in per_route.items()},
        file=file,
        max_body_bytes=data["max_body_bytes"],
        body_timeout=data["body_timeout"],
        body_min_rate=data["body_min_rate"],
        max_json_depth=data["max_json_depth"],
        admin_pipeline=data["admin_pipeline"],
        health_detail=data["health_detail"],
        plugin_dirs=tuple(str((base / d).resolve()) for d in data["plugin_dirs"]),
        health_interval=data["health_interval"],
        backends=backends,
        models=models,
        pipelines=pipelines,
        routes=routes,
        prefix_routes=prefix_routes,
        plugin_routes=plugin_routes,
        model_ids=model_ids,
        shared=shared,
    )
