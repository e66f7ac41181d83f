"""The plugin contract: what a plugin is, and every hook it may implement.

This module is the one source of the hook documentation: the hooks section of
``docs/plugins.md`` is generated from it (``python -m gateway.cli.hookdocs``), and a
test keeps the two equal. Plugins import its public names through
:mod:`gateway.plugin`.

**A plugin** is a class, built once per pipeline it appears in as ``cls(config)``
with its checked config (defaults filled in). Besides its hooks (methods marked
``@hookimpl`` whose names are the hooks below) it may have the members of
:class:`Plugin`.

The gateway calls hooks with keyword arguments, in the order the plugins are listed
in ``pipelines.yaml``. Hooks only ever grow by new arguments; an implementation may
accept any subset of a hook's arguments. A plugin rejects a request by raising a
:class:`gateway.plugin.GatewayError` subclass; any other exception is contained: the
client gets a 500 carrying the request id, the worker lives on, and ``complete``
still runs.

Hooks run inside a gevent worker: do no blocking I/O that gevent cannot switch out
of (plain sockets, ``requests`` and ``redis`` are fine; C extensions that block, such
as sqlite3, belong in gevent's threadpool).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, Sequence

import pluggy

if TYPE_CHECKING:  # public types only: the contract exposes nothing internal
    from .context import BackendView, ReplicaView, RequestContext, Response

PROJECT = "llamagate"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Plugin(Protocol):
    """What the gateway reads from a plugin besides its hooks. Every member is
    optional: a plugin need not inherit from this class nor have any of them (the
    defaults here are what a missing member means). The gateway reads them through
    :func:`plugin_attribute` only.
    """

    config_schema: ClassVar[Mapping[str, Any] | None] = None
    """The JSON Schema of the plugin's config, checked when the pipeline loads
    (``llamagate check`` reports problems with the file and the path). Without it, a
    ``schema.json`` beside the module that defines the class is used; with neither,
    the plugin takes no config. ``__init__`` may raise ``ValueError`` for what a
    schema cannot say."""

    watch_files: Sequence[str] = ()
    """Paths whose change reloads the configuration, like ``pipelines.yaml`` itself
    (the auth plugin's keys file)."""

    def wants_events(self, ctx: RequestContext) -> bool:
        """Whether this request's stream events must be decoded for this plugin's
        ``response_event`` hook. Without it, a plugin implementing ``response_event``
        gets every event of every stream; with it, a stream no plugin wants is
        relayed as raw bytes, which costs far less (a cache wants only the misses it
        may store, an access log only when it logs bodies)."""
        return True


PLUGIN_ATTRIBUTES = tuple(name for name in vars(Plugin) if not name.startswith("_"))


def plugin_attribute(plugin: Any, name: str) -> Any:
    """``plugin``'s member ``name`` of :class:`Plugin`, or None when it has none (the
    one place the gateway reads them).

    Raises:
        AttributeError: when ``name`` is not a member of :class:`Plugin`.
    """
    if name not in PLUGIN_ATTRIBUTES:
        raise AttributeError(f"{name!r} is not a member of the Plugin protocol")
    return getattr(plugin, name, None)


class GatewaySpec:
    """The hooks, in the order a request meets them."""

    @hookspec(firstresult=True)
    def request_start(self, ctx: RequestContext) -> Response | None:
        """Runs for every request as soon as its headers arrived, before the body is
        read or parsed: authentication, CORS preflights, anything that needs only
        headers. A request refused here costs the gateway no body reading and no JSON
        parsing, so a client without a key cannot make it work (and a client that sent
        ``Expect: 100-continue`` is never invited to send its body).

        Args:
            ctx: The request. ``ctx.headers``, ``ctx.query`` and ``ctx.remote_addr``
                are set; ``ctx.body`` and ``ctx.model`` are still None.

        Returns:
            None to continue, or a :class:`gateway.plugin.Response` that answers at once
            (the body is never read).

        Raises:
            GatewayError: to reject the request with that error.

        Example::

            @hookimpl
            def request_start(self, ctx):
                if ctx.headers.get("X-TENANT") not in self.tenants:
                    raise PermissionDeniedError("Unknown tenant.")
        """

    @hookspec(firstresult=True)
    def request(self, ctx: RequestContext, backends: Mapping[str, BackendView]) -> Response | None:
        """Runs for every request on the route once its body is read, before any
        backend is chosen: model permissions, validation, rate limits, cache lookups.

        Args:
            ctx: The request. ``ctx.body`` is the decoded JSON body (None for GET),
                ``ctx.model`` the resolved public model id (None when the body names
                no model the gateway serves).
            backends: Every backend by name, read-only and live, as ``route`` gets
                them (for a plugin route that reports on them).

        Returns:
            None to continue, or a :class:`gateway.plugin.Response` that answers at once:
            the plugins after yours and the backend are skipped (a cache hit).

        Raises:
            GatewayError: to reject the request with that error.

        Example::

            @hookimpl
            def request(self, ctx):
                if ctx.model == "expensive-model" and ctx.principal.role != "admin":
                    raise PermissionDeniedError("Admins only.", param="model")
        """

    @hookspec(firstresult=True)
    def route(self, ctx: RequestContext, backends: Mapping[str, BackendView]) -> ReplicaView | None:
        """Picks the replica that serves the request; runs after ``request``, only on
        routes that go to a backend. When every plugin returns None the gateway takes
        the next available replica of ``ctx.backend`` in its round robin. If the chosen
        replica refuses the connection, the gateway tries the backend's other replicas.

        Args:
            ctx: The request; ``ctx.backend`` names the backend the model is configured on.
            backends: Every configured backend by name, as read-only
                :class:`gateway.plugin.BackendView` objects: ``name``, ``replicas``,
                ``in_flight``, ``queued``, ``limit``, ``candidates()`` (the available
                replicas in the gateway's round-robin order; it takes a turn) and
                ``kv_scope(principal)`` (whose cached prompts the caller may reuse
                there, by the backend's ``kv_sharing``: ``client:<id>``,
                ``group:<name>``, ``global``, ``anonymous``). Each
                :class:`gateway.plugin.ReplicaView` has ``url``, ``ready``, ``available``,
                ``in_flight``, ``slots``, ``breaker``, ``fetch(path)`` and
                ``request(method, path, ...)``. A hook may
                also set ``ctx.slot_hint``: the llama-server slot it would like the
                request to run in on the replica it returns (the core takes it, and
                decides itself whether the slot's cache may be reused).

        Returns:
            One of the replica views of ``backends``, or None to leave the choice to the
            next plugin or the gateway. Anything else (say a view kept from before a reload
            that replaced its backend) fails the request with a 500 ``plugin_error``.

        Example::

            @hookimpl
            def route(self, ctx, backends):
                ready = backends[ctx.backend].candidates()
                return min(ready, key=lambda replica: replica.in_flight, default=None)
        """

    @hookspec
    def upstream_request(self, ctx: RequestContext, payload: dict[str, Any]) -> None:
        """Edits the JSON body just before it goes to the backend. (The gateway then
        asks llama-server to stream chat and completion answers, whatever the client
        asked: only a stream stops when its connection closes. On routes whose prompts
        llama-server caches it also sets ``id_slot`` and ``cache_prompt`` itself, per
        attempt: a hook's values for those two are replaced; see :mod:`gateway.backends.slots`.)

        Args:
            ctx: The request; ``ctx.replica`` is the replica most likely to serve it.
            payload: A copy of the client's body with ``model`` set to the backend's
                model name. Edit it in place.

        Example::

            @hookimpl
            def upstream_request(self, ctx, payload):
                payload.setdefault("n_probs", 0)   # a llama-server option
        """

    @hookspec
    def response(self, ctx: RequestContext, body: dict[str, Any]) -> None:
        """Sees, and may edit, a whole non-streamed answer before the client does.

        Args:
            ctx: The request; ``ctx.usage`` is already set from ``body``.
            body: The answer, in OpenAI's shape, ``model`` set to the public id. Edit
                it in place.

        Example::

            @hookimpl
            def response(self, ctx, body):
                for choice in body.get("choices", []):
                    choice["message"]["content"] = choice["message"]["content"].strip()
        """

    @hookspec(firstresult=True)
    def response_event(self, ctx: RequestContext, event: dict[str, Any]) -> bool | None:
        """Sees each streamed event before the client does, for the requests whose
        events some plugin wants (see ``Plugin.wants_events``);
        other streams are relayed without being decoded. ``data: [DONE]`` is not
        passed.

        Args:
            ctx: The request.
            event: The decoded ``data:`` JSON of one event. Edit it in place.

        Returns:
            None to keep the event, or False to drop it: the client never sees it and
            the plugins after this one are not called for it.

        Example::

            @hookimpl
            def response_event(self, ctx, event):
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        delta["content"] = delta["content"].replace("secret", "******")
        """

    @hookspec
    def complete(self, ctx: RequestContext, outcome: str, backends: Mapping[str, BackendView]) -> None:
        """Runs exactly once per request, after the last byte went out or the client
        went away: logging, metrics, accounting. Every plugin's ``complete`` runs even
        if another one raises, and even when this plugin's own ``request_start`` or
        ``request`` never ran (an earlier plugin refused or answered the request).

        Args:
            ctx: The request; ``status``, ``error``, ``usage``, ``bytes_out``,
                ``latency_ms`` and ``ttfb_ms`` are final. ``usage`` counts what
                llama-server generated also for answers cut short.
            outcome: ``ok``, ``error`` (the client got an error; ``ctx.error`` says
                which), ``client_gone`` (the client disconnected first) or
                ``cancelled`` (someone cancelled it through the cancel endpoints).
            backends: Every backend by name, read-only and live (this worker's requests
                in flight and queued, replicas' breakers), e.g. for gauges.

        Example::

            @hookimpl
            def complete(self, ctx, outcome):
                if ctx.usage and ctx.principal:
                    self.meter.add(ctx.principal.client_id, ctx.usage["total_tokens"])
        """

    @hookspec
    def shutdown(self) -> None:
        """Runs once when the plugin instance is retired: after a reload replaced its
        configuration (once the requests it was serving have completed), or when the
        worker process exits. Flush what you buffer here. State that must outlive a
        reload, such as limits and caches, belongs in a store:
        :func:`gateway.plugin.make_store` hands the new instances the same memory store.

        Example::

            @hookimpl
            def shutdown(self):
                self.flush()
        """


HOOK_NAMES = tuple(name for name in vars(GatewaySpec) if not name.startswith("_"))
"""The hooks, in the order a request meets them."""

