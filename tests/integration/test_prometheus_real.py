"""Prometheus metrics through the real parts: two gunicorn gevent workers counting into
one set of numbers, a real llama-server's own /metrics merged in, and a real Prometheus
server scraping the gateway with an admin key."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from gateway.storage import keys
from gateway.testing import free_port

from .conftest import ROUTES

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Name one colour."}], "max_tokens": 4}
N = 24


def total(text: str, name: str, **labels: str) -> float:
    found = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line.split("}")[0] for k, v in labels.items()):
            found += float(line.rsplit(" ", 1)[1])
    return found


@pytest.fixture(scope="module")
def metered(start_gateway, chat_backend, embeddings_backend, logs):
    keys_file = logs / "prometheus-keys.yaml"
    admin, user = keys.add_key(keys_file, "ops", "admin"), keys.add_key(keys_file, "alice", "user")
    metrics_dir = logs / "prometheus-metrics"
    metrics_dir.mkdir()
    doc = {
        "health_interval": 1,
        "backends": {"chat": {"urls": [chat_backend]}, "embeddings": {"urls": [embeddings_backend]}},
        "models": {"smollm2": {"backend": "chat"}, "smollm2-embeddings": {"backend": "embeddings"}},
        "pipelines": {"default": ["prometheus", {"auth": {"keys_file": str(keys_file), "env_keys": {}}}]},
        "routes": dict({route: "default" for route in ROUTES}, **{"/metrics": {"pipeline": "default"}}),
    }
    gw = start_gateway(doc, workers=2, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    gw.admin, gw.user, gw.metrics_dir, gw.backend = admin, user, metrics_dir, chat_backend
    for _ in range(N):  # a new connection each: both workers take some
        with requests.Session() as fresh:
            resp = fresh.post(gw.url + "/v1/chat/completions", json=CHAT, timeout=60,
                              headers={"Authorization": f"Bearer {user}", "Connection": "close"})
            assert resp.status_code == 200
    return gw


def scrape(gw, key: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}", "Connection": "close"} if key else {"Connection": "close"}
    return requests.get(gw.url + "/metrics", headers=headers, timeout=10)


def test_every_worker_answers_with_the_whole_gateways_numbers(metered):
    writers = {path.stem.rsplit("_", 1)[1] for path in metered.metrics_dir.glob("counter_*.db")}
    assert len(writers) >= 2, "one worker took every request: the test shows nothing"
    for _ in range(6):  # new connections: both workers answer scrapes
        text = scrape(metered, metered.admin).text
        assert total(text, "llamagate_requests_total", route="/v1/chat/completions", status="200") == N
        assert total(text, "llamagate_tokens_total", kind="completion") >= N
        assert total(text, "llamagate_request_duration_seconds_count", route="/v1/chat/completions") == N


def test_the_replicas_own_metrics_come_labelled(metered):
    text = scrape(metered, metered.admin).text
    labels = {"backend": "chat", "replica": metered.backend}
    assert total(text, "llamagate_replica_metrics_up", **labels) == 1
    assert total(text, "llamacpp:prompt_tokens_total", **labels) > 0
    assert text.count("# TYPE llamacpp:prompt_tokens_total") == 1


def test_only_admins_scrape(metered):
    assert scrape(metered, None).status_code == 401
    refused = scrape(metered, metered.user)
    assert refused.status_code == 403 and "llamagate_" not in refused.text


def test_a_real_prometheus_scrapes_it(metered, logs: Path):
    binary = shutil.which("prometheus")
    assert binary, "make test installs Debian's prometheus package (run it as root, or apt-get install prometheus)"
    port = free_port()
    target = metered.url.removeprefix("http://")
    config = logs / "prometheus.yml"
    config.write_text(f"""global: {{scrape_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: llamagate
    authorization: {{credentials: {metered.admin}}}
    static_configs: [{{targets: ["{target}"]}}]
""")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={logs / 'prometheus-data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=open(logs / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query"
        deadline = time.monotonic() + 60
        requests_seen = replica_seen = None
        while time.monotonic() < deadline:
            try:
                requests_seen = requests.get(api, params={"query": 'sum(llamagate_requests_total{route='
                                                          '"/v1/chat/completions",status="200"})'}, timeout=2).json()
                replica_seen = requests.get(api, params={"query": 'llamacpp:prompt_tokens_total{backend="chat"}'},
                                            timeout=2).json()
            except requests.RequestException:
                time.sleep(0.5)
                continue
            if requests_seen["data"]["result"] and replica_seen["data"]["result"]:
                break
            time.sleep(0.5)
        assert requests_seen and requests_seen["data"]["result"], (logs / "prometheus.log").read_text()[-2000:]
        assert float(requests_seen["data"]["result"][0]["value"][1]) == N
        assert replica_seen["data"]["result"][0]["metric"]["replica"] == metered.backend
    finally:
        proc.terminate()
        proc.wait(10)
