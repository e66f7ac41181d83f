"""Real parts: llama-server backends (xllamacpp + SmolLM2) and gunicorn gevent workers.
Everything collected here is marked ``integration``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jsonschema
import openai
import pytest
import requests
import yaml

from gateway.config import OPENAI_ROUTES
from gateway.testing import free_port, pipelines_doc, url_backend
from gateway.backends.upstream import wait_until_ready

from ..openai_spec import openai_validator

ROOT = Path(__file__).resolve().parents[2]
MODEL = Path(os.environ.get("LLAMAGATE_TEST_MODEL", ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")).resolve()
ROUTES = OPENAI_ROUTES
HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration is marked ``integration``: ``make unit``
    (``pytest -m "not integration"``) leaves them out."""
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


class Proc:
    """A child process with its output in a file, stopped at teardown."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.handle = open(log, "wb")
        self.popen = subprocess.Popen(args, stdout=self.handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                      start_new_session=True)
        self.terminated = False

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def terminate(self) -> None:
        """SIGTERM once, without waiting (stop several at once: their shutdowns overlap)."""
        if self.popen.poll() is None and not self.terminated:
            self.popen.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.handle.close()


def until(check: Callable[[], Any], timeout: float = 30, message: str = "timed out", pause: float = 0.05) -> Any:
    """``check()``'s first truthy value, asked every ``pause`` seconds; AssertionError(message)
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(pause)


def stop_all(procs: Iterable[Proc]) -> None:
    """Every one of ``procs`` stopped, their shutdowns side by side (a session's dozens of
    gateways, each draining and stopping its llama-servers, took a minute one after another)."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="session")
def model_path() -> Path:
    if not MODEL.is_file():
        pytest.fail(f"no model at {MODEL}: run `make test` (it fetches the model) or `make model`")
    return MODEL


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


class Backends:
    """Real llama-servers on free ports, stopped at the end of the session."""

    def __init__(self, model: Path, logs: Path) -> None:
        self.model = model
        self.logs = logs
        self.procs: dict[str, Proc] = {}

    def start(self, *extra: str, port: int | None = None) -> str:
        """Start one with the extra ``llamagate backend`` arguments; returns its base URL."""
        port = port or free_port()
        proc = Proc([sys.executable, "-m", "gateway.cli", "backend", "--model", str(self.model),
                     "--port", str(port), *extra], self.logs / f"backend-{port}.log")
        url = f"http://127.0.0.1:{port}"
        self.procs[url] = proc
        if not wait_until_ready([url], timeout=60):
            pytest.fail(f"llama-server on {url} did not start:\n{proc.output()}")
        return url

    def stop(self, url: str) -> None:
        self.procs[url].stop()

    def kill(self, url: str) -> None:
        """SIGKILL: the backend dies at once, mid-answer."""
        self.procs[url].popen.kill()
        self.procs[url].popen.wait()


@pytest.fixture(scope="session")
def backends(model_path: Path, logs: Path) -> Iterator[Backends]:
    started = Backends(model_path, logs)
    yield started
    stop_all(started.procs.values())


@pytest.fixture(scope="session")
def chat_backend(backends: Backends) -> str:
    return backends.start("--parallel", "2", "--ctx", "2048", "--threads", "1")


@pytest.fixture(scope="session")
def embeddings_backend(backends: Backends) -> str:
    return backends.start("--embeddings", "--parallel", "1", "--ctx", "1024", "--threads", "1")


class RunningGateway:
    """A gateway under real gunicorn gevent workers (``start_gateway``): its base URL, its
    process and the config file it runs on."""

    def __init__(self, url: str, proc: Proc, config: Path) -> None:
        self.url = url
        self.proc = proc
        self.config = config

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"),
                             max_retries=0, **kwargs)


@pytest.fixture(scope="module")
def start_gateway(logs: Path) -> Iterator[Callable[..., RunningGateway]]:
    """Run the gateway under real gunicorn gevent workers with a given config document;
    stopped at the end of the module (left running, a session's gateways kept polling their
    backends, Redis and keys databases to the end of the run)."""
    procs: list[Proc] = []

    def start(doc: dict[str, Any], workers: int = 1, wait_healthy: bool = True, **env_extra: str) -> RunningGateway:
        port = free_port()
        config = logs / f"pipelines-{port}.yaml"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        # a slot table of the session's own: other test runs on the host reuse ports
        env = dict(os.environ, GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_CONFIG=str(config),
                   GATEWAY_WORKERS=str(workers), GATEWAY_GRACEFUL_TIMEOUT="5",
                   LLAMAGATE_SLOTS_DIR=str(logs / "slots"))
        env.update(env_extra)
        proc = Proc([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
                    logs / f"gateway-{port}.log", env=env)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                status = requests.get(url + "/health", timeout=2).status_code
                if status == 200 or not wait_healthy:
                    return RunningGateway(url, proc, config)
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or its workers still booting
                pass
            if proc.popen.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"the gateway on {url} did not become ready:\n{proc.output()}")

    yield start
    stop_all(procs)


def gateway_doc(chat_url: str, embeddings_url: str, **overrides: Any) -> dict[str, Any]:
    """The session gateway's document: a chat and an embeddings model, the drop-in plugin
    ``boom`` in the default pipeline; ``overrides`` replace top-level keys."""
    return pipelines_doc({"chat": url_backend(chat_url, connect_timeout=2), "embeddings": url_backend(embeddings_url)},
                         {"smollm2": {"backend": "chat", "aliases": ["gpt-4o-mini"]},
                          "smollm2-embeddings": "embeddings"},
                         pipeline=["boom"], **{"health_interval": 1, "plugin_dirs": [str(HERE / "dropin")], **overrides})


@pytest.fixture(scope="module")
def gateway(start_gateway: Callable[..., RunningGateway], chat_backend: str, embeddings_backend: str) -> RunningGateway:
    return start_gateway(gateway_doc(chat_backend, embeddings_backend))


@pytest.fixture(scope="session")
def redis_url(logs: Path) -> Iterator[str]:
    """A redis-server of our own on a free port, sharing nothing."""
    port = free_port()
    proc = Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                logs / f"redis-{port}.log")
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.popen.poll() is not None:
                pytest.fail(f"redis-server did not start:\n{proc.output()}")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


class Postgres:
    """A PostgreSQL cluster of our own: ``initdb`` into a temporary folder (as the
    ``postgres`` user when we are root: initdb refuses root), the server on a free port
    of 127.0.0.1 and its Unix socket in that folder, sharing nothing with any other."""

    def __init__(self, logs: Path) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
        found = shutil.which("initdb")
        if not versions and not found:
            pytest.fail("make test needs PostgreSQL's initdb (Debian: apt-get install postgresql)")
        self.bin = versions[-1].parent if versions else Path(found).parent
        self.folder = Path(tempfile.mkdtemp(prefix="llamagate-pg-"))
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.folder, "postgres", "postgres")
        self.data = self.folder / "data"
        self.logs = logs
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        result = subprocess.run([*self.as_user, str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                                 "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        self.proc = Proc([*self.as_user, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                          "-k", str(self.folder), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                          "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                         self.logs / f"postgres-{self.port}.log")
        deadline = time.monotonic() + 30
        while True:
            try:
                from gateway.storage import pg

                pg.connect(self.url, timeout=2).close()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or self.proc.popen.poll() is not None:
                    pytest.fail(f"postgres did not start:\n{self.proc.output()}")
                time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): clients are disconnected, the server is gone."""
        if self.proc is not None and self.proc.popen.poll() is None:
            os.killpg(self.proc.popen.pid, signal.SIGINT)
            try:
                self.proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.popen.pid, signal.SIGKILL)
                self.proc.popen.wait()
            self.proc.handle.close()
        self.proc = None

    def pause(self) -> None:
        """Every process of the server stopped (SIGSTOP): connections stay open and
        nothing answers, as with a hung database."""
        os.killpg(self.proc.popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.popen.pid, signal.SIGCONT)

    def query(self, sql: str, **params: Any) -> list[list[Any]]:
        from gateway.storage import pg

        conn = pg.connect(self.url, timeout=10)
        try:
            return conn.run(sql, **params)
        finally:
            conn.close()

    def remove(self) -> None:
        if self.proc is not None:
            self.resume()
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(logs: Path) -> Iterator[Postgres]:
    """A PostgreSQL server of our own (see :class:`Postgres`)."""
    server = Postgres(logs)
    yield server
    server.remove()


@pytest.fixture(scope="session")
def openai_schema() -> Callable[[str], jsonschema.Draft202012Validator]:
    """Validators for OpenAI's own response schemas (from the official OpenAPI spec)."""
    return openai_validator


def read_response(sock: socket.socket) -> bytes:
    """Everything up to the end of one response with Content-Length (or the close)."""
    return read_responses(sock, 1)[0]


def read_responses(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` responses read in turn (pipelined ones may arrive in one read), each up to
    its Content-Length; the last may end at the close instead (then fewer come back)."""
    answers: list[bytes] = []
    data = b""
    while len(answers) < count:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and head.startswith(b"HTTP/1.1 100"):
            data = body
            continue
        length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")] if sep else []
        if length and len(body) >= length[0]:
            end = len(head) + len(sep) + length[0]
            answers.append(data[:end])
            data = data[end:]
            continue
        chunk = sock.recv(65536)
        if not chunk:
            return answers + [data]
        data += chunk
    return answers
