"""Tiny random-weight HF causal LMs saved to disk, for tests that need real checkpoint files."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma")
VOCAB = 96

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2)


def tiny_config(family: str, num_layers: int = 4, tie: bool = False, vocab_size: int = VOCAB):
    """A small config of ``family`` with ``num_layers`` decoder layers (``vocab_size`` embedding rows;
    the tokenizer has VOCAB tokens)."""
    kwargs = dict(_COMMON, num_hidden_layers=num_layers, tie_word_embeddings=tie, vocab_size=vocab_size)
    if family == "llama":
        return LlamaConfig(**kwargs)
    if family == "qwen2":
        return Qwen2Config(**kwargs)
    if family == "mistral":
        return MistralConfig(**kwargs, sliding_window=None)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**kwargs, pad_token_id=0)
    if family == "gemma":  # scaled embeddings, (1 + w) norms, explicit head_dim
        return GemmaConfig(**kwargs, head_dim=8)
    raise ValueError(f"unknown family {family!r}")


def build_tiny(family: str, out: Path, *, num_layers: int = 4, tie: bool = False, seed: int = 0,
               dtype=torch.float32, max_shard_size=None, vocab_size: int = VOCAB) -> Path:
    """Build a random tiny model, save it (safetensors) into ``out`` and return ``out``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, num_layers, tie, vocab_size), dtype=dtype)
    with torch.no_grad():  # non-trivial norms so a wrong binding shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = Path(out)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    save_tiny_tokenizer(out)
    return out


def load_resident(path: Path, dtype=torch.float32):
    """The in-memory reference model, loaded the ordinary way."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def save_tiny_tokenizer(out: Path) -> None:
    """Save a word-level tokenizer with VOCAB entries (ids 0..VOCAB-1) into ``out``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
