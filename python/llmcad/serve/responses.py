"""OpenAI response objects: completions, chat completions, their stream chunks, usage and SSE framing."""
from __future__ import annotations

import json
import time
import uuid

from llmcad.serve.worker import Outcome


class Shape:
    """The objects of one endpoint for one request (same id and creation time in every chunk)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def response(self, outcome: Outcome) -> dict:
        """The whole non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text},
                      "logprobs": None, "finish_reason": outcome.finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": outcome.finish_reason}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": usage(outcome)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, *, role: bool = False) -> dict:
        """A stream chunk carrying ``text`` (or, in chat, the assistant role) or the finish reason."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, outcome: Outcome) -> dict:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        return {**head, "choices": [], "usage": usage(outcome)}


def usage(outcome: Outcome) -> dict:
    """OpenAI's token counts (``prompt_tokens_details.cached_tokens``: prompt tokens served from the prefix
    cache), with llmcad's own stats (tokens per pass, bytes read, tokens/s, ...) under the extension field
    ``llmcad``."""
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens}, "llmcad": outcome.stats}


def sse(payload) -> bytes:
    """One server-sent event; ``payload`` a JSON-ready object or the final "[DONE]"."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), default=str)
    return f"data: {data}\n\n".encode()
