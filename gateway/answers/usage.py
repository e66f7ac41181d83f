"""Token counts of answers in every shape llama-server speaks, summed as OpenAI counts them.

* :class:`UsageSum` sums llama-server's per-choice usage reports of a chat or
  completions answer into OpenAI's one ``usage``.
* :class:`Tally` keeps the ``timings`` llama-server puts on each chunk: the usage of an
  answer cut short before its usage chunk.
* :func:`usage_of` reads the usage of an answer or event in any shape (OpenAI's,
  Responses', Anthropic's, llama-server's native), and :class:`EventCount` that of a
  stream in those shapes.
* :func:`total_tokens` is an answer's ``usage.total_tokens`` when it is a sane count.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .shapes import decode_json

_TIMINGS = re.compile(rb'"timings":(\{[^{}]*\})')
_INDEX = re.compile(rb'"index":(\d+)')


def total_tokens(usage: Any) -> int | None:
    """An answer's ``usage.total_tokens``, or None when it is not a sane count (a number >= 0)."""
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    if type(total) is float and math.isfinite(total):
        total = int(total)
    return total if type(total) is int and total >= 0 else None


class UsageSum:
    """One answer's usage from llama-server's reports, which count each choice apart (chat
    sends a usage chunk per choice, completions put usage on each choice's last chunk),
    summed as OpenAI counts: every choice's completion tokens, each prompt's tokens (and
    their details) once. Choice ``i`` answers prompt ``i // per_prompt`` (a prompt list,
    see :func:`.budgets.choices_asked`); a report without a choice's index is of the one prompt.
    ``total`` is the sum so far (None before the first report): a fresh dict, the first
    report's fields kept, ``total_tokens`` recomputed."""

    def __init__(self, per_prompt: int = 1) -> None:
        self.per_prompt = max(1, per_prompt)
        self.prompts: set[int] = set()
        self.total: dict[str, Any] | None = None

    def add(self, usage: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
        """Count the report of one chunk (or whole answer), ``event``; returns the total."""
        choices = event.get("choices")
        index = choices[0].get("index") if isinstance(choices, list) and choices and isinstance(choices[0], dict) \
            else None
        prompt = (index if type(index) is int and index >= 0 else 0) // self.per_prompt
        new_prompt = prompt not in self.prompts
        self.prompts.add(prompt)
        total = self.total
        if total is None:
            total = self.total = dict(usage)
            for key in ("prompt_tokens_details", "completion_tokens_details"):
                if isinstance(usage.get(key), dict):
                    total[key] = dict(usage[key])
            return total
        fields = ("prompt_tokens", "completion_tokens") if new_prompt else ("completion_tokens",)
        for key in fields:
            total[key] = _int(total.get(key)) + _int(usage.get(key))
            details, more = total.get(f"{key}_details"), usage.get(f"{key}_details")
            if isinstance(details, dict) and isinstance(more, dict):
                for name, value in more.items():
                    if isinstance(value, int) and isinstance(details.get(name, 0), int):
                        details[name] = details.get(name, 0) + value
        total["total_tokens"] = _int(total.get("prompt_tokens")) + _int(total.get("completion_tokens"))
        return total


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Tally:
    """What llama-server counted of an answer so far, from the ``timings`` it puts on
    every chunk when asked: the usage of an answer that ended before its usage chunk.

    It keeps a reference to the last chunk of each choice; nothing is decoded until
    :meth:`usage` is asked, once, at the end. With one choice (the usual case) seeing
    a chunk is one byte search and one assignment.

    Args:
        choices: How many choices the request makes (see :func:`.budgets.choices_asked`).
        prompts: How many prompts they answer (a completions prompt list): each
            prompt's tokens count once, however many choices share it.
    """

    def __init__(self, choices: int = 1, prompts: int = 1) -> None:
        self.several = choices > 1
        self.per_prompt = max(1, choices // max(1, prompts))  # choices sharing one prompt
        self.last: dict[bytes, bytes] = {}

    def see(self, raw: bytes) -> None:
        if b'"timings"' in raw:
            if self.several:
                index = _INDEX.search(raw)
                self.last[index.group(1) if index else b"0"] = raw
            else:
                self.last[b"0"] = raw

    def usage(self) -> dict[str, int] | None:
        """Prompt tokens (cached and processed) and the tokens generated, all choices."""
        prompt, completion = 0, 0
        for raw in self.last.values():
            found = _TIMINGS.search(raw)
            timings = decode_json(found.group(1)) if found else None
            if not isinstance(timings, dict):
                continue
            prompt += _count(timings.get("cache_n")) + _count(timings.get("prompt_n"))
            completion += _count(timings.get("predicted_n"))
        prompt //= self.per_prompt
        if not prompt and not completion:
            return None
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _count(value: Any) -> int:
    """A token count from a backend's JSON: a non-negative int, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_of(answer: Any, per_prompt: int = 1) -> dict[str, int] | None:
    """The token counts of an answer or stream event in any shape llama-server speaks, as
    OpenAI's ``usage`` (``prompt_tokens``, ``completion_tokens``, ``total_tokens``), or None:

    - OpenAI's (``usage.prompt_tokens``), Responses' (``usage.input_tokens``, also inside
      a ``response.completed`` event's ``response``) and Anthropic's (``usage.input_tokens``
      plus ``cache_read_input_tokens``: Anthropic counts cached input apart; also inside a
      ``message_start`` event's ``message``);
    - llama-server's native ``/completion`` and ``/infill``: ``tokens_evaluated`` and
      ``tokens_predicted``; its answer to a prompt list (or ``n_cmpl``) is a list of such
      answers, one per choice, summed: every choice's completion, each prompt's tokens
      once (``per_prompt`` choices share one, see :func:`.budgets.choices_asked`).
    """
    if isinstance(answer, list):
        counts = _Counts(per_prompt)
        for position, item in enumerate(answer):
            usage = usage_of(item)
            if usage is not None:
                counts.set(_index(item, position), usage["prompt_tokens"], usage["completion_tokens"])
        return counts.usage()
    if not isinstance(answer, dict):
        return None
    usage = answer.get("usage")
    for wrapper in ("response", "message"):  # a Responses or an Anthropic stream event's whole answer
        if not isinstance(usage, dict) and isinstance(answer.get(wrapper), dict):
            usage = answer[wrapper].get("usage")
    if isinstance(usage, dict):
        if "prompt_tokens" in usage or "completion_tokens" in usage:
            prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        else:
            prompt = _count(usage.get("input_tokens")) + _count(usage.get("cache_read_input_tokens"))
            completion = _count(usage.get("output_tokens"))
    elif "tokens_predicted" in answer or "tokens_evaluated" in answer:
        prompt, completion = _count(answer.get("tokens_evaluated")), _count(answer.get("tokens_predicted"))
    else:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _index(item: Any, default: int) -> int:
    index = item.get("index") if isinstance(item, dict) else None
    return index if type(index) is int and index >= 0 else default


class _Counts:
    """The largest counts seen for each choice of an answer, summed as OpenAI counts them:
    every choice's completion tokens, each prompt's tokens once (choice ``i`` answers
    prompt ``i // per_prompt``)."""

    def __init__(self, per_prompt: int = 1) -> None:
        self.per_prompt = max(1, per_prompt)
        self.prompts: dict[int, int] = {}
        self.completions: dict[int, int] = {}

    def set(self, index: int, prompt: int, completion: int) -> None:
        key = index // self.per_prompt
        self.prompts[key] = max(self.prompts.get(key, 0), prompt)
        self.completions[index] = max(self.completions.get(index, 0), completion)

    def usage(self, completion_floor: int = 0) -> dict[str, int] | None:
        prompt = sum(self.prompts.values())
        completion = sum(self.completions.values()) or completion_floor
        if not prompt and not completion:
            return None
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class EventCount:
    """The usage of a stream in another shape: the largest counts its events report
    (Anthropic's ``message_start`` tells the input, ``message_delta`` the output so far,
    Responses' ``response.completed`` both, llama-server's native events their choice's
    so far, each choice apart by its ``index``, summed as :func:`usage_of` sums a list),
    and until one reports output, one completion token per event seen (llama-server
    sends about a token an event), so that a stream left early is still charged about
    what was generated.

    Args:
        choices: How many choices the request makes, and prompts they answer
            (:func:`.budgets.choices_asked`).
    """

    def __init__(self, choices: int = 1, prompts: int = 1) -> None:
        self.events = 0
        self.counts = _Counts(max(1, choices // max(1, prompts)))

    def see(self, raw: bytes) -> None:
        self.events += 1
        if b'"usage"' not in raw and b'"tokens_predicted"' not in raw:
            return
        start = raw.find(b"data:")
        event = decode_json(raw[start + 5:]) if start >= 0 else None
        usage = usage_of(event)
        if usage is not None:
            self.counts.set(_index(event, 0), usage["prompt_tokens"], usage["completion_tokens"])

    def usage(self) -> dict[str, int] | None:
        return self.counts.usage(completion_floor=self.events)


def cached_tokens(usage: Any) -> int | None:
    """Prompt tokens llama-server took from the slot's KV cache (its ``timings.cache_n``,
    which its usage repeats as ``prompt_tokens_details.cached_tokens``, or Responses'
    ``input_tokens_details.cached_tokens``); None when the usage does not say."""
    if not isinstance(usage, dict):
        return None
    for details in ("prompt_tokens_details", "input_tokens_details"):
        part = usage.get(details)
        cached = part.get("cached_tokens") if isinstance(part, dict) else None
        if isinstance(cached, int) and not isinstance(cached, bool):
            return cached
    return None
