"""What a request asks of llama-server: how many answers, for how many prompts, and the
most tokens they may cost. The one budget rule, which the plugins share: validate checks
the :data:`BUDGET_FIELDS` and a prompt's room in the context (:func:`completion_budget`),
quota reserves :func:`token_bound`, ratelimit charges :func:`completion_bound` when a
client left before the usage came."""

from __future__ import annotations

from typing import Any

from ..config import LLAMA_SERVER_ROUTES

# The fields that bound one answer's generation, in the order llama-server reads them.
BUDGET_FIELDS = ("n_predict", "max_completion_tokens", "max_tokens", "max_output_tokens")


def completion_budget(body: Any) -> int | None:
    """The completion tokens one answer of a request may generate, as llama-server reads
    them (``n_predict`` first, then ``max_completion_tokens``, ``max_tokens``, and the
    Responses API's ``max_output_tokens``), or None when it names none (or only a
    negative one: llama-server's "until the context is full")."""
    for name in BUDGET_FIELDS:
        value = body.get(name) if isinstance(body, dict) else None
        if _integer(value) and value >= 0:
            return int(value)
    return None


# The prompt's share of a reservation: a token per byte of body. Byte-level tokenizers
# never make more tokens than bytes, and the JSON around the messages (or around each
# prompt of a list: quotes and a comma, more than the BOS token llama-server adds to
# each) outweighs the chat template's own tokens, so the bound holds for every prompt
# of a request together.
BYTES_PER_TOKEN = 1


def generates(route: str) -> bool:
    """Whether a route generates tokens (chat, completions, /completion, /infill,
    Anthropic's messages, Responses); embeddings, rerank and the tokenizer do not."""
    return route in ("/v1/chat/completions", "/v1/completions") or LLAMA_SERVER_ROUTES.get(route) is not None


def completion_bound(route: str, body: Any, unbudgeted: int | None = None) -> int | None:
    """The most completion tokens a request may generate, all its answers together: one
    answer's :func:`completion_budget` (``unbudgeted`` when it names none) times its
    answers (prompts times ``n``, :func:`choices_asked`). 0 on a route that generates
    nothing; None when the body names no budget and ``unbudgeted`` is None."""
    if not generates(route):
        return 0
    budget = completion_budget(body)
    if budget is None:
        budget = unbudgeted
    if budget is None:
        return None
    return budget * choices_asked(body if isinstance(body, dict) else None)[0]


def token_bound(route: str, body: Any, body_bytes: int, unbudgeted: int) -> int:
    """The most tokens a request may cost (what a quota reserves before it runs): a token
    per byte of its body, a bound on all its prompts' tokens (see ``BYTES_PER_TOKEN``),
    plus :func:`completion_bound`, with ``unbudgeted`` for each answer of a body that
    names no budget (which may then use more)."""
    return body_bytes // BYTES_PER_TOKEN + (completion_bound(route, body, unbudgeted) or 0)


def prompts_asked(body: dict[str, Any] | None) -> int:
    """How many prompts llama-server makes of a body's ``prompt`` (completions, ``/completion``):
    a non-empty list holding no number is a prompt per item (strings, token-id lists,
    multimodal objects), as its ``tokenize_input_prompts`` reads it; anything else is one
    (a list of token ids, or of tokens and strings mixed, is one prompt)."""
    prompt = body.get("prompt") if body else None
    if isinstance(prompt, list) and prompt and not any(_number(item) for item in prompt):
        return len(prompt)
    return 1


def choices_asked(body: dict[str, Any] | None) -> tuple[int, int]:
    """How many answers (choices) a request makes, and for how many prompts: llama-server's
    ``n_cmpl`` wins over ``n``, and every prompt of a prompt list gets that many."""
    if not body:
        return 1, 1
    n = body.get("n_cmpl") if body.get("n_cmpl") is not None else body.get("n")
    n = int(n) if _integer(n) and n > 1 else 1
    prompts = prompts_asked(body)
    return n * prompts, prompts


def _integer(value: Any) -> bool:
    """A JSON integer (``true`` is not one; ``10.0`` is, as JSON Schema and llama-server read it)."""
    return type(value) is int or (type(value) is float and value.is_integer())


def _number(value: Any) -> bool:
    return type(value) in (int, float)
