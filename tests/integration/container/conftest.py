"""The image, built from the Containerfile with ``make image`` and run with podman, as an
operator runs it: pipelines.yaml and the models mounted, configured by the environment.

Every test collected here is also marked ``container`` (``-m "not container"`` leaves them
out; ``make unit`` already does, as they are integration tests).

What this machine needs (docs/deployment.md#what-was-run-here): Debian's podman with runc
(``make container-tools``), the Containerfile's base image made once with mmdebstrap
(``make base-image``; podman keeps it), the host's network for the containers (no bridge), and
limits podman does not raise (this sandbox refuses its defaults)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
import yaml

from gateway.testing import free_port, free_ports

from ..conftest import MODEL, ROOT

MODELS = (ROOT / MODEL).resolve().parent  # a bind mount needs the absolute path (a bare name is a volume)

HERE = Path(__file__).resolve().parent
DEPLOY = ROOT / "deploy"
IMAGE = "localhost/llamagate:test"
# This sandbox refuses podman's default limits (1M open files, more processes than it allows):
# the containers get the test's own open-file limit and 4096 processes (threads) for their user.
_SOFT, _HARD = resource.getrlimit(resource.RLIMIT_NOFILE)
LIMITS = ["--ulimit", f"nofile={_SOFT}:{_HARD}", "--ulimit", "nproc=4096:4096"]


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.container)


def podman(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else dict(os.environ, **env))


@pytest.fixture(scope="session")
def image(logs: Path) -> str:
    """The image `make image` builds (after `make base-image`, which makes the base once)."""
    log = logs / "make-image.log"
    with open(log, "wb") as out:
        made = subprocess.run(["make", "--no-print-directory", "base-image", "image", "ENGINE=podman", f"IMAGE={IMAGE}"],
                              cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if made.returncode != 0:
        pytest.fail(f"make image failed; the end of {log}:\n{log.read_text(errors='replace')[-4000:]}")
    return IMAGE


def deployment_pipelines(path: Path) -> Path:
    """deploy/pipelines.yaml as the containers of one host's network run it: its llama-server on
    ports of its own (each pod or compose service has its own network) and one thread."""
    doc = yaml.safe_load((DEPLOY / "pipelines.yaml").read_text())
    ports = free_ports(2)
    doc["fleet"]["ports"] = {"first": ports[0], "last": ports[-1]}
    launch = doc["backends"]["chat"]["launch"]
    launch["model"] = f"/models/{MODEL.name}"
    launch["threads"] = 1
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o644)  # read by the container's user
    return path


# Each container carries the pid of the test run that started it: a run that died before its
# teardown leaves containers the next run removes (never those of a run still going).
RUN_LABEL = "llamagate.test-run"


def remove_orphans() -> None:
    listed = podman("ps", "--all", "--filter", f"label={RUN_LABEL}", "--format",
                    f'{{{{.ID}}}} {{{{index .Labels "{RUN_LABEL}"}}}}').stdout.split("\n")
    for line in filter(None, listed):
        container, pid = line.split()
        if not Path(f"/proc/{pid}").exists():
            podman("rm", "--force", "--time", "0", container)


class Container:
    """One container of the image on the host's network, its gateway on a free port.

    ``env`` is passed as ``--env NAME=VALUE``; ``secrets`` as ``--env NAME`` with the value in
    podman's environment, as an operator keeps keys off the command line."""

    def __init__(self, image: str, name: str, logs: Path, env: dict[str, str], secrets: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        pipelines = deployment_pipelines(logs / f"{name}-pipelines.yaml")
        args = ["run", "--detach", "--name", name, "--label", f"{RUN_LABEL}={os.getpid()}",
                "--network", "host", "--read-only", *LIMITS,
                "--volume", f"{pipelines}:/etc/llamagate/pipelines.yaml:ro",
                "--volume", f"{MODELS}:/models:ro",
                "--env", f"GATEWAY_BIND=127.0.0.1:{self.port}",
                *[f"--env={key}={value}" for key, value in env.items()], *[f"--env={key}" for key in secrets], image]
        started = podman(*args, env=secrets)
        if started.returncode != 0:
            pytest.fail(f"podman run {name} failed:\n{started.stderr}")

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet
                pass
            if self.state()["Status"] == "exited":
                break
            time.sleep(0.2)
        pytest.fail(f"the container {self.name} did not become healthy:\n{self.logs()[-6000:]}")

    def state(self) -> dict[str, Any]:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        """Its output, standard output and error in the order they were written."""
        result = subprocess.run(["podman", "logs", self.name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, timeout=60)
        return result.stdout

    def exec(self, *argv: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *argv)

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name)


@pytest.fixture(scope="module")
def containers(image: str, logs: Path) -> Iterator[Callable[[str, dict[str, str], dict[str, str]], Container]]:
    """Start containers with ``start(name, env, secrets)``; all removed after the module."""
    remove_orphans()
    made: list[Container] = []

    def start(name: str, env: dict[str, str], secrets: dict[str, str]) -> Container:
        container = Container(image, f"llamagate-test-{os.getpid()}-{name}", logs, env, secrets)
        made.append(container)
        return container

    yield start
    for container in made:
        (logs / f"{container.name}.log").write_text(container.logs())
        container.remove()
