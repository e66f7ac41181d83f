"""llama-server's answers in OpenAI's shape: the one home for answer shapes.

A documented public module (see docs/plugins.md, "Answers"): plugins import the names
below from ``gateway.answers``; the modules that hold them may move. One job each:

* :mod:`.shapes`: an answer or a stream chunk edited into OpenAI's shape; a choice's text.
* :mod:`.assembly`: streams and whole answers made from each other (asking llama-server
  to stream, assembling a stream, replaying an answer as one).
* :mod:`.usage`: token counts of an answer in any shape, summed as OpenAI counts them;
  the timings tally of an answer cut short.
* :mod:`.budgets`: how many answers a request makes and the most tokens they may cost.
* :mod:`.responses`: OpenAI's Responses API as llama-server speaks it (the core's, not
  re-exported here).
"""

from .assembly import Assembler, stream_events, stream_request
from .budgets import (
    BUDGET_FIELDS,
    BYTES_PER_TOKEN,
    choices_asked,
    completion_bound,
    completion_budget,
    generates,
    prompts_asked,
    token_bound,
)
from .shapes import choice_text, decode_json, legacy_logprobs, normalize_answer, normalize_event
from .usage import EventCount, Tally, UsageSum, cached_tokens, total_tokens, usage_of

__all__ = [
    "BUDGET_FIELDS",
    "BYTES_PER_TOKEN",
    "Assembler",
    "EventCount",
    "Tally",
    "UsageSum",
    "choice_text",
    "choices_asked",
    "completion_bound",
    "completion_budget",
    "decode_json",
    "generates",
    "legacy_logprobs",
    "normalize_answer",
    "normalize_event",
    "prompts_asked",
    "stream_events",
    "stream_request",
    "token_bound",
    "total_tokens",
    "usage_of",
    "cached_tokens",
]
