"""gateway.testing.pipelines_doc: the one builder of the tests' pipelines.yaml documents."""

from __future__ import annotations

from gateway.config import OPENAI_ROUTES, parse_config
from gateway.testing import launched_backend, openai_routes, pipelines_doc, url_backend


def test_a_document_parses_with_one_pipeline_on_the_openai_routes():
    doc = pipelines_doc({"chat": url_backend("http://127.0.0.1:1", "http://127.0.0.1:2", connect_timeout=2)},
                        {"smollm2": "chat", "other": {"backend": "chat", "aliases": ["gpt-4o-mini"]}},
                        pipeline=["router"], timeouts={"first_byte": 5})
    config = parse_config(doc)
    assert config.backends["chat"].urls == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert config.backends["chat"].connect_timeout == 2 and config.timeouts.first_byte == 5
    assert {m: config.models[m].backend for m in ("smollm2", "other")} == {"smollm2": "chat", "other": "chat"}
    assert doc["routes"] == {route: "default" for route in OPENAI_ROUTES} == openai_routes()
    assert doc["pipelines"] == {"default": ["router"]}


def test_a_key_given_as_it_is_replaces_the_built_one():
    """So that a helper built on it (tests/conftest.py's config_doc) passes its caller's keys on."""
    doc = pipelines_doc({"chat": url_backend("http://a:1")}, {"m": "chat"}, pipeline_name="p",
                        backends={"other": launched_backend("/m.gguf", ctx=512)}, routes={"/v1/models": "p"})
    assert doc["backends"] == {"other": {"launch": {"model": "/m.gguf", "ctx": 512}}}
    assert doc["routes"] == {"/v1/models": "p"} and doc["pipelines"] == {"p": []}
