"""Run a llama-server: a ``llama-server`` binary when one is named or on PATH,
else llama.cpp's server in-process through the ``xllamacpp`` package."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from dataclasses import dataclass

from .. import settings


@dataclass(frozen=True)
class BackendOptions:
    """What to serve and how.

    Attributes:
        model: Path to a GGUF file.
        host: Address to listen on.
        port: Port to listen on.
        embeddings: Serve ``/v1/embeddings`` (mean pooling) instead of generation.
        parallel: Slots: requests decoded at the same time.
        ctx: Total context size in tokens, shared by the slots.
        binary: A llama-server executable; None to look on PATH, then use xllamacpp.
        threads: CPU threads for generation and prompt processing; None: llama.cpp's
            default (all cores). Several backends on one machine should split the
            cores: llama.cpp's threads spin while they wait, so oversubscribed cores
            stall every backend.
        api_key: A key callers must send (``Authorization: Bearer``); None: open.
        cache_ram: MiB of llama-server's prompt cache in host memory, which restores a
            prompt cached in one slot into another whoever asks (0: off, so that one
            tenant cannot reuse another's prompt; see :mod:`gateway.backends.slots`).
        slot_save_path: The folder ``POST /slots/<id>?action=save|restore`` files live in
            (the gateway's saved KV states, :mod:`gateway.backends.kvstates`); None: off.

    Every llama-server also runs with ``cache_prompt`` off by default: a request reuses
    its slot's cache only when it says ``cache_prompt: true``, which the gateway does
    only for the slot's own tenant (``/v1/messages`` drops the field, and so reuses nothing).
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8081
    embeddings: bool = False
    parallel: int = 2
    ctx: int = 4096
    binary: str | None = None
    threads: int | None = None
    api_key: str | None = None
    cache_ram: int = 0
    slot_save_path: str | None = None
    extra_args: tuple[str, ...] = ()


def binary_args(opts: BackendOptions, binary: str) -> list[str]:
    """The llama-server command line with the same meaning as the xllamacpp params."""
    args = [binary, "-m", opts.model, "--host", opts.host, "--port", str(opts.port),
            "-np", str(opts.parallel), "-c", str(opts.ctx), "--slots", "--metrics",
            "--cache-ram", str(opts.cache_ram), "--no-cache-prompt"]
    if opts.embeddings:
        args += ["--embeddings", "--pooling", "mean"]
    if opts.slot_save_path:
        args += ["--slot-save-path", opts.slot_save_path]
    if opts.threads:
        args += ["--threads", str(opts.threads), "--threads-batch", str(opts.threads)]
    # No --api-key: a command line is readable by every local user (ps); see binary_env.
    return args + list(opts.extra_args)


def binary_env(opts: BackendOptions) -> dict[str, str]:
    """The llama-server's environment: ours, and the API key as ``LLAMA_API_KEY``, which
    llama-server reads in place of ``--api-key`` (``/proc/<pid>/environ`` is readable by
    the process's owner only, its command line by everyone)."""
    env = dict(os.environ)
    if opts.api_key:
        env["LLAMA_API_KEY"] = opts.api_key
    return env


def find_binary(opts: BackendOptions) -> str | None:
    return find_binary_path(opts.binary)


def find_binary_path(explicit: str | None) -> str | None:
    """``explicit``, else LLAMA_SERVER_BIN, else ``llama-server`` on PATH, else None (xllamacpp)."""
    return explicit or settings.current().llama_server_bin or shutil.which("llama-server")


def run(opts: BackendOptions) -> None:
    """Serve until SIGINT or SIGTERM. Never returns normally."""
    if not os.path.isfile(opts.model):
        raise SystemExit(f"llamagate backend: no model file at {opts.model} (run `make model`)")
    if opts.slot_save_path:
        os.umask(0o077)  # the saved slots are tenants' prompts: the owner's alone
    binary = find_binary(opts)
    if binary:
        os.execve(binary, binary_args(opts, binary), binary_env(opts))
    if opts.extra_args:
        raise SystemExit("llamagate backend: extra llama-server arguments need the llama-server binary "
                         "(LLAMA_SERVER_BIN or on PATH); xllamacpp takes none")
    try:
        import xllamacpp
    except ImportError:
        raise SystemExit("llamagate backend: no llama-server binary found and xllamacpp is not installed "
                         "(pip install 'llamagate[embedded]')") from None
    params = xllamacpp.CommonParams()
    params.model.path = opts.model
    params.hostnames = [opts.host]
    params.port = opts.port
    params.n_parallel = opts.parallel
    params.n_ctx = opts.ctx
    params.endpoint_slots = True
    params.endpoint_metrics = True
    params.cache_ram_mib = opts.cache_ram
    params.cache_prompt = False
    if opts.slot_save_path:
        # llama-server's --slot-save-path adds the separator; the parameter set directly does not
        params.slot_save_path = os.path.join(opts.slot_save_path, "")
    if opts.threads:
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = opts.threads
    if opts.api_key:
        params.api_keys = [opts.api_key]
    if opts.embeddings:
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    server = xllamacpp.Server(params)
    # Installed after the server starts, because llama.cpp installs its own.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"llama-server (xllamacpp) listening on {server.listening_address}", flush=True)
    stop.wait()
    # The server's threads live in C++; leaving at once is the clean way out.
    os._exit(0)
