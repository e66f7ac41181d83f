"""llama-server's answers and stream chunks edited into OpenAI's shape.

* :func:`normalize_answer` and :func:`normalize_event` edit a whole answer or one
  stream chunk in place so OpenAI's clients and schemas accept it: ``model`` becomes
  the public id, ``choices[].logprobs`` and ``message.refusal`` are present (null),
  chat logprobs carry ``refusal``, and the legacy completions' logprobs, which
  llama-server sends in the chat shape (``{"content": [{"token", "logprob",
  "top_logprobs": [...]}]}``), become OpenAI's legacy shape (``tokens``,
  ``token_logprobs``, ``top_logprobs`` as ``{token: logprob}``, ``text_offset``).
* :func:`choice_text` is the text of one choice, whatever its shape.
* :func:`decode_json` reads a backend's JSON.

``text_offset`` counts characters from the start of the generated text (the first
token is at 0), not from the start of the prompt as OpenAI's does; llama-server does
not send the prompt's length with the tokens.
"""

from __future__ import annotations

import json
import math
from typing import Any

# -9999.0 is OpenAI's "very unlikely"; a probability of 0 has no logarithm.
_UNLIKELY = -9999.0


def choice_text(choice: dict[str, Any]) -> str:
    """The text of a choice: a message's or a delta's content, or a completion's text ("" if none)."""
    message = choice.get("message")
    if message is None:
        message = choice.get("delta")
    if isinstance(message, dict):
        content = message.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _logprob(entry: dict[str, Any]) -> float:
    value = entry.get("logprob")
    if isinstance(value, (int, float)):
        return value
    prob = entry.get("prob")  # llama-server's post_sampling_probs
    if isinstance(prob, (int, float)):
        return math.log(prob) if prob > 0 else _UNLIKELY
    return _UNLIKELY


def legacy_logprobs(entries: list[Any], start: int = 0) -> tuple[dict[str, list[Any]], int]:
    """llama-server's chat-shaped token list as OpenAI's legacy completion logprobs.

    Returns:
        The logprobs object, and the text offset just after its last token (to start
        the next chunk's offsets from).
    """
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    offset = start
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        token = entry.get("token")
        token = token if isinstance(token, str) else ""
        tokens.append(token)
        token_logprobs.append(_logprob(entry))
        top = entry.get("top_logprobs")
        if top is None:
            top = entry.get("top_probs")
        top_logprobs.append({t["token"]: _logprob(t) for t in top or () if isinstance(t, dict)
                             and isinstance(t.get("token"), str)})
        text_offset.append(offset)
        offset += len(token)
    return ({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
             "text_offset": text_offset}, offset)


def _normalize_choice(choice: dict[str, Any], offsets: dict[int, int] | None) -> None:
    logprobs = choice.get("logprobs")
    if "message" in choice or "delta" in choice:
        if isinstance(logprobs, dict):
            logprobs.setdefault("content", None)
            logprobs.setdefault("refusal", None)
        if "message" in choice:
            if logprobs is None:
                choice["logprobs"] = None
            message = choice["message"]
            if isinstance(message, dict):
                message.setdefault("refusal", None)
        return
    if logprobs is None:
        choice["logprobs"] = None
    elif isinstance(logprobs, dict) and "tokens" not in logprobs and isinstance(logprobs.get("content"), list):
        index = choice.get("index", 0)
        start = offsets.get(index, 0) if offsets is not None else 0
        choice["logprobs"], end = legacy_logprobs(logprobs["content"], start)
        if offsets is not None:
            offsets[index] = end


def normalize_answer(body: dict[str, Any], public_model: str) -> None:
    """Edit a whole (non-streamed) chat or completions answer in place so OpenAI clients accept it.

    ``model`` becomes ``public_model`` (llama-server answers with whatever it has
    loaded); every choice gets ``logprobs`` (null when not asked for); a chat
    message gets ``refusal`` (null) and chat logprobs ``refusal`` (null); legacy
    completion logprobs are converted to OpenAI's legacy shape (see the module's
    note on ``text_offset``). Idempotent; anything else (``timings``) is kept.
    """
    if "model" in body:
        body["model"] = public_model
    choices = body.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if isinstance(choice, dict):
            _normalize_choice(choice, None)


def normalize_event(event: dict[str, Any], public_model: str, offsets: dict[int, int] | None = None) -> None:
    """:func:`normalize_answer` for one stream chunk, in place.

    Args:
        event: The decoded ``data:`` JSON of one chunk.
        public_model: The model id the client asked for.
        offsets: One dict per stream, kept by the caller across its chunks: each
            choice's ``text_offset`` continues where its previous chunk ended. Without
            it every chunk's offsets start at 0.
    """
    if "model" in event:
        event["model"] = public_model
    choices = event.get("choices")
    if not choices or not isinstance(choices, list):
        return
    for choice in choices:
        if isinstance(choice, dict) and ("logprobs" in choice or "text" in choice):
            _normalize_choice(choice, offsets)


def decode_json(data: bytes) -> Any:
    """JSON from a backend, or None when it is not JSON."""
    try:
        return json.loads(data)
    except ValueError:
        return None
