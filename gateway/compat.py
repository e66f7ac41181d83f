"""Smoothing llama-server's answers into OpenAI's documented shape."""

from __future__ import annotations

from typing import Any


def normalize_answer(body: dict[str, Any], public_model: str) -> None:
    """Edit a non-streamed answer in place so OpenAI clients accept it.

    llama-server answers with the model it has loaded, whatever was asked, and
    leaves out fields OpenAI's schemas require but allow to be null
    (``choices[].logprobs``, ``choices[].message.refusal``).
    """
    if "model" in body:
        body["model"] = public_model
    choices = body.get("choices")
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        choice.setdefault("logprobs", None)
        message = choice.get("message")
        if isinstance(message, dict):
            message.setdefault("refusal", None)
