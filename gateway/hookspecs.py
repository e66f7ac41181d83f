"""The plugin contract: every hook a plugin may implement.

A plugin is a class whose methods carry ``@hookimpl`` and whose names match the
hooks below. The gateway calls hooks with keyword arguments, in the order the
plugins are listed in ``pipelines.yaml``. Hooks only ever grow by new arguments;
an implementation may accept any subset of a hook's arguments.

A plugin rejects a request by raising a :class:`gateway.errors.GatewayError`
subclass. Any other exception is contained: the client gets a 500 carrying the
request id, the worker lives on, and ``complete`` still runs.

Hooks run inside a gevent worker: do no blocking I/O that gevent cannot switch
out of (plain sockets, ``requests`` and ``redis`` are fine; C extensions that
block are not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import pluggy

if TYPE_CHECKING:
    from .context import RequestContext, Response
    from .upstream import Backend, Replica

PROJECT = "llamagate"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class GatewaySpec:
    """The hooks. Each docstring says when it runs and what it may do."""

    @hookspec(firstresult=True)
    def request_start(self, ctx: RequestContext) -> Response | None:
        """Runs for every request as soon as its headers arrived, before the body
        is read or parsed.

        Authentication lives here, and anything else that needs only the headers:
        a request refused here costs the gateway no body reading or JSON parsing,
        so a client without a key cannot make it work.

        Args:
            ctx: The request. ``ctx.body``, ``ctx.model`` and ``ctx.requested_model``
                are still None; ``ctx.headers``, ``ctx.query`` and ``ctx.remote_addr``
                are set.

        Returns:
            None to continue, or a :class:`gateway.Response` that answers the
            client at once (the body is never read).

        Raises:
            GatewayError: to reject the request with that error.
        """

    @hookspec(firstresult=True)
    def request(self, ctx: RequestContext) -> Response | None:
        """Runs for every request on the route, before any backend is chosen.

        Auth, validation, rate limiting and cache lookups live here.

        Args:
            ctx: The request. ``ctx.body`` is the decoded JSON body (None for GET),
                ``ctx.model`` the resolved public model id (None when unknown).

        Returns:
            None to continue, or a :class:`gateway.Response` that answers the
            client at once; the plugins after it and the backend are skipped.

        Raises:
            GatewayError: to reject the request with that error.
        """

    @hookspec(firstresult=True)
    def route(self, ctx: RequestContext, backends: Mapping[str, Backend]) -> Replica | None:
        """Picks the backend replica that serves the request.

        Runs after ``request``, only for routes that go to a backend. When every
        plugin returns None the gateway picks a ready replica of ``ctx.backend``
        (the backend the model is configured on), round robin. If the chosen
        replica refuses the connection, the gateway tries the model's other replicas.

        Args:
            ctx: The request; ``ctx.backend`` names the model's configured backend.
            backends: Every configured backend by name; each has ``replicas``, and
                each replica ``url``, ``ready`` and ``in_flight``.

        Returns:
            A replica of one of ``backends``, or None to leave the choice to
            the next plugin or the gateway.
        """

    @hookspec
    def upstream_request(self, ctx: RequestContext, payload: dict[str, Any]) -> None:
        """Edits the JSON body just before it is sent to the backend.

        Args:
            ctx: The request; ``ctx.replica`` is the chosen replica.
            payload: A copy of the client's body with ``model`` set to the
                backend's model name. Edit it in place.
        """

    @hookspec
    def response(self, ctx: RequestContext, body: dict[str, Any]) -> None:
        """Sees (and may edit) a whole non-streamed answer before the client does.

        Args:
            ctx: The request; ``ctx.usage`` is already set from ``body``.
            body: The backend's decoded answer, already in OpenAI's shape with
                ``model`` set to the public id. Edit it in place.
        """

    @hookspec(firstresult=True)
    def response_event(self, ctx: RequestContext, event: dict[str, Any]) -> bool | None:
        """Sees each streamed SSE event before the client does.

        Implementing this hook makes the gateway decode every event of the
        pipeline's streams; pipelines without it relay the bytes as they come.
        ``data: [DONE]`` is not passed here.

        Args:
            ctx: The request.
            event: The decoded ``data:`` JSON of one event. Edit it in place.

        Returns:
            None to keep the event, or False to drop it: the client never sees it
            and the plugins after this one are not called for it.
        """

    @hookspec
    def shutdown(self) -> None:
        """Runs once when the plugin instance is retired: after a reload replaced
        its configuration (once the requests it was serving have completed) or
        when the worker process exits. Flush buffered data here; state that
        must outlive a reload (limits, caches) belongs in a store
        (:func:`gateway.stores.make_store` keeps memory stores across reloads).
        """

    @hookspec
    def complete(self, ctx: RequestContext, outcome: str) -> None:
        """Runs exactly once per request, after the last byte went out or the
        client went away. Logging, metrics and accounting live here.

        Every plugin's ``complete`` runs even if another one raises.

        Args:
            ctx: The request; ``status``, ``error``, ``usage``, ``bytes_out``,
                ``latency_ms`` and ``ttfb_ms`` are final.
            outcome: ``ok``, ``error`` (the client got an error, ``ctx.error``
                says which), ``client_gone`` (the client disconnected first), or
                ``cancelled`` (someone cancelled it through the cancel endpoints).
        """
