"""validate: request bodies checked against OpenAI's request schemas, plus a policy.

The schemas (``schemas/*.schema.json``) are compiled once. A failure is a 400
``invalid_request_error`` whose ``param`` names the field (``messages[0].role``).
With ``context_check`` the prompt's tokens are counted by the backend itself and a
request that cannot fit the model's context gets 400 ``context_length_exceeded``
before any generation starts.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jsonschema
import requests

from gateway import InvalidRequestError, hookimpl
from gateway.config import SCHEMA_DIR, compile_schema, format_path
from gateway.redact import clip

SCHEMA_FILES = {
    "/v1/chat/completions": "chat.completions.schema.json",
    "/v1/completions": "completions.schema.json",
    "/v1/embeddings": "embeddings.schema.json",
}
INPUT_FIELD = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}
MAX_MESSAGE = 300


def first_error(validator: jsonschema.protocols.Validator, body: dict[str, Any]) -> InvalidRequestError | None:
    """The most relevant schema violation as a client error, or None."""
    error = jsonschema.exceptions.best_match(validator.iter_errors(body))
    if error is None:
        return None
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = next(name for name in error.validator_value if name not in error.instance)
        param = clip(format_path(path + [missing]))
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    param = clip(format_path(path)) or None  # the path may run through the client's own keys
    detail = error.message if len(error.message) <= MAX_MESSAGE else error.message[:MAX_MESSAGE] + "..."
    where = f" for '{param}'" if param else ""
    return InvalidRequestError(f"Invalid value{where}: {detail}", param=param)


def input_chars(route: str, body: dict[str, Any]) -> int:
    value = body.get(INPUT_FIELD[route])
    if route == "/v1/chat/completions":
        total = 0
        for message in value:
            content = message.get("content")
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(part.get("text") or "") for part in content)
        return total
    if isinstance(value, str):
        return len(value)
    return sum(len(item) for item in value if isinstance(item, str))


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.validators = {route: compile_schema(json.loads((SCHEMA_DIR / name).read_text()))
                           for route, name in SCHEMA_FILES.items()}
        self.context_sizes: dict[str, int] = {}

    @hookimpl
    def request(self, ctx):
        validator = self.validators.get(ctx.route)
        if validator is None or ctx.body is None:
            return None
        body = ctx.body
        error = first_error(validator, body)
        if error is not None:
            raise error
        config = self.config
        if ctx.route != "/v1/embeddings":
            requested = body.get("max_completion_tokens") or body.get("max_tokens")
            if requested is None and config["default_max_tokens"]:
                body["max_tokens"] = requested = config["default_max_tokens"]
            limit = config["max_tokens_limit"]
            if limit and requested and requested > limit:
                raise InvalidRequestError(f"max_tokens is {requested}; the most this gateway allows is {limit}.",
                                          param="max_tokens")
        if config["max_messages"] and ctx.route == "/v1/chat/completions" \
                and len(body["messages"]) > config["max_messages"]:
            raise InvalidRequestError(f"{len(body['messages'])} messages; the most this gateway allows is "
                                      f"{config['max_messages']}.", param="messages")
        if config["max_input_chars"]:
            chars = input_chars(ctx.route, body)
            if chars > config["max_input_chars"]:
                raise InvalidRequestError(f"The input is {chars} characters; the most this gateway allows is "
                                          f"{config['max_input_chars']}.", param=INPUT_FIELD[ctx.route])
        return None

    @staticmethod
    def _backend(ctx, method: str, path: str, **kwargs: Any) -> Any:
        resp = ctx.call_backend(method, path, **kwargs)
        resp.raise_for_status()
        return resp.json()

    def _context_size(self, ctx) -> int:
        if ctx.replica not in self.context_sizes:
            props = self._backend(ctx, "GET", "/props")
            self.context_sizes[ctx.replica] = int(props["default_generation_settings"]["n_ctx"])
        return self.context_sizes[ctx.replica]

    def _prompt_tokens(self, ctx, payload: dict[str, Any]) -> int:
        if ctx.route == "/v1/chat/completions":
            prompt = self._backend(ctx, "POST", "/apply-template", json={"messages": payload["messages"]})["prompt"]
            return len(self._backend(ctx, "POST", "/tokenize", json={"content": prompt})["tokens"])
        prompt = payload["prompt"]
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        counts = [len(p) if isinstance(p, list) else
                  len(self._backend(ctx, "POST", "/tokenize", json={"content": p, "add_special": True})["tokens"])
                  for p in prompts]
        return max(counts)

    @hookimpl
    def upstream_request(self, ctx, payload):
        if not self.config["context_check"] or ctx.route == "/v1/embeddings" or ctx.replica is None:
            return
        try:
            context = self._context_size(ctx)
            prompt_tokens = self._prompt_tokens(ctx, payload)
        except (requests.RequestException, ValueError, KeyError) as exc:
            # The check is advisory: when the backend cannot count, let it decide.
            ctx.log(logging.WARNING, "context check skipped: %s", type(exc).__name__)
            return
        completion = payload.get("max_completion_tokens") or payload.get("max_tokens") or 0
        if prompt_tokens + completion > context:
            raise InvalidRequestError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + completion} tokens ({prompt_tokens} in the {INPUT_FIELD[ctx.route]}, "
                f"{completion} in the completion). Please reduce the length of the {INPUT_FIELD[ctx.route]} "
                f"or completion.", code="context_length_exceeded", param=INPUT_FIELD[ctx.route])
