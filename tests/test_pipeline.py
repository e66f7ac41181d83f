"""The plugin engine: call order, short-circuits, containment, events, completion."""

from __future__ import annotations

import json
import logging

import falcon.testing
import pytest

from gateway import GatewayError, RateLimitError, Response, hookimpl
from gateway.context import RequestContext
from gateway.pipeline import Pipeline

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


class Recorder:
    """Records each hook call into a shared list."""

    def __init__(self, name: str, calls: list) -> None:
        self.name = name
        self.calls = calls

    @hookimpl
    def request(self, ctx):
        self.calls.append((self.name, "request"))

    @hookimpl
    def route(self, ctx, backends):
        self.calls.append((self.name, "route"))

    @hookimpl
    def upstream_request(self, ctx, payload):
        self.calls.append((self.name, "upstream_request"))
        payload.setdefault("seen_by", []).append(self.name)

    @hookimpl
    def response(self, ctx, body):
        self.calls.append((self.name, "response"))

    @hookimpl
    def complete(self, ctx, outcome):
        self.calls.append((self.name, "complete", outcome))


def test_yaml_order_is_call_order_for_every_hook(make_client):
    calls: list = []
    client = make_client([("a", Recorder("a", calls)), ("b", Recorder("b", calls)), ("c", Recorder("c", calls))])
    assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
    for hook in ("request", "route", "upstream_request", "response"):
        assert [c[0] for c in calls if c[1] == hook] == ["a", "b", "c"], hook
    assert [c for c in calls if c[1] == "complete"] == [("a", "complete", "ok"), ("b", "complete", "ok"),
                                                         ("c", "complete", "ok")]


class Answer:
    @hookimpl
    def request(self, ctx):
        return Response(body={"cached": True}, events=[{"choices": [], "cached": True}], headers={"X-Cache": "HIT"})


def test_request_hook_answer_short_circuits_later_plugins_and_backend(make_client, dead_url):
    calls: list = []
    client = make_client([("answer", Answer()), ("after", Recorder("after", calls))], backend_url=dead_url)
    resp = client.simulate_post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    assert resp.json == {"cached": True}
    assert resp.headers["x-cache"] == "HIT"
    assert ("after", "request") not in calls
    assert ("after", "complete", "ok") in calls  # complete still runs for everyone

    streamed = client.simulate_post("/v1/chat/completions", json=dict(CHAT, stream=True))
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text == 'data: {"choices":[],"cached":true}\n\ndata: [DONE]\n\n'


class Reject:
    @hookimpl
    def request(self, ctx):
        raise RateLimitError("slow down", headers={"Retry-After": "7"})


def test_plugin_rejects_with_a_gateway_error(make_client):
    calls: list = []
    client = make_client([("reject", Reject()), ("after", Recorder("after", calls))])
    resp = client.simulate_post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 429
    assert resp.json["error"]["code"] == "rate_limit_exceeded"
    assert resp.headers["retry-after"] == "7"
    assert calls == [("after", "complete", "error")]


class Broken:
    def __init__(self, hook: str) -> None:
        self.hook = hook

    @hookimpl
    def request(self, ctx):
        if self.hook == "request":
            raise KeyError("secret internals")

    @hookimpl
    def response(self, ctx, body):
        if self.hook == "response":
            raise RuntimeError("boom")

    @hookimpl
    def complete(self, ctx, outcome):
        raise RuntimeError("complete is broken too")


@pytest.mark.parametrize("hook", ["request", "response"])
def test_plugin_crash_is_contained(make_client, hook, caplog):
    calls: list = []
    client = make_client([("broken", Broken(hook)), ("after", Recorder("after", calls))])
    with caplog.at_level(logging.ERROR, logger="llamagate"):
        resp = client.simulate_post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "rid-1"})
    assert resp.status_code == 500
    error = resp.json["error"]
    assert error["code"] == "plugin_error"
    assert "rid-1" in error["message"]
    assert "secret" not in resp.text and "Traceback" not in resp.text
    # the broken plugin's own complete raised, yet the next plugin's complete ran
    assert ("after", "complete", "error") in calls
    assert any("rid-1" in r.getMessage() for r in caplog.records)
    # and the gateway keeps serving
    assert make_client().simulate_post("/v1/chat/completions", json=CHAT).status_code == 200


class Shout:
    """Upper-cases streamed content and drops the finishing event."""

    @hookimpl
    def response_event(self, ctx, event):
        choice = event["choices"][0] if event.get("choices") else None
        if choice and choice.get("finish_reason"):
            return False
        if choice:
            choice["delta"]["content"] = choice["delta"].get("content", "").upper()


class Count:
    def __init__(self) -> None:
        self.seen = 0

    @hookimpl
    def response_event(self, ctx, event):
        self.seen += 1


def test_response_event_edits_and_drops(make_client):
    count = Count()
    client = make_client([("shout", Shout()), ("count", count)])
    resp = client.simulate_post("/v1/chat/completions",
                                json=dict(CHAT, stream=True, stream_options={"include_usage": True}))
    blocks = [b[len("data: "):] for b in resp.text.split("\n\n") if b]
    assert blocks[-1] == "[DONE]"
    chunks = [json.loads(b) for b in blocks[:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]) == \
        "HELLO FROM THE CANNED BACKEND"
    assert not any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks)  # dropped
    assert all(c["model"] == "smollm2" for c in chunks)
    assert count.seen == 6  # 5 words + usage event; the dropped one never reached it
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_pipeline_without_event_hooks_relays_raw(make_client):
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions")
    assert not Pipeline("p", [("r", Recorder("r", []))]).wants_events(ctx)
    assert Pipeline("p", [("c", Count())]).wants_events(ctx)  # no wants_events: every request

    class Sometimes(Count):
        def wants_events(self, ctx):
            return ctx.stream

    assert not Pipeline("p", [("s", Sometimes())]).wants_events(ctx)
    ctx.stream = True
    assert Pipeline("p", [("s", Sometimes())]).wants_events(ctx)


class Usage:
    def __init__(self) -> None:
        self.usage = None
        self.outcome = None

    @hookimpl
    def complete(self, ctx, outcome):
        self.usage, self.outcome = ctx.usage, outcome
        self.ttfb, self.bytes_out, self.status = ctx.ttfb_ms, ctx.bytes_out, ctx.status


def test_complete_sees_usage_status_and_timings_of_a_raw_stream(make_client):
    usage = Usage()
    client = make_client([("usage", usage)])
    resp = client.simulate_post("/v1/chat/completions",
                                json=dict(CHAT, stream=True, stream_options={"include_usage": True}))
    assert usage.outcome == "ok"
    assert usage.usage == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert usage.status == 200
    assert usage.bytes_out == len(resp.content)
    assert usage.ttfb is not None and usage.ttfb >= 0


def test_complete_runs_once_with_client_gone_when_body_is_abandoned(make_client):
    usage = Usage()
    calls: list = []
    client = make_client([("usage", usage), ("rec", Recorder("rec", calls))])
    result = falcon.testing.StartResponseMock()
    env = falcon.testing.create_environ(path="/v1/chat/completions", method="POST",
                                        body=json.dumps(dict(CHAT, stream=True)))
    body = client.app(env, result)
    next(iter(body))  # the first chunk goes out, then the client disconnects
    body.close()
    body.close()  # a second close must not run complete again
    assert usage.outcome == "client_gone"
    assert [c for c in calls if c[1] == "complete"] == [("rec", "complete", "client_gone")]


def test_gateway_error_renders_openai_shape():
    error = GatewayError("nope", type="x", code="y", param="z", status=418)
    assert error.to_dict() == {"error": {"message": "nope", "type": "x", "param": "z", "code": "y"}}


def test_gateway_asks_for_usage_on_streams_and_hides_it_unless_asked(make_client):
    usage = Usage()

    class Payload:
        @hookimpl
        def upstream_request(self, ctx, payload):
            self.payload = payload

    seen = Payload()
    client = make_client([("usage", usage), ("payload", seen)])
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, stream=True, stream_options={"x": 1}))
    assert seen.payload["stream_options"] == {"x": 1, "include_usage": True}
    assert usage.usage == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert '"usage"' not in resp.text  # the client did not ask for it
    assert resp.text.endswith("data: [DONE]\n\n")
    client.simulate_post("/v1/embeddings", json={"model": "smollm2", "input": "x"})
    assert "stream_options" not in seen.payload


def test_hooks_are_called_as_pluggy_calls_them_wrappers_and_tryfirst_included():
    """The pipeline calls hooks through pluggy's own dispatch: its order, firstresult
    and wrappers."""
    calls: list = []

    class Late:
        @hookimpl(trylast=True)
        def request(self, ctx):
            calls.append("late")
            return Response(body={"from": "late"})

    class Early:
        @hookimpl(tryfirst=True)
        def request(self, ctx):
            calls.append("early")

    class Wrapper:
        @hookimpl(wrapper=True)
        def request(self, ctx):
            calls.append("wrapper in")
            answer = yield
            calls.append("wrapper out")
            return answer

    plain = Pipeline("p", [("late", Late()), ("early", Early()), ("a", Recorder("a", calls))])
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions")
    assert plain.request(ctx, {}).body == {"from": "late"}
    assert calls == ["early", ("a", "request"), "late"]
    assert plain.request(ctx, {}).body == plain.pm.hook.request(ctx=ctx, backends={}).body  # pluggy agrees
    calls.clear()
    wrapped = Pipeline("p", [("late", Late()), ("wrapper", Wrapper()), ("early", Early())])
    assert wrapped.request(ctx, {}).body == {"from": "late"}
    assert calls == ["wrapper in", "early", "late", "wrapper out"]


def test_every_hook_call_goes_through_pluggy_so_its_monitoring_sees_it():
    """No dispatch of our own: pluggy's add_hookcall_monitoring (tracing) sees every
    hook call of a request, complete and shutdown included, with pluggy's results."""
    calls: list = []

    class Events:
        @hookimpl
        def response_event(self, ctx, event):
            return False

        @hookimpl
        def shutdown(self):
            calls.append("shutdown")

    pipeline = Pipeline("p", [("a", Recorder("a", calls)), ("e", Events())])
    seen: list = []
    pipeline.pm.add_hookcall_monitoring(lambda name, impls, kwargs: seen.append(("before", name, len(impls))),
                                        lambda outcome, name, impls, kwargs: seen.append(("after", name)))
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions")
    pipeline.request_start(ctx)
    pipeline.request(ctx, {})
    pipeline.route(ctx, {})
    pipeline.upstream_request(ctx, {})
    pipeline.response(ctx, {})
    assert pipeline.response_event(ctx, {}) is False  # dropped, as pluggy's firstresult says
    pipeline.complete(ctx, "ok", {})
    pipeline.shutdown()
    names = [name for when, name, *_ in seen if when == "before"]
    assert names == ["request_start", "request", "route", "upstream_request", "response", "response_event",
                     "complete", "shutdown"]
    assert ("after", "complete") in seen and calls[-1] == "shutdown"


def test_a_crashing_complete_does_not_stop_the_others(caplog):
    """One pluggy call runs every complete; one that raises is logged with the request id."""
    calls: list = []

    class Crash:
        @hookimpl
        def complete(self, ctx):
            raise RuntimeError("boom")

    class CrashWithoutContext:
        @hookimpl
        def complete(self, outcome):
            raise RuntimeError("bang")

    pipeline = Pipeline("p", [("crash", Crash()), ("quiet", CrashWithoutContext()), ("a", Recorder("a", calls))])
    seen: list = []
    pipeline.pm.add_hookcall_monitoring(lambda name, impls, kwargs: seen.append([impl.plugin_name for impl in impls]),
                                        lambda *args: None)
    with caplog.at_level(logging.ERROR, logger="llamagate"):
        pipeline.complete(RequestContext(request_id="req-7", method="POST", route="/v1/chat/completions"), "ok", {})
    assert calls == [("a", "complete", "ok")]
    assert sorted(seen[0]) == ["a", "crash", "quiet"] and len(seen) == 1
    failures = [r for r in caplog.records if "failed in complete hook" in r.getMessage()]
    assert [r.getMessage().split("plugin ", 1)[1] for r in failures] == ["crash failed in complete hook",
                                                                          "quiet failed in complete hook"]
    assert "req-7" in caplog.text and "boom" in caplog.text and "bang" in caplog.text
    # the plugins' own implementations, in pluggy's manager, are untouched
    with pytest.raises(RuntimeError):
        pipeline.pm.hook.complete(ctx=RequestContext(request_id="r", method="GET", route="/"), outcome="ok", backends={})
