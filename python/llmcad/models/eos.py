"""End-of-generation ids, as the original model has them.

A GGUF file records one ``eos_token_id`` (plus, sometimes, ``eot``/``eom`` ids), and transformers'
GGUF import writes only that one into ``generation_config.json``. Chat models end a turn with another
token (Qwen2.5 Instruct: ``<|im_end|>`` 151645 and ``<|endoftext|>`` 151643; the original checkpoints
list both). ``prepare`` therefore stores every id the source defines, from its metadata, the
tokenizer's special tokens (the end-of-generation names llama.cpp also stops on) and the chat
template's end-of-turn, and generation stops on all of them.

Part of llmcad.models: may use llmcad.streaming; must not import llmcad.speculative, llmcad.bench or the engine.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmcad.errors import ModelLoadError
from llmcad.models.chat import end_of_turn_ids, special_tokens

# special tokens that end a generation wherever a vocabulary defines them (llama.cpp's list of
# end-of-generation texts)
END_OF_GENERATION_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                            "<|end_of_text|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_GGUF_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def as_id_list(value) -> list:
    """An eos_token_id field (None, an int or a list) as a list of ints."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])]


def gguf_end_ids(path) -> list:
    """The eos/eot/eom token ids a GGUF file's metadata records (needs the ``gguf`` package)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    ids = []
    for key in _GGUF_KEYS:
        field = fields.get(key)
        if field is not None and field.data:
            ids.append(int(field.parts[field.data[0]][0]))
    return ids


def tokenizer_end_ids(tokenizer) -> list:
    """The tokenizer's eos token, its special tokens named like an end of generation, and the chat
    template's end-of-turn token."""
    ids = as_id_list(getattr(tokenizer, "eos_token_id", None))
    ids += [token_id for token, token_id in special_tokens(tokenizer).items() if token in END_OF_GENERATION_TOKENS]
    return list(dict.fromkeys(ids + end_of_turn_ids(tokenizer)))


def end_of_generation_ids(model, tokenizer, gguf_path=None) -> list:
    """Every end-of-generation id of a loaded source: its generation config and config first (in
    their order), then the GGUF metadata, then the tokenizer's."""
    ids = as_id_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    ids += as_id_list(getattr(model.config, "eos_token_id", None))
    if gguf_path is not None:
        ids += gguf_end_ids(gguf_path)
    ids += tokenizer_end_ids(tokenizer)
    return list(dict.fromkeys(ids))


def check_stored_end_ids(directory) -> None:
    """ModelLoadError naming the file when config.json's or generation_config.json's ``eos_token_id`` is
    not a token id or a list of them (``"abc"``, ``1.5``, ``[[1]]``): it would fail later with no file
    named, or be truncated to another id silently."""
    directory = Path(directory)
    for name in ("config.json", "generation_config.json"):
        raw = _json_object(directory / name)
        if raw is None:
            continue
        sections = [raw] + ([raw["text_config"]] if isinstance(raw.get("text_config"), dict) else [])
        for section in sections:
            value = section.get("eos_token_id")
            ids = value if isinstance(value, list) else [value] if value is not None else []
            if any(type(i) is not int for i in ids):
                raise ModelLoadError(f"{directory / name}: eos_token_id={value!r:.80} is not a token id or a list "
                                     "of them (expected an integer or a list of integers)")


def _json_object(path: Path):
    """The JSON object in ``path``; None when absent; ModelLoadError naming it when unreadable."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return raw


def stored_end_ids(directory) -> list:
    """The eos ids a prepared directory's generation_config.json lists ([] without the file)."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return []
    return as_id_list(json.loads(path.read_text()).get("eos_token_id"))


def add_stored_end_ids(directory, ids) -> list:
    """Add ``ids`` missing from ``directory``'s generation_config.json; returns the ids added."""
    path = Path(directory) / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    stored = as_id_list(config.get("eos_token_id"))
    missing = [i for i in ids if i not in stored]
    if missing:
        config["eos_token_id"] = stored + missing
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    return missing
