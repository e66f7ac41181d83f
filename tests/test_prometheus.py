"""The prometheus plugin in one process: what it counts, who may scrape, and how the
replicas' own metrics are merged (several workers and real scrapes:
tests/integration/test_prometheus_real.py)."""

from __future__ import annotations

import os
import re

import pytest
from prometheus_client import CollectorRegistry, Gauge

from gateway.config import parse_config
from gateway.pipeline import build_pipelines
import plugins.prometheus as prometheus_plugin
from plugins.prometheus import merge, relabel, set_gauge

from .conftest import config_doc

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
ROUTES = {r: "default" for r in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")}


def sample(text: str, metric: str, **labels: str) -> float:
    """A sample's value in an exposition (0 when absent)."""
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(metric)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


@pytest.fixture
def scraping(make_client):
    def make(**options):
        doc = config_doc("http://127.0.0.1:1", pipelines={"default": [{"prometheus": options}]})
        plugins = build_pipelines(parse_config(doc))["default"].plugins
        return make_client(plugins, routes=dict(ROUTES, **{"/metrics": {"pipeline": "default"}}))
    return make


def test_requests_tokens_and_errors_are_counted_and_the_allowed_address_scrapes(scraping):
    client = scraping(allow_from=["127.0.0.1/32"], scrape_replicas=False)  # falcon's test client is 127.0.0.1
    before = client.simulate_get("/metrics").text
    for _ in range(3):
        assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
    assert client.simulate_post("/v1/chat/completions", json={"model": "nope", "messages": []}).status_code == 404
    after = client.simulate_get("/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    labels = {"route": "/v1/chat/completions", "model": "smollm2", "status": "200"}
    assert sample(after.text, "llamagate_requests_total", **labels) - sample(before, "llamagate_requests_total",
                                                                             **labels) == 3
    assert sample(after.text, "llamagate_requests_total", status="404", model="none") - \
        sample(before, "llamagate_requests_total", status="404", model="none") == 1
    completion = {"model": "smollm2", "kind": "completion"}
    assert sample(after.text, "llamagate_tokens_total", **completion) > sample(before, "llamagate_tokens_total",
                                                                               **completion)
    assert sample(after.text, "llamagate_backend_in_flight", backend="chat") == 0
    assert 'route="/metrics"' not in after.text  # scrapes are not traffic


def test_nobody_else_scrapes(scraping):
    client = scraping(allow_from=["10.0.0.0/8"])
    refused = client.simulate_get("/metrics")
    assert refused.status_code == 403 and refused.json["error"]["code"] == "metrics_forbidden"
    assert "llamagate_" not in refused.text


def test_replica_metrics_are_labelled_and_merged_family_by_family():
    one = ("# HELP llamacpp:prompt_tokens_total Prompt tokens.\n# TYPE llamacpp:prompt_tokens_total counter\n"
           "llamacpp:prompt_tokens_total 10\n# HELP llamacpp:slot_seconds Slot time.\n"
           "# TYPE llamacpp:slot_seconds histogram\nllamacpp:slot_seconds_bucket{le=\"1\"} 2\n"
           "llamacpp:slot_seconds_count 2\n")
    two = one.replace(" 10\n", " 7\n")
    text = merge([relabel(one, {"backend": "chat", "replica": "http://a:1"}),
                  relabel(two, {"backend": "chat", "replica": 'http://b"2'})])
    lines = text.splitlines()
    assert lines.count("# TYPE llamacpp:prompt_tokens_total counter") == 1
    assert 'llamacpp:prompt_tokens_total{backend="chat",replica="http://a:1"} 10' in lines
    assert 'llamacpp:prompt_tokens_total{backend="chat",replica="http://b\\"2"} 7' in lines
    assert 'llamacpp:slot_seconds_bucket{le="1",backend="chat",replica="http://a:1"} 2' in lines
    # a family's lines stay together: both replicas' prompt tokens before the next family's header
    first = lines.index("# HELP llamacpp:slot_seconds Slot time.")
    assert all(lines.index(l) < first for l in lines if l.startswith("llamacpp:prompt_tokens_total"))


def test_saved_kv_states_and_cached_tokens_are_counted():
    from prometheus_client import REGISTRY, generate_latest

    from gateway.context import RequestContext
    from plugins.prometheus import Plugin

    before = generate_latest(REGISTRY).decode()
    ctx = RequestContext(request_id="r", method="POST", route="/v1/chat/completions", model="kvmodel", status=200,
                         usage={"prompt_tokens": 100, "completion_tokens": 2,
                                "prompt_tokens_details": {"cached_tokens": 90}},
                         counters={"kv.saves": 1, "kv.save_bytes": 5000, "kv.restores": 1},
                         timings={"kv.save": 30.0, "kv.restore": 7.0})
    Plugin({"path": "/metrics", "allow_from": [], "scrape_replicas": False, "replica_timeout": 1}).complete(
        ctx, "ok", {})
    after = generate_latest(REGISTRY).decode()
    assert sample(after, "llamagate_tokens_total", model="kvmodel", kind="cached") == 90
    for action in ("save", "restore"):
        assert sample(after, "llamagate_kv_state_seconds_count", action=action) - \
            sample(before, "llamagate_kv_state_seconds_count", action=action) == 1
    saved_bytes = {"name": "kv.save_bytes"}
    assert sample(after, "llamagate_events_total", **saved_bytes) - \
        sample(before, "llamagate_events_total", **saved_bytes) == 5000


def test_a_live_gauge_is_written_when_its_value_changes_and_anew_after_a_fork():
    gauge = Gauge("test_live", "A live gauge.", ["backend"], registry=CollectorRegistry())

    def value() -> float:
        return next(s.value for s in gauge.collect()[0].samples if s.labels == {"backend": "chat"})

    for level in (2, 2, 0, 0, 1, 0):  # a repeated value is not written again, a change always is
        set_gauge(gauge, level, "chat")
        assert value() == level
    child = os.fork()
    if child == 0:  # a new worker has a metrics file of its own, with nothing written yet
        os._exit(0 if not prometheus_plugin._written else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0
