"""pipelines.yaml documents for tests, built in one call: the backends, the models on
them, one pipeline on the four OpenAI routes, and any other top-level key as it is.

::

    doc = pipelines_doc({"chat": url_backend("http://127.0.0.1:8081", connect_timeout=2)},
                        {"smollm2": "chat"}, pipeline=[{"auth": {...}}, "router"],
                        timeouts={"first_byte": 5})
    config = gateway.config.parse_config(doc)

The result is a plain dict: write it with ``yaml.safe_dump`` for a gunicorn gateway or
``llamagate`` command, or change it further before parsing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from ..config import OPENAI_ROUTES


def url_backend(*urls: str, **options: Any) -> dict[str, Any]:
    """A backend on running llama-servers (``urls:``); ``options`` are its other keys
    (``connect_timeout``, ``max_in_flight``, ``queue_timeout``, ...)."""
    return {"urls": list(urls), **options}


def launched_backend(model: str | Path, **launch: Any) -> dict[str, Any]:
    """A backend the gateway's fleet launches (``launch:``) with ``model``; ``launch``
    are the launch section's other keys (``ctx``, ``parallel``, ``start``, ...)."""
    return {"launch": {"model": str(model), **launch}}


def openai_routes(pipeline: str = "default") -> dict[str, str]:
    """The four OpenAI routes, all through ``pipeline``."""
    return {route: pipeline for route in OPENAI_ROUTES}


def pipelines_doc(backends: Mapping[str, dict[str, Any]], models: Mapping[str, str | dict[str, Any]], /,
                  pipeline: Iterable[Any] = (), *, pipeline_name: str = "default",
                  routes: Mapping[str, Any] | None = None, **top_level: Any) -> dict[str, Any]:
    """A pipelines.yaml document.

    Args:
        backends: Backend name to its section (:func:`url_backend`, :func:`launched_backend`).
        models: Public model id to its section, or to a backend name for ``{"backend": name}``.
        pipeline: The entries (plugin names or ``{name: options}``) of the one pipeline.
        pipeline_name: That pipeline's name (``default``).
        routes: The whole ``routes:`` table; default: the four OpenAI routes through the
            pipeline (:func:`openai_routes`).
        top_level: Any other top-level key (``timeouts``, ``health_interval``, ``fleet``, ...),
            as it is; one of the keys above replaces what they built (``pipelines=`` the
            one pipeline, ``backends=`` the backends), so that a helper built on this one
            can pass its caller's keys on.
    """
    return {
        "backends": dict(backends),
        "models": {name: {"backend": spec} if isinstance(spec, str) else spec for name, spec in models.items()},
        "pipelines": {pipeline_name: list(pipeline)},
        "routes": dict(routes) if routes is not None else openai_routes(pipeline_name),
        **top_level,
    }
