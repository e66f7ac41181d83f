"""Plugins found, configured and chained: one pluggy PluginManager per pipeline.

A plugin is a class. It is built with its checked config, ``cls(config)``, once per
pipeline it appears in. Its config schema is its ``config_schema`` (see
:class:`gateway.hookspecs.Plugin`) or else the ``schema.json`` beside the module that
defines it; with neither, the plugin takes no config. Plugins are found three ways, later ones shadowing
earlier ones of the same name:

1. the built-ins: each package under ``plugins/`` that defines ``Plugin``;
2. the entry point group ``llamagate.plugins`` (name -> class);
3. each ``.py`` file in the folders under ``plugin_dirs:`` that defines ``Plugin``
   (the plugin is named after the file).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pluggy

from . import hookspecs
from .hookspecs import HOOK_NAMES, plugin_attribute
from .config import Config, ConfigError, PluginEntry
from .schemas import apply_defaults, compile_schema, schema_errors
from .context import BackendView, ReplicaView, RequestContext, Response
from .errors import GatewayError, InternalError

log = logging.getLogger("llamagate")

ENTRY_POINT_GROUP = "llamagate.plugins"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "plugins"


@dataclass(frozen=True)
class PluginSpec:
    """A plugin that can be put in a pipeline.

    Attributes:
        name: The name used in ``pipelines.yaml``.
        factory: The class; ``factory(config)`` builds an instance.
        schema: Its config's JSON Schema.
        source: Where it came from: ``builtin``, ``entry point <dist>`` or a file path.
    """

    name: str
    factory: Callable[[dict[str, Any]], Any]
    schema: dict[str, Any]
    source: str

    @property
    def hooks(self) -> list[str]:
        return [name for name in HOOK_NAMES if hasattr(self.factory, name)]


def _schema_for(cls: Any) -> dict[str, Any]:
    schema = plugin_attribute(cls, "config_schema")
    if schema is not None:
        return schema
    module = sys.modules.get(cls.__module__)
    module_file = getattr(module, "__file__", None)
    if module_file:
        path = Path(module_file).parent / "schema.json"
        if path.exists():
            return json.loads(path.read_text())
    return {"type": "object", "additionalProperties": False}


def _load_file(path: Path) -> Any:
    module_name = f"llamagate_dropin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def discover(plugin_dirs: Iterable[str] = ()) -> dict[str, PluginSpec]:
    """Every plugin available, by name.

    Raises:
        ConfigError: when a plugin cannot be imported.
    """
    found: dict[str, PluginSpec] = {}

    def add(name: str, cls: Any, source: str) -> None:
        found[name] = PluginSpec(name=name, factory=cls, schema=_schema_for(cls), source=source)

    problems = []
    for folder in sorted(BUILTIN_DIR.iterdir()) if BUILTIN_DIR.is_dir() else []:
        if (folder / "__init__.py").exists():
            module = importlib.import_module(f"plugins.{folder.name}")
            if hasattr(module, "Plugin"):
                add(folder.name, module.Plugin, "builtin")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            add(ep.name, ep.load(), f"entry point {ep.dist.name if ep.dist else ep.value}")
        except Exception as exc:  # a broken third-party plugin must not hide the others
            problems.append(("", f"plugin {ep.name!r} (entry point {ep.value}) failed to load: {exc!r}"))
    for folder in plugin_dirs:
        for path in sorted(Path(folder).glob("*.py")):
            try:
                module = _load_file(path)
            except Exception as exc:
                problems.append(("plugin_dirs", f"{path} failed to load: {exc!r}"))
                continue
            if hasattr(module, "Plugin"):
                add(path.stem, module.Plugin, str(path))
    if problems:
        raise ConfigError("plugins", problems)
    return found


def _contained(impl: pluggy.HookImpl) -> pluggy.HookImpl:
    """A ``complete`` implementation that logs what it raises instead of raising it, so
    that one pluggy call runs every plugin's ``complete`` even if one fails (pluggy
    stops at the first exception; calling each implementation apart costs a pluggy call
    per plugin). A copy: the plugin's own implementation, in the manager, is unchanged.
    Wrappers are left as they are."""
    if impl.wrapper or impl.hookwrapper:
        return impl
    function, ctx_at = impl.function, impl.argnames.index("ctx") if "ctx" in impl.argnames else None

    def complete(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception:
            logger = args[ctx_at].log if ctx_at is not None else log.log
            logger(logging.ERROR, "plugin %s failed in complete hook", impl.plugin_name, exc_info=True)
            return None

    contained = copy.copy(impl)
    contained.function = complete
    return contained


class Pipeline:
    """One pipeline's plugins, called in YAML order.

    Args:
        name: The pipeline's name.
        plugins: ``(label, instance)`` pairs in call order.
    """

    def __init__(self, name: str, plugins: list[tuple[str, Any]]) -> None:
        self.name = name
        self.plugins = plugins
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs.GatewaySpec)
        # pluggy calls the last registered plugin first: register in reverse.
        for label, plugin in reversed(plugins):
            self.pm.register(plugin, name=label)
        self.pm.check_pending()
        # Hooks are called through pluggy's own dispatch, the manager's ``_hookexec``
        # (``_multicall``: pluggy's order, ``firstresult`` and wrappers; tracing through
        # ``add_hookcall_monitoring``), with each hook's implementations and
        # ``firstresult`` taken once here, as the plugins never change after this. The
        # HookCaller would re-check the arguments and copy the list on every call (up to
        # 1.7x the dispatch cost of a request, bench/hookcalls.py), and could not run
        # the contained ``complete`` implementations.
        self._hookexec = self.pm._hookexec
        self._plan: dict[str, tuple[list[pluggy.HookImpl], bool]] = {}
        for name in HOOK_NAMES:
            hook = getattr(self.pm.hook, name)
            impls = hook.get_hookimpls()
            self._plan[name] = ([_contained(impl) for impl in impls] if name == "complete" else impls,
                                bool(hook.spec.opts.get("firstresult")))
        # The plugins that see stream events, and whether they want them for a request.
        self._event_wants = [plugin_attribute(impl.plugin, "wants_events") for impl in self._plan["response_event"][0]]

    def _call(self, name: str, ctx: RequestContext, **kwargs: Any) -> Any:
        try:
            impls, firstresult = self._plan[name]
            return self._hookexec(name, impls, {"ctx": ctx, **kwargs}, firstresult)
        except GatewayError:
            raise
        except Exception as exc:
            ctx.log(logging.ERROR, "plugin failed in %s hook of pipeline %s", name, self.name, exc_info=True)
            raise InternalError(
                f"The gateway failed while handling this request (request id {ctx.request_id}).",
                code="plugin_error",
            ) from exc

    def request_start(self, ctx: RequestContext) -> Response | None:
        return self._call("request_start", ctx)

    def request(self, ctx: RequestContext, backends: Mapping[str, BackendView]) -> Response | None:
        return self._call("request", ctx, backends=backends)

    def route(self, ctx: RequestContext, backends: Mapping[str, BackendView]) -> ReplicaView | None:
        return self._call("route", ctx, backends=backends)

    def upstream_request(self, ctx: RequestContext, payload: dict[str, Any]) -> None:
        self._call("upstream_request", ctx, payload=payload)

    def response(self, ctx: RequestContext, body: dict[str, Any]) -> None:
        self._call("response", ctx, body=body)

    def wants_events(self, ctx: RequestContext) -> bool:
        """Whether this request's stream events must be decoded: some plugin implements
        ``response_event`` and wants them for it (``wants_events(ctx)``, default yes)."""
        for wants in self._event_wants:
            try:
                if wants is None or wants(ctx):
                    return True
            except Exception as exc:
                ctx.log(logging.ERROR, "plugin failed in wants_events of pipeline %s", self.name, exc_info=True)
                raise InternalError(f"The gateway failed while handling this request (request id {ctx.request_id}).",
                                    code="plugin_error") from exc
        return False

    def response_event(self, ctx: RequestContext, event: dict[str, Any]) -> bool:
        """True when the event is kept."""
        return self._call("response_event", ctx, event=event) is not False

    def complete(self, ctx: RequestContext, outcome: str, backends: Mapping[str, BackendView]) -> None:
        """Call every plugin's ``complete``; one that raises is logged and skipped
        (each implementation is :func:`_contained`)."""
        self._hookexec("complete", self._plan["complete"][0], {"ctx": ctx, "outcome": outcome, "backends": backends},
                       False)

    def shutdown(self) -> None:
        """Call every plugin's ``shutdown``; one that raises is logged and skipped."""
        for impl in self.pm.hook.shutdown.get_hookimpls()[::-1]:  # pluggy's order: the last in its list first
            try:
                self._hookexec("shutdown", [impl], {}, False)
            except Exception:
                log.exception("plugin %s failed in shutdown hook of pipeline %s", impl.plugin_name, self.name)

    def describe(self) -> list[str]:
        return [label for label, _ in self.plugins]


def build_pipelines(config: Config, available: Mapping[str, PluginSpec] | None = None) -> dict[str, Pipeline]:
    """Build every pipeline of ``config``: each plugin's config checked, then the plugin made.

    Raises:
        ConfigError: naming every plugin that is unknown or misconfigured.
    """
    if available is None:
        available = discover(config.plugin_dirs)
    problems: list[tuple[str, str]] = []
    pipelines = {}
    for pipeline_name, entries in config.pipelines.items():
        plugins = []
        for entry in entries:
            instance = _make_plugin(entry, available, problems)
            if instance is not None:
                plugins.append((entry.path, instance))
        pipelines[pipeline_name] = plugins
    if problems:
        raise ConfigError(config.file, problems)
    return {name: Pipeline(name, plugins) for name, plugins in pipelines.items()}


def _make_plugin(entry: PluginEntry, available: Mapping[str, PluginSpec], problems: list[tuple[str, str]]) -> Any:
    spec = available.get(entry.name)
    if spec is None:
        problems.append((entry.path, f"unknown plugin {entry.name!r} (available: {', '.join(sorted(available)) or 'none'})"))
        return None
    try:
        validator = compile_schema(spec.schema)
    except Exception as exc:
        problems.append((entry.path, f"plugin {entry.name!r} has an invalid config schema: {exc}"))
        return None
    errors = schema_errors(validator, entry.config, prefix=entry.path)
    if errors:
        problems.extend(errors)
        return None
    try:
        return spec.factory(apply_defaults(spec.schema, entry.config))
    except (ValueError, TypeError, KeyError) as exc:
        problems.append((entry.path, str(exc)))
    except Exception as exc:
        problems.append((entry.path, f"plugin {entry.name!r} failed to start: {exc!r}"))
    return None
