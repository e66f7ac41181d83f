"""The plugin contract: what a plugin is, and every hook it may implement.

This module is the one source of the hook documentation: the hooks section of
``docs/plugins.md`` is generated from it (``python -m gateway.hookspecs``), and a
test keeps the two equal.

**A plugin** is a class, built once per pipeline it appears in as ``cls(config)``
with its checked config (defaults filled in). Besides its hooks (methods marked
``@hookimpl`` whose names are the hooks below) it may have:

* ``config_schema``: a class attribute holding the JSON Schema of its config
  (checked when the pipeline loads; ``llamagate check`` reports problems with the
  file and the path). Without it, a ``schema.json`` beside the module that defines
  the class is used; with neither, the plugin takes no config. ``__init__`` may raise
  ``ValueError`` for what a schema cannot say.
* ``watch_files``: paths (an attribute) whose change reloads the configuration,
  like ``pipelines.yaml`` itself (the auth plugin's keys file).
* ``wants_events(ctx) -> bool``: whether this request's stream events must be
  decoded for its ``response_event`` hook. Without it, a plugin implementing
  ``response_event`` gets every event of every stream; with it, a stream no plugin
  wants is relayed as raw bytes, which costs far less (a cache wants only the misses
  it may store, an access log only when it logs bodies).

The gateway calls hooks with keyword arguments, in the order the plugins are listed
in ``pipelines.yaml``. Hooks only ever grow by new arguments; an implementation may
accept any subset of a hook's arguments. A plugin rejects a request by raising a
:class:`gateway.GatewayError` subclass; any other exception is contained: the client
gets a 500 carrying the request id, the worker lives on, and ``complete`` still runs.

Hooks run inside a gevent worker: do no blocking I/O that gevent cannot switch out
of (plain sockets, ``requests`` and ``redis`` are fine; C extensions that block, such
as sqlite3, belong in gevent's threadpool).
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import TYPE_CHECKING, Any, Mapping

import pluggy

if TYPE_CHECKING:  # public types only: the contract exposes nothing internal
    from .context import BackendView, ReplicaView, RequestContext, Response

PROJECT = "llamagate"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


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
            None to continue, or a :class:`gateway.Response` that answers at once
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
            None to continue, or a :class:`gateway.Response` that answers at once:
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
                :class:`gateway.BackendView` objects: ``name``, ``replicas``,
                ``in_flight``, ``queued``, ``limit``, ``candidates()`` (the available
                replicas in the gateway's round-robin order; it takes a turn) and
                ``kv_scope(principal)`` (whose cached prompts the caller may reuse
                there, by the backend's ``kv_sharing``: ``client:<id>``,
                ``group:<name>``, ``global``, ``anonymous``). Each
                :class:`gateway.ReplicaView` has ``url``, ``ready``, ``available``,
                ``in_flight``, ``slots``, ``breaker`` and ``fetch(path)``. A hook may
                also set ``ctx.slot_hint``: the llama-server slot it would like the
                request to run in on the replica it returns (the core takes it, and
                decides itself whether the slot's cache may be reused).

        Returns:
            One of the replica views, or None to leave the choice to the next plugin
            or the gateway.

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
        attempt: a hook's values for those two are replaced; see :mod:`gateway.slots`.)

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
        events some plugin wants (see ``wants_events`` in the plugin protocol above);
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
        :func:`gateway.stores.make_store` hands the new instances the same memory store.

        Example::

            @hookimpl
            def shutdown(self):
                self.flush()
        """


def hook_names() -> list[str]:
    """The hooks, in the order a request meets them."""
    return [name for name in vars(GatewaySpec) if not name.startswith("_")]


def markdown() -> str:
    """The hooks section of ``docs/plugins.md``, generated from the docstrings above."""
    out = []
    for name in hook_names():
        function = getattr(GatewaySpec, name)
        arguments = [a for a in inspect.signature(function).parameters if a != "self"]
        sections = _sections(inspect.getdoc(function) or "")
        out.append(f"### `{name}({', '.join(arguments)})`\n")
        out.append(_rst_to_md(sections.pop("", "")) + "\n")
        args = sections.pop("Args", "")
        if args:
            out.append("\n".join(f"- `{arg}`: {_rst_to_md(text)}" for arg, text in _items(args)) + "\n")
        for title in ("Returns", "Raises"):
            if title in sections:
                out.append(f"{title}: {_rst_to_md(sections.pop(title))}\n")
        example = sections.pop("Example", "")
        if example:
            out.append("```python\n" + example.strip("\n") + "\n```\n")
    return "\n".join(out)


def _sections(doc: str) -> dict[str, str]:
    """A Google-style docstring split into its sections ("" for the summary)."""
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in doc.splitlines():
        header = re.fullmatch(r"(Args|Returns|Raises|Example)::?", line.strip())
        if header and not line.startswith(" "):
            current = header.group(1)
            sections[current] = []
            continue
        sections[current].append(line)
    return {name: inspect.cleandoc("\n".join(lines)) if name != "Example" else _dedent(lines)
            for name, lines in sections.items()}


def _dedent(lines: list[str]) -> str:
    code = [line for line in lines if line.strip()]
    indent = min((len(line) - len(line.lstrip()) for line in code), default=0)
    return "\n".join(line[indent:] for line in lines).strip("\n")


def _items(text: str) -> list[tuple[str, str]]:
    """``name: text`` items of an Args section, continuation lines joined."""
    items: list[tuple[str, str]] = []
    for line in text.splitlines():
        match = re.match(r"(\w+): (.*)", line)
        if match and not line.startswith(" "):
            items.append((match.group(1), match.group(2)))
        elif items:
            items[-1] = (items[-1][0], items[-1][1] + " " + line.strip())
    return items


def _rst_to_md(text: str) -> str:
    """Docstring markup to markdown: ``code`` and :class:`x` become `code`."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return " ".join(line.strip() for line in text.splitlines()) if "\n\n" not in text else \
        "\n\n".join(" ".join(line.strip() for line in para.splitlines()) for para in text.split("\n\n"))


if __name__ == "__main__":
    sys.stdout.write(markdown())
