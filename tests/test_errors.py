"""The gateway's one error root, and the one mapping from backend failures to client errors."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path

import pytest

import gateway
import plugins
from gateway import errors
from gateway.backends import httpclient
from gateway.errors import (
    ConnectFailed,
    ConnectionBroken,
    ConnectTimedOut,
    GatewayError,
    HTTPFailure,
    LlamagateError,
    Phase,
    ReadTimedOut,
    from_backend,
)


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class declared in a module of the gateway or its plugins."""
    found: dict[str, type[BaseException]] = {}
    for package in (gateway, plugins):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith(".__main__"):  # runs the CLI when imported; declares nothing
                continue
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if (inspect.isclass(value) and issubclass(value, BaseException)
                        and value.__module__ == module.__name__):
                    found[f"{module.__name__}.{name}"] = value
    return found


def test_every_exception_class_derives_from_the_one_root() -> None:
    classes = _exception_classes()
    # the walk does find them, the private signals too: else this test could not fail
    for name in ("gateway.errors.GatewayError", "gateway.config.ConfigError", "gateway.settings.SettingsError",
                 "gateway.storage.shared.SharedUnavailable", "gateway.storage.stores.StoreUnavailable",
                 "gateway.errors.HTTPFailure", "gateway.backends.httpclient._StaleConnection",
                 "gateway.backends.send._LaunchedDown", "gateway.fleet.states.IllegalTransition"):
        assert name in classes
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, LlamagateError))
    assert outside == []


def test_internal_errors_are_not_client_errors() -> None:
    """An ``except GatewayError`` (the app's error answer) must not swallow an internal one."""
    internal = {name: cls for name, cls in _exception_classes().items() if not issubclass(cls, GatewayError)}
    assert "gateway.config.ConfigError" in internal and "gateway.errors.HTTPFailure" in internal
    for name, cls in internal.items():
        assert not issubclass(cls, GatewayError), name
    # _StaleConnection is retried inside Pool.request: no caller's `except HTTPFailure` may take it
    assert not issubclass(httpclient._StaleConnection, HTTPFailure)


def test_the_old_bases_still_catch_what_they_caught() -> None:
    from gateway.fleet.states import IllegalTransition
    from gateway.settings import SettingsError

    assert issubclass(SettingsError, ValueError)
    assert issubclass(IllegalTransition, RuntimeError)
    assert issubclass(ConnectTimedOut, ConnectFailed)
    for name in ("HTTPFailure", "ConnectFailed", "ConnectTimedOut", "ReadTimedOut", "ConnectionBroken"):
        assert getattr(httpclient, name) is getattr(errors, name)  # one class, re-exported


def test_the_root_is_at_the_bottom_of_the_imports() -> None:
    """errors.py imports nothing of the gateway at run time (httpclient and every other
    module import it), so there can be no circle through it."""
    tree = ast.parse(Path(errors.__file__).read_text())
    runtime = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert runtime, "the walk must see the module's imports"
    assert all(isinstance(node, ast.Import) or node.level == 0 for node in runtime)
    assert all((node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
               in sys.stdlib_module_names | {"__future__"} for node in runtime)


def test_the_tree_in_the_docstring_names_every_class() -> None:
    doc = errors.__doc__
    for name, cls in _exception_classes().items():
        assert cls.__name__ in doc, name


class _Answer:
    """A backend's error answer as httpclient.Response shows it."""

    def __init__(self, status: int, body: object) -> None:
        self.status = status
        self._body = body

    def json(self) -> object:
        if isinstance(self._body, bytes):
            return json.loads(self._body)
        return self._body


RETRY = {"Retry-After": "7"}

# (failure, phase) -> status, type, code, a piece of the message, headers
TABLE = [
    (ConnectFailed("x", refused=True), Phase.SENDING,
     503, "server_error", "service_unavailable", "The backend b is unreachable (connection refused)", RETRY),
    (ConnectFailed("x"), Phase.SENDING,
     503, "server_error", "service_unavailable", "unreachable (unreachable)", RETRY),
    (ConnectTimedOut("x"), Phase.SENDING,
     503, "server_error", "service_unavailable", "unreachable (connect timeout)", RETRY),
    (ConnectionBroken("x"), Phase.SENDING,
     503, "server_error", "service_unavailable", "unreachable (connection reset)", RETRY),
    (ReadTimedOut("x"), Phase.SENDING,
     504, "server_error", "timeout", "The backend b did not start answering within 2.5 s.", {}),
    (ReadTimedOut("x"), Phase.WAITING,
     504, "server_error", "timeout", "The backend b did not start answering within 2.5 s.", {}),
    (ConnectionBroken("x"), Phase.WAITING,
     502, "server_error", "bad_gateway", "broke mid-answer", {}),
    (ReadTimedOut("x"), Phase.READING,
     504, "server_error", "timeout", "The backend sent nothing for 2.5 s; the answer was abandoned.", {}),
    (ConnectionBroken("x"), Phase.READING,
     502, "server_error", "bad_gateway", "broke mid-answer; the answer is incomplete", {}),
    (_Answer(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}), Phase.WAITING,
     503, "unavailable_error", None, "Loading model", RETRY),
    (_Answer(400, {"error": {"code": 400, "message": "bad n_probs", "type": "invalid_request_error"}}), Phase.WAITING,
     400, "invalid_request_error", None, "bad n_probs", {}),
    (_Answer(500, b"not json"), Phase.WAITING,
     500, "server_error", None, "The backend answered with HTTP 500.", {}),
    (_Answer(401, {"error": {"message": "Invalid API Key"}}), Phase.WAITING,
     502, "server_error", "backend_auth_failed", "refused the gateway's credentials", {}),
    (_Answer(403, None), Phase.WAITING,
     502, "server_error", "backend_auth_failed", "refused the gateway's credentials", {}),
]


@pytest.mark.parametrize(("failure", "phase", "status", "kind", "code", "message", "headers"), TABLE,
                         ids=[f"{type(row[0]).__name__}-{getattr(row[0], 'status', '')}-{row[1].value}"
                              for row in TABLE])
def test_the_mapping_table(failure: object, phase: Phase, status: int, kind: str, code: str | None,
                           message: str, headers: dict[str, str]) -> None:
    error = from_backend(failure, phase, backend="b", timeout=2.5, retry_after="7")  # type: ignore[arg-type]
    assert isinstance(error, GatewayError)
    assert (error.status, error.type, error.code) == (status, kind, code)
    assert message in error.message
    assert error.headers == headers
    assert error.to_dict()["error"]["param"] is None


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("failure", [ConnectionBroken("cut"), ReadTimedOut("cut"), _Answer(503, None)])
def test_the_request_s_own_end_comes_first(failure: object, phase: Phase) -> None:
    """A connection the gateway cut (a cancel, a client that left) is never the backend's fault."""
    cancelled = from_backend(failure, phase, backend="b", cancelled=True, client_gone=True)  # type: ignore[arg-type]
    assert (cancelled.status, cancelled.code) == (499, "request_cancelled")
    gone = from_backend(failure, phase, backend="b", client_gone=True)  # type: ignore[arg-type]
    assert (gone.status, gone.code) == (499, "client_closed_request")


def test_a_replica_s_detail_names_the_failure() -> None:
    assert errors.failure_reason(ConnectTimedOut("x")) == "connect timeout"
    assert errors.failure_reason(ConnectFailed("x", refused=True)) == "connection refused"
    assert errors.failure_reason(ConnectFailed("x")) == "unreachable"
    assert errors.failure_reason(ReadTimedOut("x")) == "first byte timeout"
    assert errors.failure_reason(ConnectionBroken("x")) == "connection reset"


def test_one_mapping() -> None:
    """The split helpers are gone: every caller asks errors.from_backend."""
    assert not hasattr(errors, "from_read_failure") and not hasattr(errors, "from_backend_response")
