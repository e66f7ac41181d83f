"""Testing the gateway and plugins, in a few lines of pytest.

:class:`Harness` runs a pipeline of your plugins in-process (Falcon's test client)
in front of a backend: by default a :class:`FakeBackend` that answers like
llama-server and can be scripted answer by answer; or any real llama-server URL.
Each request returns a :class:`Result` with the status, headers, JSON body,
decoded stream events, and what ``complete`` saw (outcome and context)::

    from gateway.testing import Harness

    def test_my_plugin():
        with Harness([MyPlugin({"option": 1})]) as harness:
            harness.backend.script({"json": {"choices": [...]}})   # optional
            result = harness.chat("Hello", stream=True)
            assert result.status == 200 and result.outcome == "ok"
            assert result.text == "..."

:func:`canned_llama_app` is the WSGI app behind the fake backend (llama-server's
JSON and SSE shapes and quirks: its own model name, no ``logprobs``, int error
codes), and :func:`serve_in_thread` runs any WSGI app on a free loopback port.
:func:`pipelines_doc` builds a pipelines.yaml document in one call (with
:func:`url_backend`, :func:`launched_backend` and :func:`openai_routes` for its parts), for
a test that parses a config or starts a gateway of its own.

A request body may steer the canned answer with a ``"canned"`` object (the
gateway passes unknown fields through):

* ``status``: answer with this HTTP status and a llama-server style error;
* ``events``: how many content events a stream has (default: one per word);
* ``cut_after``: end a stream after this many events, without ``[DONE]``;
* ``delay``: seconds to wait before each event;
* ``first_delay``: seconds to wait before answering at all (before the headers);
* ``text``: the answer's text (default ``"Hello from the canned backend"``);
* ``tool_calls``: chat only, a list of ``{"name", "arguments"}``: the answer calls these
  tools (``finish_reason: tool_calls``, no content unless ``text`` is given); a stream
  sends each call as llama-server does, a first delta with ``index``, ``id``, ``type``
  and the name, then its arguments in three fragments.

Other body fields it honours, like llama-server: ``logprobs`` (chat ``true``, with
``top_logprobs`` alternatives; completions a number of alternatives) adds logprobs in
llama-server's shape (``{"content": [{"id", "token", "bytes", "logprob",
"top_logprobs"}]}``, on each content chunk of a stream); ``timings_per_token`` puts a
``timings`` object (``prompt_n``, ``cache_n``, ``predicted_n`` so far) on every chunk
and on a whole answer; ``n`` > 1 gets ``n`` choices: a whole answer's ``usage``
counts the completion of one choice only, and a stream interleaves the choices'
chunks and (with ``stream_options.include_usage``) sends one usage chunk per choice,
each counting that choice's completion.

``/tokenize`` counts one token per word; ``/props`` reports 64 slots.

Between tests: :func:`reset_memory_stores` forgets every memory store (they live as
long as the process, so that limits and caches outlive a reload), and
:func:`reset_settings` makes the next read of the settings see the environment again
(after a test changed it).

The package's modules: ``canned`` (the canned llama-server app), ``server``
(:func:`serve_in_thread`, :func:`free_port`, :func:`free_ports`), ``harness`` (:class:`Harness`,
:class:`FakeBackend`, :class:`Result`), ``documents`` (:func:`pipelines_doc` and its parts);
import from ``gateway.testing`` itself.
"""

from .canned import CANNED_MODEL, CANNED_SLOTS, CANNED_TEXT, canned_llama_app
from .documents import launched_backend, openai_routes, pipelines_doc, url_backend
from .harness import FakeBackend, Harness, Result
from .server import free_port, free_ports, serve_in_thread
from ..settings import reset as reset_settings
from ..storage.stores import reset_memory_stores

__all__ = [
    "CANNED_MODEL",
    "CANNED_SLOTS",
    "CANNED_TEXT",
    "FakeBackend",
    "Harness",
    "Result",
    "canned_llama_app",
    "free_port",
    "free_ports",
    "launched_backend",
    "openai_routes",
    "pipelines_doc",
    "reset_memory_stores",
    "reset_settings",
    "serve_in_thread",
    "url_backend",
]
