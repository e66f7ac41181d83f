"""otel: one OpenTelemetry trace per model request, after the GenAI semantic conventions.

The span of a request is named ``{gen_ai.operation.name} {gen_ai.request.model}`` and
carries the conventions' attributes (:data:`SEMCONV_VERSION`: they are marked
Development, so the version followed is pinned here and in docs/tracing.md). Its
children are drawn from what the core records on the context (``ctx.marks``,
``ctx.timings``) and from this plugin's own hook wrappers: each hook step (auth is
``request_start``) an event of the request's span, with its duration; the call to
llama-server a CLIENT span (its id goes to llama-server in ``traceparent``), under which
the fleet's lease and model load, the admission wait and the stream; the upstream's
headers and first event are its events.

A client's W3C ``traceparent`` makes the request's span its child (one trace); whether
the request is traced is ``sample_ratio`` on the trace id, and the client's sampled
flag only with ``follow_client_sampling`` (:class:`Sampling`). A request not traced costs
that decision and, when the client sent a ``traceparent``, passing it on as it came; no
span is built, no attribute read.

Spans are exported by the OpenTelemetry SDK: a ``BatchSpanProcessor`` (its thread is a
greenlet under gunicorn's gevent worker: the export's waits yield to the requests) and
the OTLP/HTTP protobuf exporter. Finished spans wait in a bounded queue (``max_queue``;
more are dropped) and go every ``schedule_delay`` seconds; an export that fails is
retried with backoff within ``timeout``, then dropped. A collector that is down costs a
request nothing. The provider is made in each worker process on its first request
(after gunicorn forked it) and shut down, flushing, by the ``shutdown`` hook.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from typing import Any, Iterator, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.plugin import cached_tokens, choice_text, hookimpl

NAME = "otel"  # the key of a traced request's state in ctx.state
SEMCONV_VERSION = "1.40.0"  # the last release with the GenAI conventions in the main repository
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
PROVIDER = "llama.cpp"  # gen_ai.provider.name: not among the conventions' values, named as they ask

# gen_ai.operation.name by route; other routes (models, metrics, tokenize...) are not traced.
OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
}

# The request's parameters the conventions name, and the body fields they come from.
REQUEST_PARAMETERS = (
    ("gen_ai.request.max_tokens", ("max_tokens", "max_completion_tokens", "max_output_tokens")),
    ("gen_ai.request.temperature", ("temperature",)),
    ("gen_ai.request.top_p", ("top_p",)),
    ("gen_ai.request.top_k", ("top_k",)),
    ("gen_ai.request.frequency_penalty", ("frequency_penalty",)),
    ("gen_ai.request.presence_penalty", ("presence_penalty",)),
    ("gen_ai.request.seed", ("seed",)),
    ("gen_ai.request.choice.count", ("n",)),
)

_TRACEPARENT = re.compile(r"^(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")
_PROPAGATOR = TraceContextTextMapPropagator()


class _Headers:
    """The propagator's getter for Falcon's headers (names upper-cased)."""

    @staticmethod
    def get(headers: Mapping[str, str], name: str) -> list[str] | None:
        value = headers.get(name.upper())
        return None if value is None else [value]

    @staticmethod
    def keys(headers: Mapping[str, str]) -> list[str]:
        return list(headers)


class Trace:
    """A traced request's state: its span, its clock, the steps its hooks took."""

    __slots__ = ("span", "offset_ns", "steps", "upstream", "response_id", "output")

    def __init__(self, span: Any, offset_ns: int) -> None:
        self.span = span
        self.offset_ns = offset_ns  # time.monotonic() to the wall clock, in ns
        self.steps: list[tuple[str, float, float, BaseException | None]] = []
        self.upstream: Any = None
        self.response_id: str | None = None
        self.output: list[str] = []

    def at(self, moment: float) -> int:
        """A ``time.monotonic()`` moment as the span's clock (ns since the epoch)."""
        return int(moment * 1e9) + self.offset_ns


class Sampling:
    """Whether a request is traced, decided before any span is built (the SDK's
    ``start_span`` costs tens of µs, too much for the requests not traced): ``ratio`` of the
    trace ids, as the SDK's ``TraceIdRatioBased`` decides on a client's trace id (its lower
    64 bits), or the client's sampled flag with ``follow_client``. A request without a valid
    ``traceparent`` begins a trace of its own: a random draw, as its trace id would be."""

    __slots__ = ("ratio", "bound", "follow_client")

    def __init__(self, ratio: float, follow_client: bool) -> None:
        self.ratio = ratio
        self.bound = round(ratio * 2**64)
        self.follow_client = follow_client

    def traced(self, traceparent: str | None) -> bool:
        if traceparent is not None and _TRACEPARENT.match(traceparent):
            if self.follow_client:
                return int(traceparent[53:55], 16) & 1 == 1
            return int(traceparent[19:35], 16) < self.bound
        return random.random() < self.ratio


MAX_CLIENT_TEXT = 256  # a string the client chose (a model name, a stop sequence), cut to this in a span
MAX_STOP_SEQUENCES = 8


def clip(text: str, limit: int = MAX_CLIENT_TEXT) -> str:
    return text if len(text) <= limit else text[:limit] + f"…[+{len(text) - limit} chars]"


def request_attributes(ctx: Any, operation: str) -> dict[str, Any]:
    """The GenAI attributes of a request, from its body (what a client chose is cut short:
    finished spans wait in a queue bounded in spans, not bytes)."""
    model = ctx.model or (clip(ctx.requested_model) if ctx.requested_model else None)
    attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER,
                                  "llamagate.request_id": ctx.request_id, "llamagate.route": ctx.route}
    if model:
        attributes["gen_ai.request.model"] = model
    body = ctx.body if isinstance(ctx.body, dict) else {}
    for name, fields in REQUEST_PARAMETERS:
        for field in fields:
            value = body.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attributes[name] = value
                break
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        attributes["gen_ai.request.stop_sequences"] = [clip(item) for item in stop[:MAX_STOP_SEQUENCES]]
    if ctx.stream:
        attributes["llamagate.request.stream"] = True  # not in the conventions 1.40
    return attributes


def response_attributes(ctx: Any, traced: Trace, outcome: str) -> dict[str, Any]:
    """What the answer says: model, finish reasons, usage, the caller and the outcome."""
    attributes: dict[str, Any] = {"llamagate.outcome": outcome}
    if ctx.status is not None:
        attributes["http.response.status_code"] = ctx.status
    if ctx.model and ctx.sent:
        attributes["gen_ai.response.model"] = ctx.model
    if traced.response_id:
        attributes["gen_ai.response.id"] = traced.response_id
    if ctx.finish_reasons:
        attributes["gen_ai.response.finish_reasons"] = ctx.finish_reasons
    usage = ctx.usage if isinstance(ctx.usage, dict) else {}
    for name, fields in (("gen_ai.usage.input_tokens", ("prompt_tokens", "input_tokens")),
                         ("gen_ai.usage.output_tokens", ("completion_tokens", "output_tokens"))):
        for field in fields:
            count = usage.get(field)
            if isinstance(count, int) and not isinstance(count, bool):
                attributes[name] = count
                break
    cached = cached_tokens(usage)
    if cached is not None:
        attributes["gen_ai.usage.cache_read.input_tokens"] = cached
    if ctx.principal is not None:
        attributes["llamagate.client"] = ctx.principal.client_id
        if ctx.principal.key_id:
            attributes["llamagate.key_id"] = ctx.principal.key_id
    if ctx.backend:
        attributes["llamagate.backend"] = ctx.backend
    if ctx.replica:
        attributes["server.address"] = ctx.replica
    if ctx.cache:
        attributes["llamagate.cache"] = ctx.cache
    if ctx.routing:
        attributes["llamagate.routing"] = ctx.routing
    retries = ctx.counters.get("upstream.retries")
    if retries:
        attributes["llamagate.upstream.retries"] = retries
    if ctx.error is not None:
        attributes["error.type"] = ctx.error.code or type(ctx.error).__name__
    elif outcome != "ok":
        attributes["error.type"] = outcome
    return attributes


def clipped_json(value: Any, limit: int) -> str:
    return clip(json.dumps(value, ensure_ascii=False), limit)


def input_messages(body: Any) -> Any:
    """The prompt as the conventions' ``gen_ai.input.messages`` holds it."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("messages"), list):
        return body["messages"]
    for field in ("prompt", "input"):
        if field in body:
            return [{"role": "user", "parts": [{"type": "text", "content": body[field]}]}]
    return None


class Quieter(logging.Filter):
    """Lets each of the SDK's messages through once a minute: with the collector down it
    would say "Queue full" for every span dropped, and its retries for every batch."""

    INTERVAL = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[Any, float] = {}
        self.suppressed: dict[Any, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now, key = time.monotonic(), (record.name, record.msg)
        if now - self.last.get(key, -self.INTERVAL) < self.INTERVAL:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return False
        self.last[key] = now
        suppressed = self.suppressed.pop(key, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} more like it in the last minute)"
        return True


QUIETER = Quieter()
for _name in ("opentelemetry.sdk._shared_internal", "opentelemetry.exporter"):
    logging.getLogger(_name).addFilter(QUIETER)


# Spans a batch export encodes at once. Encoding is CPU in the worker (about 100 µs a span
# here) during which its other greenlets wait: 64 keep that wait to a few ms.
EXPORT_BATCH = 64


def exporting_provider(config: Mapping[str, Any]) -> tuple[TracerProvider, OTLPSpanExporter]:
    """The SDK as ``config`` says: the batch exporter to the collector."""
    provider = TracerProvider(sampler=ALWAYS_ON,  # the plugin decided (Sampling) before it asks for a span
                              resource=Resource.create({"service.name": config["service_name"]}),
                              shutdown_on_exit=False)  # the shutdown hook does it, within the timeout
    exporter = OTLPSpanExporter(endpoint=config["endpoint"], headers=dict(config["headers"]), timeout=config["timeout"])
    provider.add_span_processor(BatchSpanProcessor(
        exporter, max_queue_size=config["max_queue"], max_export_batch_size=min(EXPORT_BATCH, config["max_queue"]),
        schedule_delay_millis=config["schedule_delay"] * 1000.0, export_timeout_millis=config["timeout"] * 1000.0))
    return provider, exporter


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.capture = config["capture_content"]
        self.max_content_chars = config["max_content_chars"]
        self.sampling = Sampling(config["sample_ratio"], config["follow_client_sampling"])
        self._provider: TracerProvider | None = None
        self._exporter: OTLPSpanExporter | None = None
        self._tracer: Any = None
        self._pid: int | None = None

    # --- the SDK, one per worker process -------------------------------------------------

    def tracer(self) -> Any:
        """This process's tracer: its provider made on first use after a fork (gunicorn's
        workers), never in the master nor in ``llamagate check``."""
        if self._pid != os.getpid():
            self.use(*exporting_provider(self.config))
        return self._tracer

    def use(self, provider: TracerProvider, exporter: Any = None) -> None:
        """Trace into ``provider`` in this process (tests hand one with an in-memory exporter)."""
        self._provider, self._exporter, self._pid = provider, exporter, os.getpid()
        self._tracer = provider.get_tracer("llamagate", schema_url=SCHEMA_URL)

    @hookimpl
    def shutdown(self):
        provider, exporter = self._provider, self._exporter
        if provider is None or self._pid != os.getpid():
            return
        self._provider = None
        # The SDK's shutdown exports what is queued, and may wait 30 s on a collector that is
        # down: given the exporter's timeout, then the exporter is shut, which ends its retries.
        flushing = threading.Thread(target=provider.shutdown, name="llamagate-otel-shutdown", daemon=True)
        flushing.start()
        flushing.join(self.config["timeout"])
        if flushing.is_alive() and exporter is not None:
            exporter.shutdown()

    # --- the request's span --------------------------------------------------------------

    def begin(self, ctx: Any) -> Trace | None:
        """Start the request's span, parented by the client's ``traceparent``; None when
        the route is not traced or :class:`Sampling` leaves the request out."""
        operation = OPERATIONS.get(ctx.route)
        if operation is None:
            return None
        traceparent = ctx.headers.get("TRACEPARENT")
        if not self.sampling.traced(traceparent):
            return None
        parent = _PROPAGATOR.extract(ctx.headers, getter=_Headers) if traceparent is not None else None
        offset_ns = time.time_ns() - time.monotonic_ns()
        span = self.tracer().start_span(operation, context=parent, kind=SpanKind.SERVER,
                                        start_time=int(ctx.started * 1e9) + offset_ns)
        traced = ctx.state[NAME] = Trace(span, offset_ns)
        return traced

    def steps(self, ctx: Any, hook: str) -> Iterator[None]:
        """A hook wrapper's body: the time all plugins took in ``hook``, for a traced request."""
        traced = ctx.state.get(NAME)
        if traced is None:
            return (yield)
        start = time.monotonic()
        try:
            result = yield
        except BaseException as exc:
            traced.steps.append((hook, start, time.monotonic(), exc))
            raise
        traced.steps.append((hook, start, time.monotonic(), None))
        return result

    @hookimpl(wrapper=True)
    def request_start(self, ctx):
        self.begin(ctx)
        return (yield from self.steps(ctx, "request_start"))

    @hookimpl(wrapper=True)
    def request(self, ctx):
        return (yield from self.steps(ctx, "request"))

    @hookimpl(wrapper=True)
    def route(self, ctx):
        return (yield from self.steps(ctx, "route"))

    @hookimpl(wrapper=True)
    def upstream_request(self, ctx):
        result = yield from self.steps(ctx, "upstream_request")
        traced = ctx.state.get(NAME)
        if traced is not None:
            # the call to llama-server, its id the parent llama-server is told of
            traced.upstream = self.tracer().start_span(
                "llama-server", context=trace.set_span_in_context(traced.span, Context()), kind=SpanKind.CLIENT)
            _PROPAGATOR.inject(ctx.upstream_headers, context=trace.set_span_in_context(traced.upstream, Context()))
        else:
            traceparent = ctx.headers.get("TRACEPARENT")
            if traceparent is not None and _TRACEPARENT.match(traceparent):
                ctx.upstream_headers["traceparent"] = traceparent  # passed on, as a hop that traces nothing
        return result

    # --- what the answer says ------------------------------------------------------------

    def wants_events(self, ctx) -> bool:
        # the answer's text, of a traced request, when the operator asked for it; the finish
        # reasons the core reads from undecoded events too (ctx.finish_reasons)
        return self.capture and NAME in ctx.state

    @hookimpl
    def response_event(self, ctx, event):
        traced = ctx.state.get(NAME)
        if traced is None or not self.capture:
            return None
        if traced.response_id is None and isinstance(event.get("id"), str):
            traced.response_id = event["id"]
        if sum(map(len, traced.output)) <= self.max_content_chars:
            traced.output.extend(choice_text(choice) for choice in event.get("choices") or []
                                 if isinstance(choice, dict))
        return None

    @hookimpl
    def response(self, ctx, body):
        traced = ctx.state.get(NAME)
        if traced is None:
            return
        if isinstance(body.get("id"), str):
            traced.response_id = body["id"]
        if self.capture:
            traced.output.extend(choice_text(choice) for choice in body.get("choices") or [] if isinstance(choice, dict))

    @hookimpl
    def complete(self, ctx, outcome):
        traced = ctx.state.pop(NAME, None)
        if traced is None:
            return
        end = traced.at(time.monotonic())
        span = traced.span
        operation = OPERATIONS[ctx.route]
        attributes = request_attributes(ctx, operation)
        attributes.update(response_attributes(ctx, traced, outcome))
        if self.capture:
            prompt = input_messages(ctx.body)
            if prompt is not None:
                attributes["gen_ai.input.messages"] = clipped_json(prompt, self.max_content_chars)
            if traced.output:
                message = {"role": "assistant", "parts": [{"type": "text", "content": "".join(traced.output)}]}
                if ctx.finish_reasons:
                    message["finish_reason"] = ctx.finish_reasons[0]
                attributes["gen_ai.output.messages"] = clipped_json([message], self.max_content_chars)
        # a model the gateway serves: a name the client made up would make one span name per request
        span.update_name(f"{operation} {ctx.model}" if ctx.model else operation)
        span.set_attributes(attributes)
        # events, not spans: a span costs the SDK several times more, and the steps are short
        for hook, start, stop, error in traced.steps:
            step = {"llamagate.duration_ms": (stop - start) * 1000.0}
            if error is not None:
                step["exception.type"] = getattr(error, "code", None) or type(error).__name__
            span.add_event(f"hooks {hook}", step, timestamp=traced.at(start))
        if traced.upstream is not None:
            self.upstream_spans(ctx, traced, end)
        if ctx.error is not None or outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, clip(ctx.error.message) if ctx.error is not None else outcome))
        span.end(end_time=end)

    def upstream_spans(self, ctx: Any, traced: Trace, end: int) -> None:
        """The call to llama-server: the fleet's lease and model load, the admission wait,
        the stream; its answer's headers and first event as events."""
        upstream, marks, tracer = traced.upstream, ctx.marks, self._tracer
        parent = trace.set_span_in_context(upstream, Context())

        def child(name: str, start: float, stop: float, **attributes: Any) -> None:
            span = tracer.start_span(name, context=parent, start_time=traced.at(start), attributes=attributes)
            span.end(end_time=traced.at(stop))

        backend = ctx.backend or ""
        if "fleet.asked" in marks and "fleet.granted" in marks:
            child("fleet lease", marks["fleet.asked"], marks["fleet.granted"], **{"llamagate.backend": backend})
            load_ms = ctx.timings.get(f"fleet.load.{backend}")
            if load_ms is not None:
                child("model load", max(marks["fleet.asked"], marks["fleet.granted"] - load_ms / 1000.0),
                      marks["fleet.granted"], **{"llamagate.backend": backend})
        if "admission.asked" in marks and "admission.granted" in marks:
            child("admission wait", marks["admission.asked"], marks["admission.granted"],
                  **{"llamagate.backend": backend,
                     "llamagate.queue.depth": ctx.gauges.get(f"queue.{backend}", 0)})
        if "upstream.headers" in marks:
            upstream.add_event("upstream headers", timestamp=traced.at(marks["upstream.headers"]))
        first_event = marks.get("upstream.first_event")
        if first_event is not None:
            upstream.add_event("upstream first byte", timestamp=traced.at(first_event))
            child("stream", first_event, (end - traced.offset_ns) / 1e9)
        if ctx.replica:
            upstream.set_attribute("server.address", ctx.replica)
        if ctx.error is not None and ctx.sent:
            upstream.set_status(Status(StatusCode.ERROR, clip(ctx.error.message)))
        upstream.end(end_time=end)
