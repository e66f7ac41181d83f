"""What a launched backend costs and whether the fleet section can work: the memory
estimate, and the checks ``llamagate check`` adds for launched backends (the model file
exists and is a GGUF file, the options make sense, and each backend fits the budget).

It imports only the standard library and ``gateway.config``: gunicorn's master and the
supervisor import it.
"""

from __future__ import annotations

import os
from typing import Iterable

from ..config import BackendConfig, Config, FleetConfig

GGUF_MAGIC = b"GGUF"
# Bytes of KV cache per token of context, when the file does not say: f16 K and V for a
# small model (SmolLM2-135M: 30 layers x 192 KV dims x 2 x 2 bytes ~ 23 KB) up to a
# 7B with grouped-query attention (~128 KB). The larger figure errs on the safe side;
# `memory:` overrides the estimate.
KV_BYTES_PER_TOKEN = 128 * 1024
OVERHEAD_BYTES = 64 * 1024 * 1024  # compute buffers, the server itself


def replica_memory(backend: BackendConfig) -> int:
    """The bytes one replica of a launched backend takes: ``memory``, else the model
    file's size plus the KV cache of its context plus a fixed overhead."""
    launch = backend.launch
    assert launch is not None
    if launch.memory is not None:
        return launch.memory
    try:
        size = os.path.getsize(launch.model)
    except OSError:
        size = 0
    return size + launch.ctx * KV_BYTES_PER_TOKEN + OVERHEAD_BYTES


def backend_memory(backend: BackendConfig) -> int:
    """Bytes of every replica of a launched backend together."""
    assert backend.launch is not None
    return replica_memory(backend) * len(backend.launch.ports)


def fleet_problems(config: Config) -> list[tuple[str, str]]:
    """``(path, reason)`` for each launched backend that cannot work: a missing or
    unreadable model file, one that is not GGUF, options the llama-server refuses, a
    backend larger than the whole memory budget."""
    problems: list[tuple[str, str]] = []
    fleet: FleetConfig = config.fleet
    if fleet.first_port > fleet.last_port:
        problems.append(("fleet.ports", f"first ({fleet.first_port}) is after last ({fleet.last_port})"))
    for name, backend in config.launched.items():
        launch = backend.launch
        assert launch is not None
        path = f"backends.{name}.launch"
        problems += [(f"{path}.model", reason) for reason in _model_file_problems(launch.model)]
        if launch.parallel > launch.ctx // 64:
            problems.append((f"{path}.parallel", f"{launch.parallel} slots leave under 64 tokens of context each "
                                                 f"(ctx {launch.ctx})"))
        if launch.extra_args and not _has_binary():
            problems.append((f"{path}.extra_args", "extra llama-server arguments need the llama-server binary "
                                                   "(LLAMA_SERVER_BIN or on PATH); xllamacpp takes none"))
        need = backend_memory(backend)
        if fleet.memory_budget is not None and need > fleet.memory_budget:
            problems.append((path, f"needs {need / 2**20:.0f} MiB, more than the whole fleet.memory_budget "
                                   f"({fleet.memory_budget / 2**20:.0f} MiB): it could never start"))
    return problems


def _model_file_problems(model: str) -> Iterable[str]:
    try:
        with open(model, "rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        yield f"no model file at {model}"
        return
    except OSError as exc:
        yield f"cannot read the model file {model}: {exc.strerror}"
        return
    if magic != GGUF_MAGIC:
        yield f"{model} is not a GGUF file"


def _has_binary() -> bool:
    from .llamaserver import find_binary_path

    return find_binary_path(None) is not None
