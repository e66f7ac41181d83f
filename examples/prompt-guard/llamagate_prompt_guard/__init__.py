"""prompt_guard: refuse prompts that match configured patterns; optionally redact the
same patterns from answers, streamed or not.

What is checked: the text of chat messages whose role is one of ``roles`` (compared in
lower case; a role that is none of OpenAI's is always checked, since a chat template
may render it all the same), every prompt of a completions prompt list, and prompts
sent as token ids, which are turned back into text by the backend (``/detokenize``)
before they are sent; when that fails the request is refused, not let through.

What is redacted (with ``redact``): the answer's text and llama-server's
``reasoning_content``. Since per-token log probabilities would spell a redacted
answer out token by token, a request asking for them (``logprobs``, ``top_logprobs``,
``n_probs``, ``return_tokens``, ``post_sampling_probs``) is refused while redaction
is on. Streamed answers are redacted event by event: a match split across two events
is not caught (the events are not buffered, so the client's first byte is not
delayed).
"""

from __future__ import annotations

import re
from typing import Any

import requests

from gateway.plugin import InvalidRequestError, hookimpl

KNOWN_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# Fields that make llama-server return the answer's tokens one by one.
TOKEN_FIELDS = ("logprobs", "top_logprobs", "n_probs", "return_tokens", "post_sampling_probs")


def blocked(param: str) -> InvalidRequestError:
    return InvalidRequestError("This prompt was blocked by the gateway's prompt policy.",
                               code="prompt_blocked", param=param)


def texts_of(content: Any) -> list[str]:
    """The strings of a message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return []


def token_prompts(prompt: Any) -> list[list[Any]]:
    """The token-id prompts of a completions ``prompt``: ``[1, 2]`` or ``[[1, 2], [3]]``."""
    if not isinstance(prompt, list) or not prompt:
        return []
    if not isinstance(prompt[0], (str, list)):
        return [prompt]
    return [p for p in prompt if isinstance(p, list)]


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        try:
            self.patterns = [re.compile(p) for p in config["patterns"]]
        except re.error as exc:
            raise ValueError(f"patterns: {exc.pattern!r} is not a valid regular expression: {exc}") from None
        self.roles = {role.lower() for role in config["roles"]}
        self.replacement = config["replacement"]
        self.redact = config["redact"]

    def wants_events(self, ctx) -> bool:
        # Only redaction needs to see a stream's events: otherwise they stay undecoded.
        return self.redact

    def _matches(self, text: str) -> bool:
        return any(pattern.search(text) for pattern in self.patterns)

    def _redact(self, text: str) -> str:
        for pattern in self.patterns:
            text = pattern.sub(self.replacement, text)
        return text

    def _checked(self, message: Any) -> bool:
        role = message.get("role")
        role = role.lower() if isinstance(role, str) else ""
        return role in self.roles or role not in KNOWN_ROLES

    @hookimpl
    def request(self, ctx):
        body = ctx.body or {}
        if not self.patterns:
            return
        messages = body.get("messages")
        for i, message in enumerate(messages if isinstance(messages, list) else ()):
            if isinstance(message, dict) and self._checked(message) \
                    and any(self._matches(t) for t in texts_of(message.get("content"))):
                raise blocked(f"messages[{i}].content")
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
        if any(isinstance(p, str) and self._matches(p) for p in prompts):
            raise blocked("prompt")
        if self.redact:
            for name in TOKEN_FIELDS:
                if body.get(name):
                    raise InvalidRequestError(f"'{name}' is not available here: this gateway redacts answers, and "
                                              "token by token output would bypass that.", param=name)

    @hookimpl
    def upstream_request(self, ctx, payload):
        """Token-id prompts are checked as the text they stand for (the backend knows)."""
        if not self.patterns or ctx.route != "/v1/completions":
            return
        for tokens in token_prompts(payload.get("prompt")):
            try:
                resp = ctx.call_backend("POST", "/detokenize", json={"tokens": tokens})
                resp.raise_for_status()
                text = resp.json()["content"]
            except (requests.RequestException, ValueError, KeyError, TypeError):
                raise InvalidRequestError("This prompt of token ids could not be checked against the gateway's "
                                          "prompt policy; send it as text.", code="prompt_blocked",
                                          param="prompt") from None
            if not isinstance(text, str) or self._matches(text):
                raise blocked("prompt")

    def _redact_choices(self, choices: Any, holder: str) -> None:
        """Redact each choice's text: ``choice[holder]["content"]`` and its
        ``reasoning_content`` (chat) or ``choice["text"]`` (completions)."""
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            part = choice.get(holder)
            if isinstance(part, dict):
                for name in ("content", "reasoning_content"):
                    if isinstance(part.get(name), str):
                        part[name] = self._redact(part[name])
            if isinstance(choice.get("text"), str):
                choice["text"] = self._redact(choice["text"])

    @hookimpl
    def response(self, ctx, body):
        if self.redact:
            self._redact_choices(body.get("choices"), "message")

    @hookimpl
    def response_event(self, ctx, event):
        if self.redact:  # another plugin may have wanted this stream's events
            self._redact_choices(event.get("choices"), "delta")
