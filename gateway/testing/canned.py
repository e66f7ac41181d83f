"""A canned llama-server: a WSGI app that answers like llama-server, fast and
deterministically (see the package's docstring for what a request may ask of it)."""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable


CANNED_MODEL = "canned-model.gguf"
CANNED_TEXT = "Hello from the canned backend"
CANNED_SLOTS = 64  # what /props reports: a fast canned backend takes many requests at once


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = _compact(body)
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def _compact(data: dict[str, Any]) -> bytes:
    # llama-server writes compact JSON.
    return json.dumps(data, separators=(",", ":")).encode()


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs_entry(piece: str, position: int, top: int) -> dict[str, Any]:
    """One token's logprobs in llama-server's shape (alternatives: the token, then ``" alt1"``...)."""
    logprob = -0.25 - 0.125 * position
    alternatives = [(position, piece, logprob)] + [(1000 + k, f" alt{k}", logprob - k) for k in range(1, top)]
    return {"id": position, "token": piece, "bytes": list(piece.encode()), "logprob": logprob,
            "top_logprobs": [{"id": i, "token": t, "bytes": list(t.encode()), "logprob": lp}
                             for i, t, lp in alternatives[:top]]}


def _logprobs_top(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives per token the request asked for, or None for no logprobs."""
    logprobs = body.get("logprobs")
    if not logprobs:
        return None
    if chat:
        return int(body.get("top_logprobs") or 0)
    return logprobs if isinstance(logprobs, int) and not isinstance(logprobs, bool) else 0


def _timings(predicted: int) -> dict[str, int]:
    return {"prompt_n": 5, "cache_n": 0, "predicted_n": predicted}


def _tool_call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """llama-server's tool-call deltas: per call the name first, then the arguments in fragments."""
    deltas = []
    for i, call in enumerate(calls):
        deltas.append({"index": i, "id": f"call_canned_{i}", "type": "function",
                       "function": {"name": call["name"], "arguments": ""}})
        arguments = call.get("arguments", "")
        size = max(1, -(-len(arguments) // 3))
        deltas.extend({"index": i, "function": {"arguments": arguments[k:k + size]}}
                      for k in range(0, len(arguments), size))
    return deltas


def canned_llama_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI app imitating llama-server's OpenAI routes and ``/health``."""
    path = environ.get("PATH_INFO", "")
    if path == "/health":
        return _json(start_response, "200 OK", {"status": "ok"})
    if path == "/props":
        return _json(start_response, "200 OK", {"total_slots": CANNED_SLOTS,
                                                 "default_generation_settings": {"n_ctx": 4096}})
    length = int(environ.get("CONTENT_LENGTH") or 0)
    try:
        body = json.loads(environ["wsgi.input"].read(length) or b"{}")
    except ValueError:
        return _json(start_response, "400 Bad Request",
                     {"error": {"code": 400, "message": "invalid JSON", "type": "invalid_request_error"}})
    script = body.get("canned") or {}
    if "status" in script:
        status = int(script["status"])
        return _json(start_response, f"{status} Canned",
                     {"error": {"code": status, "message": f"canned error {status}", "type": "server_error"}})
    if script.get("first_delay"):
        time.sleep(float(script["first_delay"]))
    if path == "/tokenize":
        return _json(start_response, "200 OK", {"tokens": list(range(len(str(body.get("content", "")).split())))})
    request_id = environ.get("HTTP_X_REQUEST_ID", "")
    text = script.get("text", CANNED_TEXT)
    words = text.split(" ")
    if path == "/v1/embeddings":
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        return _json(start_response, "200 OK", {
            "model": CANNED_MODEL, "object": "list", "usage": _usage(len(inputs), 0),
            "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))],
        })
    chat = path == "/v1/chat/completions"
    if not chat and path != "/v1/completions":
        return _json(start_response, "404 Not Found",
                     {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
    base = {"id": "chatcmpl-canned", "created": 1700000000, "model": CANNED_MODEL,
            "system_fingerprint": request_id}
    calls = script.get("tool_calls") if chat else None
    if calls and "text" not in script:
        words = []
    top = _logprobs_top(body, chat)
    pieces = [word if n == 0 else " " + word for n, word in enumerate(words)]
    if not body.get("stream"):
        # Like llama-server: n choices, but usage counts the completion of one only.
        choices = []
        for i in range(int(body.get("n") or 1)):
            choice: dict[str, Any] = {"index": i, "finish_reason": "tool_calls" if calls else "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text if pieces else None}
                if calls:
                    choice["message"]["tool_calls"] = [
                        {"id": f"call_canned_{k}", "type": "function",
                         "function": {"name": c["name"], "arguments": c.get("arguments", "")}}
                        for k, c in enumerate(calls)]
            else:
                choice["text"] = text
            if top is not None:
                choice["logprobs"] = {"content": [_logprobs_entry(p, n, top) for n, p in enumerate(pieces)]}
            choices.append(choice)
        answer = dict(base, object="chat.completion" if chat else "text_completion",
                      choices=choices, usage=_usage(5, len(words)))
        if body.get("timings_per_token"):
            answer["timings"] = _timings(len(words))
        return _json(start_response, "200 OK", answer)
    start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
    if "events" in script:
        pieces = pieces[: int(script.get("events", 3))]
    return _events(base, chat, pieces, body, script, calls or [], top)


def _events(base: dict[str, Any], chat: bool, pieces: list[str], body: dict[str, Any],
            script: dict[str, Any], calls: list[dict[str, Any]], top: int | None) -> Iterable[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    delay = float(script.get("delay", 0))
    cut_after = script.get("cut_after")
    n_choices = int(body.get("n") or 1)
    timings = bool(body.get("timings_per_token"))
    # One step per token: content pieces, then tool-call deltas; each choice takes every step.
    steps: list[tuple[str, Any]] = [("content", p) for p in pieces] + [("tool", d) for d in _tool_call_deltas(calls)]

    def event(choices: list[dict[str, Any]], produced: int, **extra: Any) -> bytes:
        data = dict(base, object=obj, choices=choices, **extra)
        if timings:
            data["timings"] = _timings(produced)
        return b"data: " + _compact(data) + b"\n\n"

    for n, (kind, value) in enumerate(steps):
        if cut_after is not None and n >= int(cut_after):
            return
        if delay:
            time.sleep(delay)
        for i in range(n_choices):
            if kind == "tool":
                choice: dict[str, Any] = {"index": i, "finish_reason": None, "delta": {"tool_calls": [value]}}
            elif chat:
                choice = {"index": i, "finish_reason": None, "delta": {"content": value}}
            else:
                choice = {"index": i, "finish_reason": None, "text": value, "logprobs": None}
            if kind == "content" and top is not None:
                choice["logprobs"] = {"content": [_logprobs_entry(value, n, top)]}
            yield event([choice], n + 1)
    for i in range(n_choices):
        last = ({"index": i, "finish_reason": "tool_calls" if calls else "stop", "delta": {}} if chat
                else {"index": i, "finish_reason": "stop", "text": "", "logprobs": None})
        yield event([last], len(steps))
        if (body.get("stream_options") or {}).get("include_usage"):
            # like llama-server: one usage chunk per choice, each counting that choice
            yield event([], len(steps), usage=_usage(5, len(steps)))
    yield b"data: [DONE]\n\n"
