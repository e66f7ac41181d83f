"""Backends: pooled ``requests`` sessions, failover before the first byte, health.

Each replica has its own ``requests.Session`` whose pool holds ``max_connections``
connections (the default pool keeps 10, so a busier worker would reconnect per
request) and ignores proxy settings from the environment (``trust_env = False``:
scanning the environment costs ~20% of a pass-through). A background loop polls
each replica's ``/health`` (llama-server answers 503 while it loads a model).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Iterable, Mapping

import requests
from requests.adapters import HTTPAdapter

from .config import BackendConfig
from .context import RequestContext
from .errors import GatewayTimeoutError, ServiceUnavailableError, UpstreamError

log = logging.getLogger("llamagate")


class Replica:
    """One llama-server base URL of a backend.

    Attributes:
        url: Base URL, e.g. ``http://127.0.0.1:8081``.
        backend: Name of the backend it belongs to.
        ready: True after a good health check, False after a failed one,
            None before the first.
        in_flight: Requests this worker has open on it now.
        detail: The last health check's result, for ``/health``.
    """

    def __init__(self, url: str, config: BackendConfig) -> None:
        self.url = url
        self.backend = config.name
        self.timeout = (config.connect_timeout, config.read_timeout)
        self.session = requests.Session()
        self.session.trust_env = False
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=config.max_connections)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.ready: bool | None = None
        self.in_flight = 0
        self.detail = "not checked yet"

    def check(self) -> None:
        """Ask the replica's ``/health`` whether it can take requests."""
        try:
            resp = self.session.get(self.url + "/health", timeout=(self.timeout[0], 5))
            self.ready = resp.status_code == 200
            self.detail = "ok" if self.ready else f"HTTP {resp.status_code}"
            resp.close()
        except requests.RequestException as exc:
            self.ready = False
            self.detail = f"unreachable: {type(exc).__name__}"

    def __repr__(self) -> str:
        return f"Replica({self.url!r}, ready={self.ready})"


class Backend:
    """A named group of replicas that serve the same models."""

    def __init__(self, config: BackendConfig) -> None:
        self.name = config.name
        self.config = config
        self.replicas = [Replica(url, config) for url in config.urls]
        self._turn = itertools.count()

    @property
    def ready(self) -> bool:
        return any(r.ready for r in self.replicas)

    def candidates(self, first: Replica | None = None) -> list[Replica]:
        """Replicas in the order to try them: ``first``, then ready ones round robin,
        then ones not yet checked, then those whose last check failed (which may
        have come back since)."""
        start = next(self._turn) % len(self.replicas)
        rotated = self.replicas[start:] + self.replicas[:start]
        ordered = sorted(rotated, key=lambda r: {True: 0, None: 1, False: 2}[r.ready])
        if first is not None:
            ordered = [first] + [r for r in ordered if r is not first]
        return ordered


class Upstreams:
    """Every backend of a config, with their background health checks."""

    def __init__(self, configs: Mapping[str, BackendConfig], health_interval: float) -> None:
        self.backends = {name: Backend(cfg) for name, cfg in configs.items()}
        self.health_interval = health_interval
        self._stop = threading.Event()
        self._checker: threading.Thread | None = None

    def replicas(self) -> Iterable[Replica]:
        for backend in self.backends.values():
            yield from backend.replicas

    def check_all(self) -> None:
        for replica in self.replicas():
            replica.check()

    def start_health_checks(self) -> None:
        """Poll every replica now and then every ``health_interval`` seconds.

        Under gunicorn's gevent worker ``threading`` is patched, so this is a greenlet.
        """
        if self._checker is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                self.check_all()
                self._stop.wait(self.health_interval)

        self._checker = threading.Thread(target=loop, name="llamagate-health", daemon=True)
        self._checker.start()

    def stop(self) -> None:
        self._stop.set()

    def retry_after(self) -> str:
        return str(max(1, round(self.health_interval)))

    def send(self, ctx: RequestContext, candidates: list[Replica], path: str, body: bytes,
             headers: Mapping[str, str], method: str = "POST") -> tuple[Replica, requests.Response]:
        """Send the request to the first candidate that accepts the connection.

        A replica that refuses the connection is marked not ready and the next one
        is tried; nothing has reached the client yet, so nothing can be duplicated.
        Sets ``ctx.replica`` and counts the request in the replica's ``in_flight``;
        the caller takes one off the returned replica's ``in_flight`` when done.

        Raises:
            ServiceUnavailableError: no candidate accepted the connection.
            GatewayTimeoutError: the chosen replica did not answer in time.
            UpstreamError: the connection broke while waiting for the answer.
        """
        failures = []
        for replica in candidates:
            ctx.replica = replica.url
            replica.in_flight += 1
            try:
                resp = replica.session.request(method, replica.url + path, data=body, headers=headers,
                                               stream=True, timeout=replica.timeout)
            except requests.ConnectTimeout:
                replica.in_flight -= 1
                replica.ready, replica.detail = False, "connect timeout"
                failures.append(f"{replica.url}: connect timeout")
                continue
            except requests.ConnectionError as exc:
                replica.in_flight -= 1
                if _is_connect_failure(exc):
                    replica.ready, replica.detail = False, "connection refused"
                    failures.append(f"{replica.url}: connection refused")
                    continue
                raise UpstreamError(f"The backend {replica.backend} closed the connection before answering.") from exc
            except requests.Timeout as exc:
                replica.in_flight -= 1
                raise GatewayTimeoutError(
                    f"The backend {replica.backend} did not answer within {replica.timeout[1]:g} s."
                ) from exc
            replica.ready = True
            return replica, resp
        ctx.replica = None
        ctx.log(logging.WARNING, "no replica reachable: %s", "; ".join(failures))
        raise ServiceUnavailableError(
            f"No backend is reachable for model {ctx.model!r}; try again shortly.",
            headers={"Retry-After": self.retry_after()},
        )


def _is_connect_failure(exc: requests.ConnectionError) -> bool:
    """True when the TCP connection was never made (so the request never left)."""
    reason = exc.args[0] if exc.args else None
    text = repr(reason)
    return "NewConnectionError" in text or "ConnectionRefused" in text or "Failed to establish" in text


def wait_until_ready(urls: Iterable[str], timeout: float) -> bool:
    """Poll each URL's ``/health`` until all answer 200 or ``timeout`` passes."""
    pending = list(urls)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        try:
            if requests.get(pending[0] + "/health", timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return not pending
