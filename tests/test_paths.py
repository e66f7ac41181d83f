"""Prefix routes relay the raw path under their prefix, never anything outside it."""

from __future__ import annotations

import json

import pytest
import requests
from urllib3.util.url import _encode_target

from gateway.errors import InvalidRequestError
from gateway.web.paths import check_relay_target, raw_target

PREFIX = "/sdapi"

ESCAPES = [
    # dot segments, plain and in every percent-encoding and case
    "/sdapi/../props", "/sdapi/./props", "/sdapi/..", "/sdapi/.", "/sdapi/v1/../../props",
    "/sdapi/%2e%2e/slots", "/sdapi/%2E%2E/slots", "/sdapi/.%2e/slots", "/sdapi/%2e./slots", "/sdapi/%2E./slots",
    "/sdapi/%2e/slots", "/sdapi/v1/%2e%2e/%2e%2e/metrics",
    # double encoding, overlong UTF-8, full-width dots, path parameters, Windows-style dots
    "/sdapi/%252e%252e/slots", "/sdapi/%25252e%25252e/slots", "/sdapi/%c0%ae%c0%ae/slots",
    "/sdapi/%EF%BC%8E%EF%BC%8E/slots", "/sdapi/..;/props", "/sdapi/..;x=1/props", "/sdapi/.../props",
    "/sdapi/..%20/props", "/sdapi/%2E%2E%3Bx/props",
    # encoded slashes and backslashes inside segments, raw backslashes
    "/sdapi/..%2f..%2fmetrics", "/sdapi/..%2F..%2Fmetrics", "/sdapi/a%2fb", "/sdapi/a%2Fb", "/sdapi/..%5c..%5cmetrics",
    "/sdapi/a%5Cb", "/sdapi/..\\..\\metrics", "/sdapi/a%252fb", "/sdapi/%EF%BC%8F", "/sdapi/%EF%BC%BC",
    # NUL and other control characters, raw or encoded
    "/sdapi/a%00b", "/sdapi/x%00", "/sdapi/x?a=%00", "/sdapi/a%0d%0aX-Injected:%201", "/sdapi/a%0Ab", "/sdapi/a\x00b",
    "/sdapi/a%7Fb",
    # outside the prefix, or the prefix only in decoded form
    "/props", "/sdapi", "/sdapi/", "/sdapix/y", "/sd%61pi/props", "/sdapi%2f../props", "/other/sdapi/x",
    "//sdapi/x", "/x/../sdapi/y",
    # what requests / urllib3 would rewrite: decoded unreserved escapes, lower-case
    # escapes, characters RFC 3986 does not allow, a bare "?", a fragment, a bad escape
    "/sdapi/%41", "/sdapi/x%7E", "/sdapi/caf%c3%a9", "/sdapi/a|b", "/sdapi/a b", "/sdapi/a[b]", "/sdapi/a\"b",
    "/sdapi/a<b>", "/sdapi/a{b}", "/sdapi/a^b", "/sdapi/a`b", "/sdapi/x?", "/sdapi/x#frag", "/sdapi/x%23y#frag",
    "/sdapi/x%zz", "/sdapi/x%2", "/sdapi/x?q=%41", "/sdapi/x?q=%2e", "/sdapi/x?q=a|b", "/sdapi/x?q=%zz",
    "/sdapi/caf\u00e9", "/sdapi/x?q=\u00e9",
    # absolute-form targets are held to the same rules
    "http://evil/sdapi/../props", "http://evil/props", "https://evil", "*", "sdapi/x",
]

RELAYED = [
    "/sdapi/v1/txt2img", "/sdapi/v1/txt2img/", "/sdapi/a%3Fb", "/sdapi/a%3Fb?c=%3F", "/sdapi/a%23b",
    "/sdapi/x?steps=2&cfg=7.5", "/sdapi/x?path=a/b%2Fc&q=a+b%20c", "/sdapi/caf%C3%A9", "/sdapi//x",
    "/sdapi/a;b=c", "/sdapi/.well-known", "/sdapi/..x", "/sdapi/x..", "/sdapi/a.b.c", "/sdapi/%25", "/sdapi/100%25",
    "/sdapi/~user", "/sdapi/a:b@c", "/sdapi/!$&'()*+,;=", "/sdapi/x?a?b", "/sdapi/%2B", "/sdapi/x?q=%0A",
]


def sent_by_requests(target: str) -> str:
    """The request target requests + urllib3 put on the wire for base + target."""
    prepared = requests.Request("GET", "http://127.0.0.1:1" + target).prepare()
    return _encode_target(prepared.path_url)


@pytest.mark.parametrize("target", ESCAPES)
def test_ambiguous_or_escaping_targets_are_refused(target):
    with pytest.raises(InvalidRequestError) as err:
        check_relay_target(target, PREFIX)
    assert err.value.status == 400
    assert err.value.message.startswith("This path cannot be relayed")


@pytest.mark.parametrize("target", RELAYED)
def test_plain_targets_are_relayed_byte_for_byte(target):
    assert check_relay_target(target, PREFIX) == target
    assert sent_by_requests(target) == target  # requests/urllib3 leave it alone


def test_absolute_form_relays_its_path():
    assert check_relay_target("http://gateway:8000/sdapi/x?y=1", PREFIX) == "/sdapi/x?y=1"


def test_raw_target_prefers_the_raw_uri_and_falls_back_to_a_quoted_path():
    assert raw_target({"RAW_URI": "/sdapi/a%2fb?x=1"}, "/sdapi/a/b", "x=1") == "/sdapi/a%2fb?x=1"
    assert raw_target({"REQUEST_URI": "/sdapi/%2e%2e"}, "/sdapi/..", "") == "/sdapi/%2e%2e"
    # Falcon's test client keeps the query apart from RAW_URI
    assert raw_target({"RAW_URI": "/sdapi/x"}, "/sdapi/x", "q=1") == "/sdapi/x?q=1"
    assert raw_target({}, "/sdapi/caf\u00e9/a b", "q=1") == "/sdapi/caf%C3%A9/a%20b?q=1"
    assert raw_target({}, "/sdapi/../props", "") == "/sdapi/../props"  # and then refused


def record_app(seen: list):
    def app(environ, start_response):
        # the in-process server puts the raw request target in PATH_INFO/QUERY_STRING
        if environ.get("HTTP_X_REQUEST_ID"):  # not a health check
            query = environ.get("QUERY_STRING")
            seen.append(environ["PATH_INFO"] + (f"?{query}" if query else ""))
        data = json.dumps({"path": environ["PATH_INFO"]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    return app


@pytest.fixture
def prefix_client(make_client, canned_url):
    from gateway.testing import serve_in_thread

    seen: list[str] = []
    server, url = serve_in_thread(record_app(seen))
    client = make_client(backends={"chat": {"urls": [canned_url]}, "images": {"urls": [url]}},
                         routes={"/v1/chat/completions": "default",
                                 "/sdapi/*": {"pipeline": "default", "backend": "images"}})
    client.seen = seen
    yield client
    server.shutdown()


@pytest.mark.parametrize("target", ["/sdapi/../props", "/sdapi/%2e%2e/slots", "/sdapi/..%2f..%2fmetrics",
                                    "/sdapi/%2E%2E/slots", "/sdapi/v1/..%2F..%2F..%2Fmetrics", "/sdapi/a%00b"])
def test_prefix_route_refuses_paths_that_escape_it(prefix_client, target):
    resp = prefix_client.simulate_get(target)
    assert resp.status_code == 400, (resp.status_code, prefix_client.seen)
    error = resp.json["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert prefix_client.seen == []


def test_prefix_route_keeps_encoded_question_marks_in_the_path(prefix_client):
    resp = prefix_client.simulate_get("/sdapi/a%3Fb%23c", query_string="x=%3F")
    assert resp.status_code == 200
    assert prefix_client.seen == ["/sdapi/a%3Fb%23c?x=%3F"]
