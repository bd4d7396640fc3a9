"""Prompt token ids for a request (a completion prompt tokenized as the engine tokenizes a string, chat
messages through the tokenizer's chat template as the engine applies it) and the context-length checks,
done before queueing."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from llmcad.errors import PromptError
from llmcad.models.chat import chat_prompt_ids
from llmcad.serve.errors import bad_request

COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's /v1/completions


@dataclass(frozen=True)
class Frontend:
    """What request checking needs from a loaded engine. The tokenizer is a copy, used only on the event
    loop's thread: a tokenizer is not safe to use from two threads at once."""

    tokenizer: object
    context_length: int
    vocab_size: int

    @classmethod
    def of(cls, engine) -> "Frontend":
        vocab = engine.target.get_input_embeddings().weight.shape[0]
        return cls(copy.deepcopy(engine.tokenizer), engine.context_length, int(vocab))


def completion_ids(tokenizer, prompt, vocab_size: int) -> list:
    """``prompt``: a string, a list of token ids, or a list holding one string."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise bad_request("prompt: one prompt per request (a list of several strings is a batch, which "
                              "llmcad serve does not take)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt)["input_ids"]) if prompt else []
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise bad_request(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", "prompt")
    if not ids:
        raise bad_request("prompt: the prompt is empty", "prompt")
    return ids


def chat_ids(tokenizer, messages: list) -> list:
    """The chat template applied to ``messages`` with the assistant's generation prompt added, as
    ``engine.generate`` applies it to messages."""
    try:
        return chat_prompt_ids(tokenizer, messages)
    except PromptError as exc:
        raise bad_request(f"messages: {' '.join(str(exc).split())}", "messages") from None


def max_new_tokens(prompt_tokens: int, requested, context: int, default=None, param="prompt") -> int:
    """Tokens to generate: ``requested`` (400 if prompt + requested exceed the context, as OpenAI answers),
    else ``default`` capped by the room left, else the room left. 400 when the prompt leaves no room."""
    room = context - prompt_tokens
    if room <= 0:
        raise _too_long(prompt_tokens, 0, context, param)
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise _too_long(prompt_tokens, requested, context, param)
    return requested


def _too_long(prompt_tokens: int, requested: int, context: int, param: str):
    return bad_request(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} in the "
                       "completion). Please reduce the prompt or the completion length.",
                       param, code="context_length_exceeded")
