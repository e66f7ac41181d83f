"""validate: request bodies checked against OpenAI's request schemas, plus a policy.

The schemas (``schemas/*.schema.json``) are compiled once. A failure is a 400
``invalid_request_error`` whose ``param`` names the field (``messages[0].role``).
With ``context_check`` the prompt's tokens are counted by the backend itself and a
request that cannot fit the model's context gets 400 ``context_length_exceeded``
before any generation starts.

Order of the checks, cheapest first, so that a hostile body costs little CPU:

1. Sizes (before the schema, each guarded against wrong types, which the schema
   then reports): ``max_messages``, ``max_content_parts``, ``max_tools``,
   ``max_logit_bias``, at most 4 ``stop`` strings of ``max_stop_chars`` each,
   ``max_input_chars``, ``max_dry_sequence_breakers``, the number of completions
   (``max_n``), and token-id arrays
   (``prompt``, ``input``), which are checked here in one pass because the schema's
   ``oneOf`` costs tens of microseconds per token id.
2. The schema.
3. The generation policy on llama-server's own request fields, below.

llama-server reads many fields besides OpenAI's (``params_from_json_cmpl`` in
``tools/server/server-task.cpp``; ``oaicompat_chat_params_parse`` copies every
unknown field of a chat body into them). The ones that change how much work a
request makes, or that reach past the request's own slot, are handled so::

    bounded like max_tokens
      n_predict, max_completion_tokens, max_tokens
                      llama-server uses the first of n_predict, max_completion_tokens,
                      max_tokens; a negative value means "until EOS or the context is
                      full". Each one given must be >= 0 and <= max_tokens_limit, and
                      all of them are set to the smallest, so the budget is the same
                      whichever llama-server reads. None given: max_tokens is set to
                      default_max_tokens, else to max_tokens_limit.
      n, n_cmpl       completions per prompt (n_cmpl wins); times the prompts of a
                      prompt list (/v1/completions, /completion), at most max_n. Each
                      takes a slot while the gateway's admission counts the request
                      once: max_n bounds the slots one admitted request holds.
    bounded lists     /completion's prompt, /embedding's input or content, rerank's
                      documents or texts: a task per item; at most 2048 items (as
                      OpenAI's embeddings input) and max_input_chars in all.
      n_probs         per-token probabilities (llama-server's top_logprobs), which
                      multiply the answer's size: at most max_n_probs.
      ignore_eos      only while the generation is bounded (a max_tokens given or
                      set by this plugin): otherwise it runs until the context is full.
      logit_bias      at most max_logit_bias entries (each is applied on every token).
      stop            at most 4 strings of max_stop_chars (each is matched against
                      the text on every token).
      dry_sequence_breakers
                      at most max_dry_sequence_breakers strings of 64 characters: with
                      dry_multiplier > 0 llama-server prepares each one against the
                      whole vocabulary in its main loop, ~60 ms a breaker with every
                      slot waiting (400 breakers stalled a 2-slot server 17 s).
    refused (400) unless named in allow_backend_fields
      id_slot         picks the slot: evicts another tenant's cached prompt and
                      bypasses the gateway's slot accounting.
      lora            per-request adapters: a change of adapters clears the slot's
                      cache and keeps the request out of shared batches.
      grammar         a raw GBNF grammar is checked on every sampling step, in the
                      server's main loop: a 1000-alternative grammar (11 KB) made each
                      token 23x slower, 20000 alternatives 14 s a token, every slot
                      waiting. (json_schema and response_format, compiled by llama-server
                      itself, pass.)
      n_keep, n_discard, n_cache_reuse, speculative.*, backend_sampling
                      server tuning (context shift, cache reuse, drafting) that the
                      operator sets on the command line.
      chat_format, chat_parser, grammar_lazy, grammar_triggers, preserved_tokens,
      thinking_forced_open, parse_tool_calls
                      llama-server's own plumbing between its chat template and its
                      sampler (it sets them itself on the chat route).
    dropped from the body (they change the answer's shape the gateway relays)
      timings_per_token, return_progress, response_fields, return_tokens,
      post_sampling_probs
    media
      image_url parts whose URL is not a data: URL are refused unless
      allow_media_urls: with a multimodal projector llama-server fetches http(s)
      URLs itself (a request forgery from the backend's network) and reads
      file:// URLs under its --media-path.
    passed through
      t_max_predict_ms, n_indent (they only end a generation sooner), cache_prompt,
      samplers, top_k, min_p, typical_p, top_n_sigma, xtc_*, dynatemp_*, mirostat*,
      repeat_*, the other dry_* fields, seed, json_schema, response_format (llama-server
      caps a grammar's repetitions itself), chat_template_kwargs, reasoning_format.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import jsonschema
import requests

from gateway.plugin import (
    BUDGET_FIELDS,
    LLAMA_SERVER_ROUTES,
    SCHEMA_DIR,
    InvalidRequestError,
    choices_asked,
    clip,
    compile_check,
    compile_schema,
    completion_budget,
    format_path,
    hookimpl,
)

SCHEMA_FILES = {
    "/v1/chat/completions": "chat.completions.schema.json",
    "/v1/completions": "completions.schema.json",
    "/v1/embeddings": "embeddings.schema.json",
}
INPUT_FIELD = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}
MAX_MESSAGE = 300
MAX_STOP = 4                 # the schemas' own bound (OpenAI's)
MAX_EMBEDDING_INPUTS = 2048  # likewise; also the bound of llama-server's own list inputs (LIST_INPUTS)
# llama-server's native routes that make a task per item of a list: /completion's prompt
# (also counted as answers against max_n), the embeddings' input or content, rerank's
# documents (or TEI's texts).
LIST_INPUTS = {"/completion": ("prompt",), "/embedding": ("input", "content"),
               **{route: ("documents", "texts") for route in ("/v1/rerank", "/v1/reranking", "/rerank", "/reranking")}}
INT32_MAX = 2**31 - 1
MAX_BREAKER_CHARS = 64

REFUSED_FIELDS = {
    "id_slot": "it picks the backend slot, which evicts another client's cached prompt",
    "lora": "per-request adapters are not offered by this gateway",
    "grammar": "a GBNF grammar can make every sampling step of the backend slow; use response_format",
    "n_keep": "context shifting is set by the operator",
    "n_discard": "context shifting is set by the operator",
    "n_cache_reuse": "prompt cache reuse is set by the operator",
    "backend_sampling": "the sampling backend is set by the operator",
    "chat_format": "llama-server sets it from the chat template",
    "chat_parser": "llama-server sets it from the chat template",
    "grammar_lazy": "llama-server sets it from the chat template",
    "grammar_triggers": "llama-server sets it from the chat template",
    "preserved_tokens": "llama-server sets it from the chat template",
    "thinking_forced_open": "llama-server sets it from the chat template",
    "parse_tool_calls": "llama-server sets it from the chat template",
}
REFUSED_PREFIXES = ("speculative.",)
DROPPED_FIELDS = ("timings_per_token", "return_progress", "response_fields", "return_tokens", "post_sampling_probs")


def first_error(validator: jsonschema.protocols.Validator, body: dict[str, Any],
                check: Callable[[Any], bool] | None = None) -> InvalidRequestError | None:
    """The most relevant schema violation as a client error, or None; ``check`` (a
    :func:`gateway.schemas.compile_check`) answers the common case, a valid body, first."""
    if check is not None and check(body):
        return None
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
    """Characters of input; safe on any body (values of the wrong type count 0, the
    schema reports them)."""
    value = body.get(INPUT_FIELD[route])
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, list):
        return 0
    if route == "/v1/chat/completions":
        total = 0
        for message in value:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(part["text"]) for part in content
                             if isinstance(part, dict) and isinstance(part.get("text"), str))
        return total
    return sum(len(item) for item in value if isinstance(item, str))


def is_int(value: Any) -> bool:
    """A JSON integer (``true`` is not one; ``10.0`` is, as JSON Schema says)."""
    return (type(value) is int) or (type(value) is float and value.is_integer())


def token_ids(value: Any) -> bool:
    """A non-empty array of token ids (integers >= 0), checked in one pass."""
    return isinstance(value, list) and bool(value) and all(type(t) is int and t >= 0 for t in value)


def refuse(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


class Plugin:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        limit, default = config["max_tokens_limit"], config["default_max_tokens"]
        if limit and default and default > limit:
            raise ValueError(f"default_max_tokens ({default}) is above max_tokens_limit ({limit})")
        self.allowed_fields = set(config["allow_backend_fields"])
        unknown = sorted(f for f in self.allowed_fields if f not in REFUSED_FIELDS and not f.startswith(REFUSED_PREFIXES))
        if unknown:
            raise ValueError(f"allow_backend_fields: {', '.join(unknown)}: not a field this plugin refuses "
                             f"(those are {', '.join(REFUSED_FIELDS)}, speculative.*)")
        schemas = {route: json.loads((SCHEMA_DIR / name).read_text()) for route, name in SCHEMA_FILES.items()}
        self.validators = {route: compile_schema(schema) for route, schema in schemas.items()}
        self.checks = {route: compile_check(schema) for route, schema in schemas.items()}  # the fast yes/no
        self.context_sizes: dict[str, int] = {}

    # --- 1. sizes, before the schema ------------------------------------------------

    def _check_sizes(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """Refuse bodies over the size limits; returns the body to run the schema on
        (token-id arrays checked here are replaced by a stand-in the schema accepts)."""
        config = self.config
        messages = body.get("messages")
        if route == "/v1/chat/completions" and isinstance(messages, list):
            if config["max_messages"] and len(messages) > config["max_messages"]:
                raise refuse(f"{len(messages)} messages; the most this gateway allows is {config['max_messages']}.",
                             "messages")
            parts = 0
            for i, message in enumerate(messages):
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, list):
                    parts += len(content)
                    if parts > config["max_content_parts"]:
                        raise refuse(f"Too many content parts; the most this gateway allows in a request is "
                                     f"{config['max_content_parts']}.", f"messages[{i}].content")
        tools = body.get("tools")
        if isinstance(tools, list) and len(tools) > config["max_tools"]:
            raise refuse(f"{len(tools)} tools; the most this gateway allows is {config['max_tools']}.", "tools")
        bias = body.get("logit_bias")
        if isinstance(bias, (dict, list)) and len(bias) > config["max_logit_bias"]:
            raise refuse(f"logit_bias has {len(bias)} entries; the most this gateway allows is "
                         f"{config['max_logit_bias']}.", "logit_bias")
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
        if len(stops) > MAX_STOP:
            raise refuse(f"Invalid value for 'stop': {len(stops)} sequences; at most {MAX_STOP} are allowed.", "stop")
        if any(isinstance(s, str) and len(s) > config["max_stop_chars"] for s in stops):
            raise refuse(f"Invalid value for 'stop': a stop sequence is longer than {config['max_stop_chars']} "
                         "characters.", "stop")
        breakers = body.get("dry_sequence_breakers")
        if isinstance(breakers, list) and (len(breakers) > config["max_dry_sequence_breakers"] or any(
                not isinstance(b, str) or len(b) > MAX_BREAKER_CHARS for b in breakers)):
            raise refuse(f"dry_sequence_breakers: at most {config['max_dry_sequence_breakers']} strings of at most "
                         f"{MAX_BREAKER_CHARS} characters.", "dry_sequence_breakers")
        if config["max_input_chars"] and route in INPUT_FIELD:
            chars = input_chars(route, body)
            if chars > config["max_input_chars"]:
                raise refuse(f"The input is {chars} characters; the most this gateway allows is "
                             f"{config['max_input_chars']}.", INPUT_FIELD[route])
        if route == "/v1/completions":
            self._check_answers(body)  # before the schema walks a long prompt list
            return self._token_input(body, "prompt", None)
        if route == "/v1/embeddings":
            return self._token_input(body, "input", MAX_EMBEDDING_INPUTS)
        return body

    def _check_answers(self, body: dict[str, Any]) -> None:
        """The answers a request makes, n (or n_cmpl) for each prompt of a prompt list
        (:func:`gateway.answers.choices_asked`): at most max_n. Each takes a backend
        slot while the gateway's admission counts the request once."""
        for name in ("n_cmpl", "n"):
            value = body.get(name)
            if value is not None and (not is_int(value) or value < 1):
                raise refuse(f"Invalid value for '{name}': {json.dumps(value)[:40]} is not an integer >= 1.", name)
        answers, prompts = choices_asked(body)
        if answers > self.config["max_n"]:
            name = "n_cmpl" if body.get("n_cmpl") is not None else "n"
            raise refuse(f"This request asks for {answers} completions ({prompts} prompt(s) x {name}="
                         f"{answers // prompts}); the most this gateway allows is {self.config['max_n']}.",
                         "prompt" if prompts > 1 else name)

    def _check_list_inputs(self, route: str, body: dict[str, Any]) -> None:
        """llama-server's own list inputs (a task, and a slot, per item): at most
        MAX_EMBEDDING_INPUTS items, and max_input_chars of text in all."""
        for field in LIST_INPUTS.get(route, ()):
            value = body.get(field)
            if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
                raise refuse(f"Invalid value for '{field}': {len(value)} items; at most {MAX_EMBEDDING_INPUTS} are "
                             "allowed.", field)
            limit = self.config["max_input_chars"]
            items = value if isinstance(value, list) else [value]
            chars = sum(len(item) for item in items if isinstance(item, str))
            if limit and chars > limit:
                raise refuse(f"The input is {chars} characters; the most this gateway allows is {limit}.", field)

    @staticmethod
    def _token_input(body: dict[str, Any], field: str, max_items: int | None) -> dict[str, Any]:
        """Check a list-valued ``prompt``/``input`` here, without the schema's oneOf."""
        value = body.get(field)
        if not isinstance(value, list):
            return body  # a string, or a wrong type: the schema's business
        if max_items is not None and len(value) > max_items:
            raise refuse(f"Invalid value for '{field}': {len(value)} items; at most {max_items} are allowed.", field)
        if value and all(isinstance(item, str) for item in value):
            return body  # strings: the schema checks them, their number is bounded
        if token_ids(value) or (value and all(token_ids(item) for item in value)):
            return dict(body, **{field: "x"})  # valid: let the schema see a stand-in
        raise refuse(f"Invalid value for '{field}': expected a string, an array of strings, an array of token ids "
                     "(integers >= 0) or an array of such arrays, none of them empty.", field)

    # --- 3. llama-server's fields ---------------------------------------------------

    def _check_backend_fields(self, route: str, body: dict[str, Any]) -> None:
        for name in list(body):
            if name in self.allowed_fields:
                continue
            if name in REFUSED_FIELDS:
                raise refuse(f"'{name}' is not accepted by this gateway: {REFUSED_FIELDS[name]}.", name)
            if name.startswith(REFUSED_PREFIXES):
                raise refuse(f"'{name}' is not accepted by this gateway: speculative decoding is set by the "
                             "operator.", name)
        for name in DROPPED_FIELDS:
            body.pop(name, None)
        if route == "/v1/chat/completions" and not self.config["allow_media_urls"]:
            for i, message in enumerate(body["messages"]):
                content = message.get("content")
                for j, part in enumerate(content if isinstance(content, list) else ()):
                    if part.get("type") != "image_url":
                        continue
                    image = part.get("image_url")
                    url = image.get("url") if isinstance(image, dict) else image
                    if not isinstance(url, str) or not url.startswith("data:"):
                        raise refuse("Images must be sent inline as data: URLs; this gateway does not let the "
                                     "backend fetch URLs.", f"messages[{i}].content[{j}].image_url")

    def _check_generation(self, body: dict[str, Any], budget_field: str = "max_tokens") -> None:
        config = self.config
        limit = config["max_tokens_limit"]
        given = {}
        for name in BUDGET_FIELDS:
            value = body.get(name)
            if value is None:
                continue
            if not is_int(value):
                raise refuse(f"Invalid value for '{name}': {json.dumps(value)[:40]} is not an integer.", name)
            if value < 0:
                raise refuse(f"{name} is {int(value)}, which would let the generation run until the context is "
                             f"full; ask for a number of tokens{f' (at most {limit})' if limit else ''}.", name)
            if limit and value > limit:
                raise refuse(f"{name} is {int(value)}; the most this gateway allows is {limit}.", name)
            if value > INT32_MAX:  # llama-server's int32 would overflow (to a negative: unbounded)
                raise refuse(f"{name} is {int(value)}; the most llama-server takes is {INT32_MAX}.", name)
            given[name] = int(value)
        if given:
            budget = min(given.values())
            for name in given:  # whichever llama-server reads, it reads the smallest
                body[name] = budget
        elif config["default_max_tokens"] or limit:
            body[budget_field] = budget = config["default_max_tokens"] or limit
        else:
            budget = None
        if body.get("ignore_eos") and budget is None:
            raise refuse("ignore_eos needs max_tokens: without it the generation runs until the context is full.",
                         "ignore_eos")
        n_probs = body.get("n_probs")
        if n_probs is not None and (not is_int(n_probs) or not 0 <= n_probs <= config["max_n_probs"]):
            raise refuse(f"Invalid value for 'n_probs': {json.dumps(n_probs)[:40]}; it must be an integer from 0 to "
                         f"{config['max_n_probs']}.", "n_probs")
        self._check_answers(body)

    @hookimpl
    def request(self, ctx):
        if ctx.body is None:
            return None
        if ctx.route in LLAMA_SERVER_ROUTES:  # no OpenAI schema; llama-server's fields and budget still
            self._check_list_inputs(ctx.route, ctx.body)
            self._check_backend_fields(ctx.route, ctx.body)
            if LLAMA_SERVER_ROUTES[ctx.route]:
                self._check_generation(ctx.body, LLAMA_SERVER_ROUTES[ctx.route])
            return None
        validator = self.validators.get(ctx.route)
        if validator is None:
            return None
        body = ctx.body
        error = first_error(validator, self._check_sizes(ctx.route, body), self.checks[ctx.route])
        if error is not None:
            raise error
        self._check_backend_fields(ctx.route, body)
        if ctx.route != "/v1/embeddings":
            self._check_generation(body)
        return None

    # --- context_check --------------------------------------------------------------

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
        completion = completion_budget(payload) or 0  # one answer's: each has its own slot and context
        if prompt_tokens + completion > context:
            raise InvalidRequestError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + completion} tokens ({prompt_tokens} in the {INPUT_FIELD[ctx.route]}, "
                f"{completion} in the completion). Please reduce the length of the {INPUT_FIELD[ctx.route]} "
                f"or completion.", code="context_length_exceeded", param=INPUT_FIELD[ctx.route])
