"""The benchmark's own parts, so that they cannot break unnoticed (make bench is not
part of make test): the floor relays plain and streamed answers, and the load
generator counts complete answers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import falcon.testing
import yaml

BENCH = Path(__file__).resolve().parent.parent / "bench"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


def load_floor():
    spec = importlib.util.spec_from_file_location("bench_floor", BENCH / "floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_floor_relays_a_plain_answer(canned_url):
    client = falcon.testing.TestClient(load_floor().create_app(canned_url, connections=4))
    resp = client.simulate_post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json["choices"][0]["message"]["content"] == "Hello from the canned backend"
    assert resp.json["model"] == "canned-model.gguf"  # relayed as it is, nothing rewritten


def test_the_floor_relays_a_stream_event_by_event(canned_url):
    client = falcon.testing.TestClient(load_floor().create_app(canned_url, connections=4))
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, stream=True, canned={"text": "a b c"}))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    blocks = [b[len("data: "):] for b in resp.text.split("\n\n") if b]
    assert blocks[-1] == "[DONE]"
    events = [json.loads(b) for b in blocks[:-1]]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == "a b c"


def test_the_floor_relays_the_upstreams_error_status(canned_url):
    client = falcon.testing.TestClient(load_floor().create_app(canned_url, connections=4))
    resp = client.simulate_post("/v1/chat/completions", json=dict(CHAT, canned={"status": 503}))
    assert resp.status_code == 503 and resp.json["error"]["code"] == 503


def test_the_load_generator_counts_complete_answers(canned_url):
    def run(**spec):
        done = subprocess.run([sys.executable, str(BENCH / "client.py"), json.dumps(dict(url=canned_url, **spec))],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    plain = run(body=CHAT, concurrency=2, requests=6)
    assert (plain["n"], plain["complete"], plain["errors"]) == (6, 6, 0)
    stream = run(body=dict(CHAT, stream=True, canned={"text": "a b c d"}), concurrency=3, requests=3, together=True)
    assert (stream["n"], stream["complete"], stream["errors"]) == (3, 3, 0)
    assert 1 <= stream["max_open"] <= 3  # how many overlap depends on timing
    assert stream["events"] == 3 * 6  # 4 words, the last chunk, [DONE]
    assert stream["ttfe_p50"] is not None
    cut = run(body=dict(CHAT, stream=True, canned={"cut_after": 2}), concurrency=1, requests=1)
    assert (cut["n"], cut["complete"]) == (1, 0)


def test_the_affinity_benchmark_measures_conversations_and_tabulates_them(canned_url):
    spec = importlib.util.spec_from_file_location("bench_affinity", BENCH / "affinity.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # it imports bench/run.py as the script would
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    figures = module.run_workload(canned_url, "shared-sequential", conversations=2, turns=2, tenants="each")
    assert figures["requests"] == 4 and figures["ttft_follow_p50"] is not None
    options = type("Options", (), {"workloads": ["shared"]})()
    lines = module.table({strategy: {"shared": figures} for strategy in module.STRATEGIES}, options)
    assert len(lines) == 2 + len(module.STRATEGIES) and all(line.count("|") == 10 for line in lines)


def test_the_kv_benchmark_reads_the_access_logs_kv_fields_and_tabulates_them(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kv", BENCH / "kv.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # it imports bench/affinity.py and bench/run.py as the script would
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    access = tmp_path / "access.log"
    access.write_text("\n".join(json.dumps({"kv": kv}) for kv in (
        None, {"saves": 1, "save_bytes": 2_000_000, "save_ms": 30.0},
        {"saves": 1, "save_bytes": 2_000_000, "save_ms": 10.0, "restores": 1, "restore_ms": 5.0,
         "restore_bytes": 2_000_000, "restored_tokens": 90}, {"restore_failures": 1})) + "\n")
    states = tmp_path / "states"
    states.mkdir()
    (states / "a.kv").write_bytes(b"x" * 1_000_000)
    results = [{"turn": 0, "ttft": 1.0, "prompt": 100, "cached": 0}, {"turn": 1, "ttft": 0.2, "prompt": 120, "cached": 110}]
    found = module.figures(results, access, states)
    assert (found["follow"], found["evaluated"], found["prompt"]) == (1, 10, 120)
    assert (found["saves"], found["restores"], found["failures"]) == (2, 1, 1)
    assert found["state_mb"] == 2.0 and found["disk_mb"] == 1.0 and found["restore_ms"] == 5.0
    lines = module.table({("evictions", "saved states"): found})
    assert len(lines) == 3 and all(line.count("|") == 10 for line in lines)


def test_the_tracer_bench_puts_its_plugin_first_and_its_sink_counts_what_the_sdk_exports(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    full, _, _ = module.bench_configs(BENCH.parent / "pipelines.yaml", tmp_path)
    traced = module.with_plugin(full, BENCH / "configs" / "otel-1.yaml", tmp_path)
    doc = yaml.safe_load(traced.read_text())
    assert all(plugins[0] == {"otel": {"endpoint": "${OTEL_SINK_URL}", "sample_ratio": 0.01, "schedule_delay": 2}}
               for plugins in doc["pipelines"].values())
    assert doc["pipelines"]["default"][1:] == yaml.safe_load(full.read_text())["pipelines"]["default"]

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    sink = module.Sink()
    try:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=sink.url, timeout=5)))
        for name in ("a", "b"):
            provider.get_tracer("bench").start_span(name).end()
        assert (sink.exports, sink.spans) == (2, 2)
    finally:
        sink.shutdown()
