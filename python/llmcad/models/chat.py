"""Chat prompts: messages -> token ids through the tokenizer's own chat template, as transformers does.

``chat_prompt_ids(tokenizer, messages)`` is the one place llmcad turns a conversation into a prompt
(``LLMCad.generate``, ``llmcad generate --chat``, ``llmcad chat`` and the demo all call it).

Part of llmcad.models: may use llmcad.streaming; must not import llmcad.speculative, llmcad.bench or the engine.
"""
from __future__ import annotations

from llmcad.errors import PromptError


def is_messages(prompt) -> bool:
    """True for a non-empty list/tuple of dicts (a conversation), False for text or token ids."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_messages(messages) -> list:
    """``messages`` as a list of ``{"role": str, "content": str}``; PromptError naming the bad one."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise PromptError(f"message {i} ({message!r:.80}) must be a dict with str 'role' and 'content'")
    return list(messages)


def check_no_control_tokens(tokenizer, messages) -> None:
    """PromptError naming the first special token (``<|im_start|>``, ``</s>``...) written in a message's
    role or content: the template's output is tokenized whole, so such text would become the real
    control token and let a message forge roles or turns."""
    specials = sorted((t for t in special_tokens(tokenizer) if t), key=len, reverse=True)
    for i, message in enumerate(messages):
        for field in ("role", "content"):
            found = next((t for t in specials if t in message[field]), None)
            if found is not None:
                raise PromptError(f"message {i} ({message['role']!r:.40}) has {found!r} in its {field}: a special "
                                  "token of this tokenizer, which message text may not hold (it would act as a "
                                  "control token, e.g. to forge a role); remove it")


def chat_prompt_ids(tokenizer, messages) -> list:
    """The ids of ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``: the
    conversation in the model's template, ending with the prompt that opens the assistant's turn.
    Messages holding the tokenizer's special-token strings are refused (PromptError naming the token)."""
    messages = check_messages(messages)
    if not has_chat_template(tokenizer):
        raise PromptError("this model's tokenizer has no chat template, so it cannot take messages; "
                          "pass the prompt as text or token ids")
    check_no_control_tokens(tokenizer, messages)
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
    except Exception as exc:  # a template error (jinja TemplateError, raise_exception in the template)
        raise PromptError(f"the chat template rejected the messages: {' '.join(str(exc).split())}") from exc
    return [int(t) for t in encoded["input_ids"]]


def end_of_turn_ids(tokenizer) -> list:
    """Ids of the special tokens the chat template writes right after a message's content (the
    end-of-turn marker: ``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``...), found by rendering a
    short conversation; [] without a template or when it cannot be rendered."""
    if not has_chat_template(tokenizer):
        return []
    marker = "llmcad-end-of-turn-probe"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that refuses this conversation: no end-of-turn found
        return []
    after = text[text.find(marker) + len(marker):].lstrip() if marker in text else ""
    specials = sorted(special_tokens(tokenizer).items(), key=lambda t: -len(t[0]))
    return [token_id for token, token_id in specials if token and after.startswith(token)][:1]


def special_tokens(tokenizer) -> dict:
    """Text -> id of every special token: the named ones (eos, pad...) and the added tokens marked
    special (``<|im_start|>``, ``<|im_end|>``...)."""
    tokens = {t: int(i) for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)}
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            tokens.setdefault(str(added), int(token_id))
    return tokens
