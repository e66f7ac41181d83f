"""Hot reload in-process: a changed pipelines.yaml or keys file swaps the configuration;
a bad one leaves the old serving, logged and counted."""

from __future__ import annotations

import logging
import time

import falcon.testing
import yaml

from gateway import hookimpl
from gateway.storage import keys
from gateway.web.state import Gateway
from gateway.config import load_config
from gateway.pipeline import build_pipelines
from gateway.web.reload import RETIRE_POLL, ReloadingApp, watched_files
from gateway.testing import free_port

from .conftest import config_doc

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


def start(tmp_path, canned_url, **overrides):
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(config_doc(canned_url, **overrides)))
    config = load_config(path)
    app = ReloadingApp(Gateway(config, build_pipelines(config)))
    return path, app, falcon.testing.TestClient(app)


def rewrite(path, change) -> None:
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc) + "\n# edited\n")


def test_a_changed_file_is_swapped_in_for_new_requests(tmp_path, canned_url):
    path, app, client = start(tmp_path, canned_url)
    assert client.simulate_post("/v1/chat/completions", json=dict(CHAT, model="renamed")).status_code == 404
    old = app.gateway
    rewrite(path, lambda doc: doc["models"]["smollm2"].update(aliases=["renamed"]))
    assert app.changed() and app.reload()
    assert app.gateway is not old
    assert client.simulate_post("/v1/chat/completions", json=dict(CHAT, model="renamed")).status_code == 200
    assert not app.changed()
    assert app.gateway.in_flight is old.in_flight  # requests from before stay cancellable


def test_a_bad_file_keeps_the_old_configuration_logs_and_counts_it(tmp_path, canned_url, caplog):
    path, app, client = start(tmp_path, canned_url)
    old = app.gateway
    rewrite(path, lambda doc: doc["backends"]["chat"].update(max_connections=0))
    with caplog.at_level(logging.ERROR, logger="llamagate"):
        assert not app.reload()
    assert app.gateway is old
    assert f"{path}: backends.chat.max_connections: 0 is less than the minimum of 1" in caplog.text
    assert not app.changed()  # the same bad file is not retried every interval

    # counted on the next request's context, for the statsd plugin to send
    assert old.pending_counters == {"config.reload_failed": 1}
    assert client.simulate_post("/v1/chat/completions", json=CHAT).status_code == 200
    assert old.pending_counters == {}


def test_the_keys_file_is_watched_through_the_auth_plugin(tmp_path, canned_url):
    keys_file = tmp_path / "keys.yaml"
    first = keys.add_key(keys_file, "alice")
    path, app, client = start(tmp_path, canned_url, pipelines={"default": [
        {"auth": {"keys_file": str(keys_file), "env_keys": {}}}]})
    assert str(keys_file) in watched_files(app.gateway)
    second = keys.add_key(keys_file, "bob")
    assert client.simulate_get("/v1/models", headers={"Authorization": f"Bearer {second}"}).status_code == 401
    assert app.changed() and app.reload()
    for key in (first, second):
        assert client.simulate_get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    keys.revoke(keys_file, "alice")
    assert app.changed() and app.reload()
    assert client.simulate_get("/v1/models", headers={"Authorization": f"Bearer {first}"}).status_code == 401


def test_a_client_at_its_limit_stays_limited_across_a_reload(tmp_path, canned_url):
    """Each reload used to make fresh plugin instances with fresh memory stores: adding a
    key (`llamagate keys add`) handed every client a new budget."""
    keys_file = tmp_path / "keys.yaml"
    key = keys.add_key(keys_file, "alice")
    path, app, client = start(tmp_path, canned_url, pipelines={"default": [
        {"auth": {"keys_file": str(keys_file), "env_keys": {}}},
        {"ratelimit": {"requests_per_minute": 2, "tokens_per_minute": None}}]})
    headers = {"Authorization": f"Bearer {key}"}
    assert [client.simulate_post("/v1/chat/completions", json=CHAT, headers=headers).status_code
            for _ in range(3)] == [200, 200, 429]
    keys.add_key(keys_file, "bob")
    assert app.changed() and app.reload()
    assert client.simulate_post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 429


def test_a_cached_answer_survives_a_reload(tmp_path, canned_url):
    path, app, client = start(tmp_path, canned_url, pipelines={"default": [{"cache": {"only_deterministic": False}}]})
    assert client.simulate_post("/v1/chat/completions", json=CHAT).headers["x-cache"] == "MISS"
    rewrite(path, lambda doc: doc["models"]["smollm2"].update(aliases=["renamed"]))
    assert app.reload()
    assert client.simulate_post("/v1/chat/completions", json=CHAT).headers["x-cache"] == "HIT"


def test_a_reload_never_doubles_admission(tmp_path, canned_url):
    """Old and new gateways used to each admit up to the limit while the old one drained."""
    path, app, client = start(tmp_path, canned_url,
                              backends={"chat": {"urls": [canned_url], "max_in_flight": 2}})
    old = app.gateway.upstreams.backends["chat"]
    old.admission.in_flight = 2  # two requests of the old configuration still running
    rewrite(path, lambda doc: doc["backends"]["chat"].update(max_in_flight=3))  # a changed backend
    assert app.reload()
    new = app.gateway.upstreams.backends["chat"]
    assert new is not old and new.admission is old.admission and new.limit == 3
    assert new.admission.in_flight == 2
    rewrite(path, lambda doc: doc["models"]["smollm2"].update(aliases=["x"]))  # backend unchanged
    assert app.reload()
    assert app.gateway.upstreams.backends["chat"] is new


def test_a_reload_to_another_redis_moves_every_backends_admission_to_it(tmp_path, canned_url):
    """``shared:`` names another Redis: an unchanged backend used to keep counting its
    slots in the old one, whose link the reload had just stopped."""
    path, app, client = start(tmp_path, canned_url, shared={"redis_url": f"redis://127.0.0.1:{free_port()}/0"},
                              backends={"chat": {"urls": [canned_url], "admission": "redis"}})
    old_link = app.gateway.shared
    assert app.gateway.upstreams.backends["chat"].admission.shared is old_link
    rewrite(path, lambda doc: doc["shared"].update(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    assert app.reload()
    new_link = app.gateway.shared
    try:
        assert new_link is not old_link and old_link._stop.is_set()
        assert app.gateway.upstreams.backends["chat"].admission.shared is new_link
        rewrite(path, lambda doc: doc["models"]["smollm2"].update(aliases=["x"]))  # the same Redis
        assert app.reload()
        assert app.gateway.shared is new_link and app.gateway.upstreams.backends["chat"].admission.shared is new_link
    finally:
        new_link.stop()


def test_a_replaced_configuration_flushes_its_plugins_once_idle(tmp_path, canned_url):
    flushed = []

    class Buffering:
        @hookimpl
        def shutdown(self):
            flushed.append(self)

    path, app, client = start(tmp_path, canned_url)
    app.gateway.pipelines["default"].pm.register(Buffering(), name="buffering")
    old = app.gateway
    old.active = 1  # a request of the old configuration is still running
    rewrite(path, lambda doc: doc["models"]["smollm2"].update(aliases=["x"]))
    assert app.reload()
    time.sleep(3 * RETIRE_POLL)
    assert flushed == []  # not while its request runs
    old.active = 0
    deadline = time.monotonic() + 5
    while not flushed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(flushed) == 1
    app.gateway.pipelines["default"].pm.register(Buffering(), name="buffering")
    app.shutdown()  # the worker exits: the configuration in force flushes too
    assert len(flushed) == 2
