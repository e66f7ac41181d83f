"""The core's routes and request flow, in-process against a canned llama-server."""

from __future__ import annotations

import json

import pytest

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


def events_of(text: str) -> list[str]:
    return [block[len("data: "):] for block in text.split("\n\n") if block]


def assert_openai_error(resp, status: int, code=None, param=None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code
    assert error["param"] == param
    return error


def test_chat_answer_is_normalized_to_openai_shape(client):
    resp = client.simulate_post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    body = resp.json
    assert body["model"] == "smollm2"  # not the backend's own model name
    choice = body["choices"][0]
    assert choice["logprobs"] is None
    assert choice["message"]["refusal"] is None
    assert choice["message"]["content"] == "Hello from the canned backend"
    assert resp.headers["content-length"] == str(len(resp.content))


def test_alias_resolves_to_public_model_id(client):
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, model="gpt-4o-mini"))
    assert resp.status_code == 200
    assert resp.json["model"] == "smollm2"


def test_stream_is_relayed_with_public_model_and_done(client):
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, stream=True))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    events = events_of(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["model"] == "smollm2" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello from the canned backend"


def test_stream_cut_by_backend_ends_with_error_event(client):
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, stream=True, canned={"cut_after": 2}))
    events = events_of(resp.text)
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["type"] == "server_error"
    assert "incomplete" in last["error"]["message"]
    assert len(events) == 3  # two content events, then the error


def test_request_id_is_kept_sent_upstream_and_echoed(client):
    resp = client.simulate_post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc-123.X_y"})
    assert resp.headers["x-request-id"] == "abc-123.X_y"
    # The canned backend echoes the X-Request-Id it received as system_fingerprint.
    assert resp.json["system_fingerprint"] == "abc-123.X_y"


def test_request_id_is_made_when_absent(client):
    first = client.simulate_get("/v1/models").headers["x-request-id"]
    second = client.simulate_get("/v1/models").headers["x-request-id"]
    assert first and second and first != second


@pytest.mark.parametrize("bad", ["a" * 129, "has space", "semi;colon"])
def test_invalid_request_id_is_rejected(client, bad):
    resp = client.simulate_get("/v1/models", headers={"X-Request-Id": bad})
    assert_openai_error(resp, 400, param="x-request-id")
    assert resp.headers["x-request-id"] != bad


def test_models_list_and_retrieve(client):
    listing = client.simulate_get("/v1/models").json
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["smollm2"]
    assert set(listing["data"][0]) == {"id", "object", "created", "owned_by"}
    assert client.simulate_get("/v1/models/gpt-4o-mini").json["id"] == "smollm2"
    assert_openai_error(client.simulate_get("/v1/models/nope"), 404, code="model_not_found", param="model")


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "could not parse"),
    (b"[1, 2]", "must be a JSON object"),
    (b"\"text\"", "must be a JSON object"),
    (b"", "no body"),
    (b"{\"model\": \"\xff\xfe\"}", "UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_bad_json_bodies_get_400(client, body, fragment):
    resp = client.simulate_post("/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    error = assert_openai_error(resp, 400)
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def test_missing_model_gets_400_naming_the_param(client):
    assert_openai_error(client.simulate_post("/v1/chat/completions", json={"messages": []}), 400, param="model")


def test_unknown_model_gets_404_model_not_found(client):
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, model="gpt-9"))
    error = assert_openai_error(resp, 404, code="model_not_found", param="model")
    assert "gpt-9" in error["message"]


def test_oversized_body_gets_413_from_content_length(make_client):
    client = make_client(max_body_bytes=1000)
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, pad="x" * 2000))
    assert_openai_error(resp, 413, code="request_too_large")


def test_no_reachable_backend_gets_503_with_retry_after(make_client, dead_url):
    client = make_client(backend_url=dead_url)
    resp = client.simulate_post("/v1/chat/completions", json=CHAT)
    assert_openai_error(resp, 503, code="service_unavailable")
    assert int(resp.headers["retry-after"]) >= 1


def test_failover_to_the_next_replica_on_connection_refused(make_client, canned_url, dead_url):
    client = make_client(backends={"chat": {"urls": [dead_url, canned_url]}})
    for _ in range(3):
        assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200


def test_backend_error_becomes_openai_error_shape(client):
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, canned={"status": 400}))
    error = assert_openai_error(resp, 400)  # llama-server's int code is dropped; param is null
    assert error["message"] == "canned error 400"


def test_backend_503_carries_retry_after(client):
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, canned={"status": 503}))
    assert_openai_error(resp, 503)
    assert resp.headers["retry-after"]


def test_unknown_route_and_wrong_method(client):
    error = assert_openai_error(client.simulate_post("/v1/nope", json={}), 404, code="unknown_url")
    assert "/v1/nope" in error["message"]
    resp = client.simulate_get("/v1/chat/completions")
    assert_openai_error(resp, 405, code="method_not_allowed")
    assert "POST" in resp.headers["allow"]


def test_completions_and_embeddings_routes(client):
    resp = client.simulate_post("/v1/completions", json={"model": "smollm2", "prompt": "Hi"})
    assert resp.json["choices"][0]["text"] == "Hello from the canned backend"
    assert resp.json["choices"][0]["logprobs"] is None
    resp = client.simulate_post("/v1/embeddings", json={"model": "smollm2", "input": ["a", "b"]})
    assert resp.json["model"] == "smollm2"
    assert [d["index"] for d in resp.json["data"]] == [0, 1]


def test_health_reports_each_backend(make_client, canned_url, dead_url):
    client = make_client(backends={"chat": {"urls": [canned_url]}, "other": {"urls": [dead_url]}},
                         models={"smollm2": {"backend": "chat"}, "m2": {"backend": "other"}})
    assert client.simulate_get("/health").status_code == 503  # nothing checked yet
    client.gateway.upstreams.check_all()
    resp = client.simulate_get("/health")
    assert resp.status_code == 503
    assert resp.json["models"] == {"smollm2": True, "m2": False}
    assert resp.json["backends"]["other"]["replicas"][0]["detail"].startswith("unreachable")
    assert resp.headers["retry-after"]

    healthy = make_client()
    healthy.gateway.upstreams.check_all()
    resp = healthy.simulate_get("/health")
    assert resp.status_code == 200
    assert resp.json["status"] == "ok"


def test_prefix_route_relays_any_method_and_path_with_the_pipeline_in_front(make_client, canned_url, echo_url):
    from gateway import AuthenticationError, hookimpl

    class Gate:
        @hookimpl
        def request(self, ctx):
            if ctx.headers.get("AUTHORIZATION") != "Bearer ok":
                raise AuthenticationError("no")

    client = make_client([("gate", Gate())], backends={"chat": {"urls": [canned_url]}, "images": {"urls": [echo_url]}},
                         routes={"/v1/chat/completions": "default", "/sdapi/*": {"pipeline": "default",
                                                                                  "backend": "images"}})
    resp = client.simulate_put("/sdapi/v1/txt2img", query_string="steps=2", body=b"raw bytes",
                               headers={"Authorization": "Bearer ok", "X-Request-Id": "img-1"})
    assert resp.status_code == 201
    assert resp.headers["content-type"] == "application/x-echo"
    assert resp.json == {"method": "PUT", "path": "/sdapi/v1/txt2img", "query": "steps=2", "body": "raw bytes",
                         "request_id": "img-1", "authorization": None}  # the gateway's key stays here
    assert client.simulate_get("/sdapi/anything").status_code == 401


def test_prefix_route_config_errors():
    from gateway.config import ConfigError, parse_config

    from .conftest import config_doc

    with pytest.raises(ConfigError) as err:
        parse_config(config_doc("http://127.0.0.1:1", routes={"/sdapi/*": "default"}))
    assert "a prefix route (ending in /*) {pipeline, backend}" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config(config_doc("http://127.0.0.1:1", routes={"/sdapi/*": {"pipeline": "default", "backend": "x"}}))
    assert "routes./sdapi/*.backend: no backend named 'x'" in str(err.value)


def test_usage_of_several_choices_is_recounted(client):
    # llama-server counts one choice's completion tokens; the gateway counts them all
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, n=3))
    assert len(resp.json["choices"]) == 3
    assert resp.json["usage"] == {"prompt_tokens": 5, "completion_tokens": 15, "total_tokens": 20}
    single = client.simulate_post("/v1/chat/completions", json=CHAT)
    assert single.json["usage"]["completion_tokens"] == 5


def test_health_detail_can_be_turned_off(make_client):
    client = make_client(health_detail=False)
    client.gateway.upstreams.check_all()
    body = client.simulate_get("/health").json
    assert body == {"status": "ok", "models": {"smollm2": True}}


def test_without_a_router_plugin_requests_take_the_replicas_in_turn(make_client):
    from gateway.testing import FakeBackend

    first, second = FakeBackend(), FakeBackend()
    try:
        client = make_client(backends={"chat": {"urls": [first.url, second.url]}})
        for _ in range(4):
            assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
        assert (len(first.requests), len(second.requests)) == (2, 2)
    finally:
        first.close()
        second.close()


def test_a_key_restricted_to_some_models_sees_only_those(tmp_path, canned_url):
    """It used to list every model and read /v1/models/{id} of the others."""
    from falcon.testing import TestClient

    from gateway.storage import keys
    from gateway.web.app import build_app
    from gateway.web.state import Gateway
    from gateway.config import parse_config

    from .conftest import config_doc

    keys_file = tmp_path / "keys.yaml"
    narrow = keys.add_key(keys_file, "alice", models=["smollm2"])
    wide = keys.add_key(keys_file, "bob")
    doc = config_doc(canned_url, pipelines={"default": [{"auth": {"keys_file": str(keys_file), "env_keys": {}}}]})
    doc["models"]["secret-model"] = {"backend": "chat", "aliases": ["hidden-alias"]}
    client = TestClient(build_app(Gateway(parse_config(doc))))

    def get(path, key):
        return client.simulate_get(path, headers={"Authorization": f"Bearer {key}"})

    assert [m["id"] for m in get("/v1/models", narrow).json["data"]] == ["smollm2"]
    assert {m["id"] for m in get("/v1/models", wide).json["data"]} == {"smollm2", "secret-model"}
    for name in ("secret-model", "hidden-alias"):
        hidden = get(f"/v1/models/{name}", narrow)
        assert hidden.status_code == 404 and hidden.json["error"]["code"] == "model_not_found"
        assert get(f"/v1/models/{name}", wide).status_code == 200
    assert get("/v1/models/smollm2", narrow).status_code == 200


def test_a_finished_request_leaves_nothing_for_the_cycle_collector(client):
    """While a request lasts, its exchange and Falcon's request and response refer to each
    other (req.context, the body's close); once it completed, all of it is freed by
    reference counting at once, not left for the cycle collector to find (a cost on every
    request, and memory under load)."""
    import gc

    from gateway.web.exchange import Exchange

    assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200  # imports, pools warm
    gc.collect()
    gc.disable()
    try:
        for stream in (False, True):
            assert client.simulate_post("/v1/chat/completions", json=dict(CHAT, stream=stream)).status_code == 200
        assert client.simulate_get("/v1/models").status_code == 200
        left = [obj for obj in gc.get_objects() if isinstance(obj, Exchange)]
    finally:
        gc.enable()
    assert left == []
