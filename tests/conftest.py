"""Fixtures shared by all the tests (tests/integration included): a canned llama-server,
an echoing upstream for prefix routes, and (unit tests) a gateway in-process on them."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import falcon.testing
import pytest

from gateway import settings
from gateway.backends import slots
from gateway.web.app import build_app
from gateway.web.state import Gateway
from gateway.config import Config, parse_config
from gateway.pipeline import Pipeline
from gateway.storage.stores import reset_memory_stores
from gateway.testing import canned_llama_app, free_port, pipelines_doc, serve_in_thread, url_backend


@pytest.fixture(autouse=True)
def fresh_memory_stores() -> None:
    """Each test starts with empty memory stores, as a new worker process would."""
    reset_memory_stores()


@pytest.fixture(autouse=True)
def fresh_settings():
    """Each test reads the settings from its own environment (monkeypatch.setenv before
    the first ``settings.current()``; call ``settings.reset()`` after a later change)."""
    settings.reset()
    yield
    settings.reset()


@pytest.fixture(autouse=True)
def fresh_slot_table(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's in-process gateway records llama-server slots in a table of its own, as a
    fresh host would (the default folder is shared by every gateway of the user)."""
    monkeypatch.setattr(slots, "_table", slots.SlotTable(str(tmp_path_factory.mktemp("slots"))))


@pytest.fixture(scope="session")
def canned_url() -> Iterator[str]:
    """The kit's canned llama-server (gateway.testing), on a loopback port for the session."""
    server, url = serve_in_thread(canned_llama_app)
    yield url
    server.shutdown()


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """An 'image server' that answers with what it received."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    seen = {"method": environ["REQUEST_METHOD"], "path": environ["PATH_INFO"], "query": environ.get("QUERY_STRING"),
            "body": environ["wsgi.input"].read(length).decode(), "request_id": environ.get("HTTP_X_REQUEST_ID"),
            "authorization": environ.get("HTTP_AUTHORIZATION")}
    data = json.dumps(seen).encode()
    start_response("201 Created", [("Content-Type", "application/x-echo"), ("Content-Length", str(len(data)))])
    return [data]


@pytest.fixture(scope="session")
def echo_url() -> Iterator[str]:
    """:func:`echo_app` on a loopback port for the session."""
    server, url = serve_in_thread(echo_app)
    yield url
    server.shutdown()


def config_doc(backend_url: str, **overrides: Any) -> dict[str, Any]:
    """A pipelines.yaml document with one model on ``backend_url``; ``overrides`` replace
    top-level keys."""
    return pipelines_doc({"chat": url_backend(backend_url, connect_timeout=2)},
                         {"smollm2": {"backend": "chat", "aliases": ["gpt-4o-mini"]}},
                         **{"timeouts": {"first_byte": 5, "idle": 5, "retry_deadline": 0.5}, **overrides})


@pytest.fixture
def make_client(canned_url: str) -> Callable[..., falcon.testing.TestClient]:
    """Build a TestClient for a gateway whose default pipeline holds ``plugins``
    (``(label, instance)`` pairs); config keys may be overridden."""

    def make(plugins: list[tuple[str, Any]] | None = None, backend_url: str | None = None,
             **overrides: Any) -> falcon.testing.TestClient:
        config: Config = parse_config(config_doc(backend_url or canned_url, **overrides))
        gateway = Gateway(config, {"default": Pipeline("default", plugins or [])})
        client = falcon.testing.TestClient(build_app(gateway))
        client.gateway = gateway
        return client

    return make


@pytest.fixture
def client(make_client: Callable[..., falcon.testing.TestClient]) -> falcon.testing.TestClient:
    return make_client()


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"
