"""The image through the real parts: two containers of it, each with its fleet-launched
llama-server on the mounted SmolLM2, running deploy/pipelines.yaml as one gateway through the
test session's own Redis and PostgreSQL (keys in the database, a ledger row per request);
the compose file read by podman-compose."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import openai
import pg8000.native
import pytest
import requests
import yaml

from ..conftest import until
from .conftest import DEPLOY, Container, podman

ADMIN_KEY = "sk-admin-" + secrets.token_urlsafe(24)
DATABASE = "llamagate_containers"
# The gateway's drain in these tests: long enough for a stream on a loaded 2-core machine.
GRACEFUL_TIMEOUT = 60


@pytest.fixture(scope="module")
def pair(containers, redis_url: str, postgres) -> list[Container]:
    """Containers a and b: one gateway, through the host's Redis (a database of its own) and PostgreSQL."""
    postgres.query(f"CREATE DATABASE {DATABASE}")
    shared = {"REDIS_URL": redis_url.rsplit("/", 1)[0] + "/3",
              "LLAMAGATE_DATABASE_URL": database_url(postgres),
              "LLAMAGATE_API_KEY": ADMIN_KEY}
    env = {"GATEWAY_GRACEFUL_TIMEOUT": str(GRACEFUL_TIMEOUT)}
    started = [containers(name, env, shared) for name in ("a", "b")]
    for container in started:
        container.wait_healthy()
    return started


@pytest.fixture(scope="module")
def keys(pair) -> dict[str, str]:
    """Keys made with the image's own CLI (`llamagate keys add`, the database from its
    environment): a user's, and one that may use only another model."""
    made = {}
    for client, models in (("carol", "smollm2"), ("rita", "another-model")):
        added = pair[0].exec("llamagate", "keys", "add", "--client", client, "--models", models)
        assert added.returncode == 0, added.stderr
        made[client] = added.stdout.strip().splitlines()[-1]
    # every worker of both containers knows them within the keys mirror's poll
    for container in pair:
        until(lambda: chat(container, made["carol"], max_tokens=1).status_code == 200, 30,
              f"{container.name} never accepted the new key")
    return made


def chat(container: Container, key: str, request_id: str | None = None, **body: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} | ({"X-Request-Id": request_id} if request_id else {})
    payload = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, **body}
    return requests.post(container.url + "/v1/chat/completions", json=payload, headers=headers, timeout=120)


class Stream(threading.Thread):
    """A streamed chat completion in a thread: every event's data, and when the first came."""

    def __init__(self, container: Container, key: str, request_id: str, tokens: int) -> None:
        super().__init__(daemon=True)
        self.container, self.key, self.request_id, self.tokens = container, key, request_id, tokens
        self.events: list[str] = []
        self.first = threading.Event()
        self.error: str | None = None
        self.start()

    def run(self) -> None:
        try:
            with requests.post(self.container.url + "/v1/chat/completions", stream=True, timeout=180,
                               headers={"Authorization": f"Bearer {self.key}", "X-Request-Id": self.request_id},
                               json={"model": "smollm2", "messages": [{"role": "user", "content": "Count to a thousand."}],
                                     "max_tokens": self.tokens, "ignore_eos": True, "stream": True,
                                     "stream_options": {"include_usage": True}}) as answer:
                assert answer.status_code == 200, answer.text
                for line in answer.iter_lines():
                    if line.startswith(b"data: "):
                        self.events.append(line[6:].decode())
                        self.first.set()
        except Exception as exc:  # noqa: BLE001 - the test reads it
            self.error = repr(exc)
        finally:
            self.first.set()

    def usage(self) -> dict[str, Any] | None:
        chunks = [json.loads(data) for data in self.events if data != "[DONE]"]
        return next((chunk["usage"] for chunk in chunks if chunk.get("usage")), None)

    def error_code(self) -> str | None:
        last = json.loads(self.events[-1]) if self.events and self.events[-1] != "[DONE]" else {}
        return last.get("error", {}).get("code")


def ledger(postgres, request_ids: list[str]) -> dict[str, list[tuple[Any, ...]]]:
    """The ledger's rows of these requests, by request id (none before the table is made)."""
    conn = pg8000.native.Connection(user="postgres", host="127.0.0.1", port=postgres.port, database=DATABASE)
    try:
        if not conn.run("SELECT to_regclass('llamagate_requests') IS NOT NULL")[0][0]:
            return {}
        rows = conn.run("SELECT request_id, client, status, outcome, completion_tokens FROM llamagate_requests "
                        "WHERE request_id = ANY(:ids)", ids=request_ids)
    finally:
        conn.close()
    found: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        found.setdefault(row[0], []).append(tuple(row[1:]))
    return found


def database_url(postgres) -> str:
    return postgres.url.rsplit("/", 1)[0] + f"/{DATABASE}"


# The image itself -----------------------------------------------------------------------------

def test_the_image_runs_unprivileged_under_tini_with_a_healthcheck_on_health(image, pair):
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    assert inspected["Config"]["User"] == "10001:10001"
    assert "/health" in " ".join(inspected["Healthcheck"]["Test"])
    a = pair[0]
    # every process of the container, seen from the host: gunicorn's master and worker, the
    # fleet supervisor, the llama-server, tini
    top = podman("top", a.name, "huser", "user", "args").stdout.splitlines()[1:]
    assert len(top) >= 5 and top[0].split()[2] == "tini", top
    assert all(line.split()[0] == "10001" and line.split()[1] == "llamagate" for line in top), top
    assert any("gateway.cli backend" in line for line in top), top
    healthy = podman("healthcheck", "run", a.name)
    assert healthy.returncode == 0 and "unhealthy" not in healthy.stdout, healthy.stdout + healthy.stderr
    # and it has nothing of the checkout it should not: no tests, no keys, no models of its own
    listing = a.exec("ls", "-A", "/app")
    assert sorted(listing.stdout.split()) == ["README.md", "gateway", "gunicorn.conf.py", "plugins", "pyproject.toml",
                                              "schemas"], listing.stdout


# A gateway out of two containers ----------------------------------------------------------------

def test_a_chat_completion_and_a_stream_through_the_fleets_llama_server(pair, keys):
    for container in pair:
        client = openai.OpenAI(base_url=container.url + "/v1", api_key=keys["carol"], max_retries=0)
        # a prompt of each container's own: the shared cache answers none of them
        answer = client.chat.completions.create(model="smollm2", max_tokens=8,
                                                messages=[{"role": "user", "content": f"Greet {container.name}."}])
        assert answer.choices[0].message.content and answer.usage.completion_tokens >= 1
        chunks = list(client.chat.completions.create(model="smollm2", max_tokens=8, stream=True,
                                                     messages=[{"role": "user", "content": f"Name {container.name}."}]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    for container in pair:  # each container's fleet launched its llama-server
        fleet = requests.get(container.url + "/admin/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                             timeout=10).json()["models"]
        assert fleet["chat"]["state"] == "ready" and fleet["chat"]["pids"], fleet


def test_a_restricted_key_is_refused(pair, keys):
    for container in pair:
        refused = chat(container, keys["rita"])
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
        assert chat(container, "sk-not-a-key").status_code == 401
        status = requests.get(container.url + "/admin/status", headers={"Authorization": f"Bearer {keys['carol']}"},
                              timeout=10)
        assert status.status_code == 403


def test_a_cancel_sent_to_one_container_reaches_a_stream_on_the_other(pair, keys):
    a, b = pair
    request_id = "cross-" + uuid.uuid4().hex
    stream = Stream(b, keys["carol"], request_id, tokens=1000)
    assert stream.first.wait(120) and stream.error is None, stream.error
    cancelled = requests.post(a.url + f"/v1/requests/{request_id}/cancel",
                              headers={"Authorization": f"Bearer {keys['carol']}"}, timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["cancelled"] is True, cancelled.text
    stream.join(60)
    assert not stream.is_alive() and stream.error_code() == "request_cancelled", stream.events[-3:]


def test_the_ledger_has_a_row_per_request_of_either_container(pair, keys, postgres):
    sent = []
    for i in range(6):
        request_id = f"ledger-{i}-" + uuid.uuid4().hex
        key = keys["rita"] if i == 5 else keys["carol"]  # a refused request has its row too
        answer = chat(pair[i % 2], key, request_id, max_tokens=2 + i)
        assert answer.status_code == (403 if i == 5 else 200)
        sent.append(request_id)
    rows = until(lambda: (lambda found: found if len(found) == len(sent) else None)(ledger(postgres, sent)), 30,
                 "the ledger did not get a row for every request")
    assert all(len(rows[request_id]) == 1 for request_id in sent), rows
    assert [rows[request_id][0][:3] for request_id in sent] == [("carol", 200, "ok")] * 5 + [("rita", 403, "error")]


def test_the_autoscalers_metric_is_in_the_containers_metrics(pair):
    hpa = yaml.safe_load((DEPLOY / "kubernetes" / "autoscaling" / "hpa.yaml").read_text())
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    scraped = requests.get(pair[0].url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert scraped.status_code == 200
    assert any(line.startswith(metric + '{backend="chat"}') for line in scraped.text.splitlines()), scraped.text[:2000]


# Last: it stops container a ----------------------------------------------------------------------

def test_sigterm_drains_a_stream_in_flight_and_the_container_exits_by_itself(pair, keys, postgres):
    """`podman stop` sends SIGTERM (to tini, which hands it to gunicorn's master) and SIGKILL
    only after its time: the stream started before finishes whole, then the container exits
    with 0 (137 would be the SIGKILL)."""
    from gateway.fleet.master import STOP_WAIT

    a = pair[0]
    request_id = "drain-" + uuid.uuid4().hex
    tokens = 96
    stream = Stream(a, keys["carol"], request_id, tokens=tokens)
    assert stream.first.wait(120) and stream.error is None, stream.error
    stopped = podman("stop", "--time", str(GRACEFUL_TIMEOUT + int(STOP_WAIT) + 10), a.name, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    stream.join(30)
    assert stream.error is None and stream.events[-1] == "[DONE]", stream.events[-3:]
    assert stream.usage()["completion_tokens"] == tokens
    state = a.state()
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state
    logs = a.logs()
    # the stream was in flight when the signal came: its access log line follows the signal's
    assert logs.index("Handling signal: term") < logs.index(request_id), logs[-6000:]
    assert "fleet: stopping 1 llama-server" in logs
    # its worker wrote the stream's ledger row before it exited
    assert ledger(postgres, [request_id])[request_id] == [("carol", 200, "ok", tokens)]


# The compose file ------------------------------------------------------------------------------

def compose_config(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """`podman-compose config` of deploy/compose.yaml with these variables (and no .env)."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    binary = Path(sys.executable).parent / "podman-compose"
    return subprocess.run([str(binary), "--env-file", str(empty), "-f", str(DEPLOY / "compose.yaml"), "config"],
                          capture_output=True, text=True, cwd=DEPLOY, timeout=60,
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", **variables})


def test_the_compose_file_parses_and_wires_redis_postgres_and_prometheus(tmp_path):
    parsed = compose_config(tmp_path, LLAMAGATE_API_KEY="sk-operator", POSTGRES_PASSWORD="pw")
    assert parsed.returncode == 0, parsed.stderr
    config = yaml.safe_load(parsed.stdout)
    services = config["services"]
    assert sorted(services) == ["gateway-1", "gateway-2", "postgres", "prometheus", "redis"]
    for name in ("gateway-1", "gateway-2"):
        gateway = services[name]
        assert gateway["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert gateway["environment"]["LLAMAGATE_DATABASE_URL"] == "postgresql://llamagate:pw@postgres:5432/llamagate"
        assert "./pipelines.yaml:/etc/llamagate/pipelines.yaml:ro" in gateway["volumes"]
        assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pw"
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["gateway-1:8000", "gateway-2:8000"]
    # no password, no start: compose names what is missing
    missing = compose_config(tmp_path, LLAMAGATE_API_KEY="sk-operator")
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr
