"""prompt_guard: refuse prompts that match configured patterns; optionally redact the
same patterns from answers, streamed or not.

Streamed answers are redacted event by event: a match split across two events is not
caught (the events are not buffered, so the client's first byte is not delayed).
"""

from __future__ import annotations

import re
from typing import Any

from gateway import InvalidRequestError, hookimpl


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        try:
            self.patterns = [re.compile(p) for p in config["patterns"]]
        except re.error as exc:
            raise ValueError(f"patterns: {exc.pattern!r} is not a valid regular expression: {exc}") from None
        self.roles = set(config["roles"])
        self.replacement = config["replacement"]
        if not config["redact"]:
            # Not registered: the pipeline keeps relaying streams without decoding them.
            self.response = self.response_event = None

    def _matches(self, text: str) -> bool:
        return any(pattern.search(text) for pattern in self.patterns)

    def _redact(self, text: str) -> str:
        for pattern in self.patterns:
            text = pattern.sub(self.replacement, text)
        return text

    @hookimpl
    def request(self, ctx):
        body = ctx.body or {}
        for i, message in enumerate(body.get("messages") or []):
            content = message.get("content") if isinstance(message, dict) else None
            texts = [content] if isinstance(content, str) else [
                part.get("text") or "" for part in content or [] if isinstance(part, dict)]
            if message.get("role") in self.roles and any(self._matches(t) for t in texts):
                raise InvalidRequestError("This prompt was blocked by the gateway's prompt policy.",
                                          code="prompt_blocked", param=f"messages[{i}].content")
        prompt = body.get("prompt")
        if isinstance(prompt, str) and self._matches(prompt):
            raise InvalidRequestError("This prompt was blocked by the gateway's prompt policy.",
                                      code="prompt_blocked", param="prompt")

    def _redact_choices(self, choices: Any, holder: str) -> None:
        """Redact each choice's text: ``choice[holder]["content"]`` (chat) or ``choice["text"]``."""
        for choice in choices or []:
            part = choice.get(holder)
            if isinstance(part, dict) and isinstance(part.get("content"), str):
                part["content"] = self._redact(part["content"])
            elif isinstance(choice.get("text"), str):
                choice["text"] = self._redact(choice["text"])

    @hookimpl
    def response(self, ctx, body):
        self._redact_choices(body.get("choices"), "message")

    @hookimpl
    def response_event(self, ctx, event):
        self._redact_choices(event.get("choices"), "delta")
