"""The otel plugin in one process, its spans caught by the SDK's in-memory exporter: the
GenAI attributes, the client's trace, sampling, the child spans drawn from the context's
marks, content capture. The real gateway and a real OTLP receiver:
tests/integration/test_otel_real.py."""

from __future__ import annotations

import secrets
import socket
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.config import parse_config
from gateway.context import Principal, RequestContext
from gateway.errors import AuthenticationError
from gateway.pipeline import build_pipelines
from gateway.plugin import hookimpl
from gateway.testing import Harness
import plugins.otel as otel

from .conftest import config_doc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SAMPLED = {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}


def traced(**options) -> tuple[otel.Plugin, InMemorySpanExporter]:
    """The plugin as ``pipelines.yaml`` would make it, exporting into memory."""
    doc = config_doc("http://127.0.0.1:1", pipelines={"default": [{"otel": {"sample_ratio": 1.0, **options}}]})
    plugin = build_pipelines(parse_config(doc))["default"].plugins[0][1]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    plugin.use(provider)
    return plugin, exporter


class Caller:
    """An auth stand-in: every request is alice's; ``refuse`` makes it a 401."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse

    @hookimpl
    def request_start(self, ctx):
        if self.refuse:
            raise AuthenticationError("No key.")
        ctx.principal = Principal("alice", key_id="abc123")


def by_name(spans) -> dict[str, object]:
    return {span.name: span for span in spans}


def test_a_streamed_chat_is_one_trace_in_the_clients_with_the_genai_attributes():
    plugin, exporter = traced()
    with Harness([plugin, Caller()]) as harness:
        result = harness.chat("Hi there", headers=SAMPLED, stream=True, max_tokens=7, temperature=0.5, top_p=0.9,
                              stream_options={"include_usage": True})
    assert result.status == 200 and result.done
    spans = exporter.get_finished_spans()
    assert {format(span.context.trace_id, "032x") for span in spans} == {TRACE_ID}
    named = by_name(spans)
    root = named["chat test-model"]
    assert root.kind == SpanKind.SERVER and format(root.parent.span_id, "016x") == CLIENT_SPAN
    attributes = dict(root.attributes)
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "llama.cpp"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "test-model"
    assert (attributes["gen_ai.request.max_tokens"], attributes["gen_ai.request.temperature"],
            attributes["gen_ai.request.top_p"]) == (7, 0.5, 0.9)
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.usage.input_tokens"] == result.ctx.usage["prompt_tokens"] == 5
    assert attributes["gen_ai.usage.output_tokens"] == result.ctx.usage["completion_tokens"] > 0
    assert attributes["llamagate.client"] == "alice" and attributes["llamagate.request_id"] == result.ctx.request_id
    assert attributes["http.response.status_code"] == 200 and "error.type" not in attributes
    assert "gen_ai.input.messages" not in attributes and "gen_ai.output.messages" not in attributes
    # the hooks' steps and the call to llama-server, under the request's span
    upstream = named["llama-server"]
    assert upstream.kind == SpanKind.CLIENT and upstream.parent.span_id == root.context.span_id
    steps = {event.name: event for event in root.events}
    assert list(steps) == ["hooks request_start", "hooks request", "hooks route", "hooks upstream_request"]
    assert all(step.attributes["llamagate.duration_ms"] >= 0 for step in steps.values())
    for child in ("admission wait", "stream"):
        assert named[child].parent.span_id == upstream.context.span_id
    assert [event.name for event in upstream.events] == ["upstream headers", "upstream first byte"]
    # on one timeline: the request's arrival to its end holds every step, in order
    assert root.start_time <= steps["hooks request_start"].timestamp <= named["admission wait"].start_time
    assert named["admission wait"].end_time <= named["stream"].start_time <= named["stream"].end_time <= root.end_time
    # llama-server is told the call's span as the parent
    assert result.ctx.upstream_headers["traceparent"] == f"00-{TRACE_ID}-{upstream.context.span_id:016x}-01"


def test_the_cached_prompt_tokens_are_counted():
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions", model="m",
                         usage={"prompt_tokens": 40, "completion_tokens": 3,
                                "prompt_tokens_details": {"cached_tokens": 32}})
    attributes = otel.response_attributes(ctx, otel.Trace(None, 0), "ok")
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 32
    assert attributes["gen_ai.usage.input_tokens"] == 40 and "gen_ai.response.model" not in attributes  # not sent


def test_an_untraced_request_builds_no_span_and_passes_the_clients_traceparent_on():
    plugin, exporter = traced(sample_ratio=0.0)
    with Harness([plugin]) as harness:
        result = harness.chat(headers=SAMPLED, stream=True)  # sampled by the client: not followed
        assert result.status == 200
        assert not harness.wants_events(headers=SAMPLED)  # its stream is relayed undecoded
        bad = harness.chat(headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01 extra"})
    assert exporter.get_finished_spans() == ()
    assert otel.NAME not in result.ctx.state
    assert result.ctx.upstream_headers == {"traceparent": SAMPLED["traceparent"]}
    assert bad.status == 200 and bad.ctx.upstream_headers == {}  # not a traceparent: not passed on


def test_the_clients_sampled_flag_decides_only_when_followed():
    plugin, exporter = traced(sample_ratio=0.0, follow_client_sampling=True)
    with Harness([plugin]) as harness:
        harness.chat(headers=SAMPLED)
        harness.chat(headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-00"})
        harness.chat()
    roots = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]
    assert len(roots) == 1 and format(roots[0].context.trace_id, "032x") == TRACE_ID


def test_a_clients_trace_is_kept_as_the_sdks_trace_id_ratio_would_keep_it():
    from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased

    sampling, sdk = otel.Sampling(0.3, follow_client=False), TraceIdRatioBased(0.3)
    for _ in range(500):
        trace_id = secrets.token_hex(16)
        kept = sdk.should_sample(None, int(trace_id, 16), "x").decision == Decision.RECORD_AND_SAMPLE
        assert sampling.traced(f"00-{trace_id}-{CLIENT_SPAN}-00") == kept
    following = otel.Sampling(0.0, follow_client=True)
    assert following.traced(f"00-{TRACE_ID}-{CLIENT_SPAN}-01") and not following.traced(f"00-{TRACE_ID}-{CLIENT_SPAN}-00")
    assert not following.traced(f"ff-{TRACE_ID}-{CLIENT_SPAN}-01")  # not a traceparent: a trace of its own


def test_the_ratio_keeps_about_its_share():
    plugin, exporter = traced(sample_ratio=0.25)
    with Harness([plugin]) as harness:
        for _ in range(200):
            harness.request("POST", "/v1/chat/completions", json={"model": "test-model"})  # 400: no messages
    roots = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]
    assert 25 <= len(roots) <= 75


def test_a_refused_request_is_an_error_span_and_the_step_that_refused_it_says_so():
    plugin, exporter = traced()
    with Harness([plugin, Caller(refuse=True)]) as harness:
        result = harness.chat()
    assert result.status == 401
    named = by_name(exporter.get_finished_spans())
    root = named["chat"]  # refused on its headers: its body, which names the model, never read
    assert root.status.status_code == StatusCode.ERROR
    assert root.attributes["error.type"] == result.ctx.error.code
    assert root.attributes["http.response.status_code"] == 401
    refused = next(event for event in root.events if event.name == "hooks request_start")
    assert refused.attributes["exception.type"] == result.ctx.error.code
    assert "llama-server" not in named


def test_only_model_routes_are_traced():
    plugin, exporter = traced()
    with Harness([plugin]) as harness:
        assert harness.request("GET", "/v1/models").status == 200
        assert harness.request("POST", "/v1/embeddings", json={"model": "test-model", "input": "x"}).status == 200
    assert [span.name for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER] == \
        ["embeddings test-model"]


def test_prompts_and_answers_only_when_asked():
    plugin, exporter = traced(capture_content=True, max_content_chars=200)
    with Harness([plugin]) as harness:
        harness.chat("What is two and two?", stream=True)
        harness.chat("x" * 500)
    streamed, plain = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]
    assert "What is two and two?" in streamed.attributes["gen_ai.input.messages"]
    assert '"role": "assistant"' in streamed.attributes["gen_ai.output.messages"]
    assert plain.attributes["gen_ai.input.messages"].endswith("chars]")  # clipped
    assert len(plain.attributes["gen_ai.input.messages"]) < 260


def test_the_fleets_lease_and_model_load_come_from_the_contexts_marks():
    plugin, exporter = traced()
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions", model="m", backend="chat")
    assert plugin.begin(ctx) is not None
    trace = ctx.state[otel.NAME]
    trace.upstream = plugin.tracer().start_span("llama-server")
    now = time.monotonic()
    ctx.marks.update({"fleet.asked": now, "fleet.granted": now + 2.0, "admission.asked": now + 2.0,
                      "admission.granted": now + 2.5})
    ctx.timings["fleet.load.chat"] = 1500.0
    plugin.complete(ctx, "ok")
    named = by_name(exporter.get_finished_spans())
    lease, load = named["fleet lease"], named["model load"]
    assert (lease.end_time - lease.start_time) == pytest.approx(2e9, rel=1e-3)
    assert (load.end_time - load.start_time) == pytest.approx(1.5e9, rel=1e-3) and load.end_time == lease.end_time
    assert named["admission wait"].start_time == lease.end_time
    assert "stream" not in named  # no first event: no stream


def test_what_a_client_chose_is_cut_short_and_an_unknown_model_is_not_a_span_name():
    plugin, exporter = traced()
    with Harness([plugin]) as harness:
        assert harness.request("POST", "/v1/chat/completions", json={
            "model": "m" * 5000, "messages": [{"role": "user", "content": "x"}]}).status == 404
        assert harness.chat(stop=["s" * 5000] * 50).status == 200
    unknown, stopped = [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]
    assert unknown.name == "chat" and len(unknown.attributes["gen_ai.request.model"]) < 300
    assert len(unknown.status.description) < 300
    stops = stopped.attributes["gen_ai.request.stop_sequences"]
    assert len(stops) == otel.MAX_STOP_SEQUENCES and all(len(stop) < 300 for stop in stops)


def test_request_parameters_are_read_from_the_body_only_when_they_are_numbers():
    ctx = RequestContext(request_id="r", method="POST", route="/v1/completions", requested_model="raw",
                         body={"max_completion_tokens": 9, "temperature": "hot", "top_p": True, "stop": ["\n"],
                               "seed": 3})
    attributes = otel.request_attributes(ctx, "text_completion")
    assert attributes["gen_ai.request.model"] == "raw" and attributes["gen_ai.request.max_tokens"] == 9
    assert "gen_ai.request.temperature" not in attributes and "gen_ai.request.top_p" not in attributes
    assert attributes["gen_ai.request.stop_sequences"] == ["\n"] and attributes["gen_ai.request.seed"] == 3


def test_a_worker_exit_waits_for_a_silent_collector_no_longer_than_the_timeout():
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        plugin, _ = traced(endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}/v1/traces", timeout=0.5,
                           schedule_delay=60)
        plugin.use(*otel.exporting_provider(plugin.config))
        tracer = plugin.tracer()
        for _ in range(2000):  # four batches: the SDK alone would wait for each in turn
            tracer.start_span("x").end()
        start = time.monotonic()
        plugin.shutdown()
        assert time.monotonic() - start < 1.0
    finally:
        silent.close()
