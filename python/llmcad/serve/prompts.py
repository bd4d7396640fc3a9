"""Prompt token ids for a request (a completion prompt tokenized as the engine tokenizes a string, chat
messages through the tokenizer's chat template as the engine applies it) and the context-length and
KV-room checks, done before queueing. A text far too long for the context is refused by its length in
characters, before it is tokenized."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from llmcad.errors import PromptError
from llmcad.models.chat import chat_prompt_ids
from llmcad.serve.errors import bad_request

COMPLETION_DEFAULT_MAX_TOKENS = 16  # as OpenAI's /v1/completions
# a Unicode normalizer (NFC, NFKC) may compose up to 4 code points into one (U+1F82 = 4 in NFD)
COMPOSITION_MAX = 4
_TEXT_KEEPING_NORMALIZERS = {"NFC": COMPOSITION_MAX, "NFKC": COMPOSITION_MAX, "NFD": 1, "NFKD": 1, "Lowercase": 1,
                             "Prepend": 1}
_TEXT_DROPPING_SPLITS = ("Whitespace", "WhitespaceSplit")  # pre-tokenizers that drop the whitespace


@dataclass(frozen=True)
class Frontend:
    """What request checking needs from a loaded engine. The tokenizer is a copy, used only on the
    server's one preparing thread: a tokenizer is not safe to use from two threads at once.
    ``kv_positions``: the KV caches' room under the memory budget (None: no budget).
    ``chars_per_token``: the most characters of text one token can stand for (None: no bound known)."""

    tokenizer: object
    context_length: int
    vocab_size: int
    kv_positions: int | None = None
    chars_per_token: int | None = None

    @classmethod
    def of(cls, engine) -> "Frontend":
        vocab = engine.target.get_input_embeddings().weight.shape[0]
        tokenizer = copy.deepcopy(engine.tokenizer)
        return cls(tokenizer, engine.context_length, int(vocab), engine.kv_positions, chars_per_token(tokenizer))


def chars_per_token(tokenizer) -> int | None:
    """An upper bound on the characters of text one token stands for: the longest vocabulary entry (a
    byte-level entry has one character per byte, and a byte is at most one character), times what the
    normalizer may compose. None unless the tokenizer is a byte-level BPE whose normalizer and
    pre-tokenizer drop no text, and which fuses no unknown characters (another could map a long text
    to fewer tokens than any bound allows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE" or getattr(backend.model, "fuse_unk", True):
        return None
    normalizers = [step["type"] for step in _steps(backend.normalizer)]
    pre = _steps(backend.pre_tokenizer)
    drops = [step for step in pre if step.get("behavior") == "Removed" or step["type"] in _TEXT_DROPPING_SPLITS]
    vocab = backend.get_vocab(with_added_tokens=True)
    if not vocab or "ByteLevel" not in [step["type"] for step in pre] or drops \
            or any(step not in _TEXT_KEEPING_NORMALIZERS for step in normalizers):
        return None
    slack = max([_TEXT_KEEPING_NORMALIZERS[step] for step in normalizers], default=1)
    return max(len(entry) for entry in vocab) * slack


def _steps(component) -> list:
    """The steps of a normalizer or pre-tokenizer (as tokenizer.json writes them), a Sequence flattened."""
    return _flat(json.loads(component.__getstate__())) if component is not None else []


def _flat(step: dict) -> list:
    if step.get("type") == "Sequence":
        return [s for inner in step.get("normalizers") or step.get("pretokenizers") or [] for s in _flat(inner)]
    return [step]


def check_text_length(frontend: Frontend, text: str, param: str, what: str = "prompt") -> None:
    """400 ``context_length_exceeded`` for a text that certainly has more tokens than the context."""
    bound = frontend.chars_per_token
    if bound is not None and len(text) > frontend.context_length * bound:
        least = -(-len(text) // bound)
        raise bad_request(f"This model's maximum context length is {frontend.context_length} tokens. However, the "
                          f"{what} is {len(text)} characters long, which makes at least {least} tokens. Please "
                          "reduce the length.", param, code="context_length_exceeded")


def completion_ids(frontend: Frontend, prompt) -> list:
    """``prompt``: a string, a list of token ids, or a list holding one string."""
    tokenizer, vocab_size = frontend.tokenizer, frontend.vocab_size
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise bad_request("prompt: one prompt per request (a list of several strings is a batch, which "
                              "llmcad serve does not take)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_text_length(frontend, prompt, "prompt")
        ids = list(tokenizer(prompt)["input_ids"]) if prompt else []
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise bad_request(f"prompt: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", "prompt")
    if not ids:
        raise bad_request("prompt: the prompt is empty", "prompt")
    return ids


def chat_ids(frontend: Frontend, messages: list) -> list:
    """The chat template applied to ``messages`` with the assistant's generation prompt added, as
    ``engine.generate`` applies it to messages. The template's text is measured before it is tokenized."""
    try:
        text = frontend.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - chat_prompt_ids below reports what the template refuses
        text = None
    if isinstance(text, str):
        check_text_length(frontend, text, "messages", "conversation in the chat template")
    try:
        return chat_prompt_ids(frontend.tokenizer, messages)
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


def check_kv_room(prompt_tokens: int, kv_positions: int | None, param: str) -> None:
    """400 when the prompt leaves no room in the KV caches the memory budget leaves, as ``generate``
    refuses it (BudgetError)."""
    if kv_positions is not None and prompt_tokens + 1 > kv_positions:
        raise bad_request(f"The prompt's {prompt_tokens} tokens leave no room to generate in the KV cache the "
                          f"server's memory budget leaves ({kv_positions} positions). Please reduce the prompt, or "
                          "start the server with a larger --memory-budget.", param, code="context_length_exceeded")
