"""Tiny random fp32 draft/target pairs and a byte-level BPE tokenizer, built and saved offline.

Used by the engine test fixtures (tests/conftest.py) and by benchmarks/acceptance_tiny.py. Every model
directory holds safetensors weights, config, generation config and the shared tokenizer.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from llmcad.bench.tiny_pair import truncated_copy

VOCAB_SIZE = 300
SPECIALS = ["<s>", "</s>", "<unk>", "<pad>"]  # ids 0..3
BOS_ID, EOS_ID, UNK_ID, PAD_ID = 0, 1, 2, 3
CONTEXT = 256
FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma")

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "for i in range(10):\n    print(i * i)\n",
    "Speculative decoding drafts tokens with a small model and verifies them with a large one.",
    "class Tree:\n    def __init__(self, parents):\n        self.parents = parents\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
]


# a ChatML-like template over the tokenizer's own specials: a turn is "<s>role\ncontent</s>\n"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def build_tokenizer(vocab_size: int = VOCAB_SIZE, extra_special: list[str] | None = None,
                    chat_template: str | None = None):
    """A byte-level BPE tokenizer trained on a small built-in corpus; adds <s> in front of a prompt.
    ``chat_template``: a Jinja chat template (e.g. CHAT_TEMPLATE); none by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS + list(extra_special or [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        chat_template=chat_template,
    )


def make_config(family: str, *, vocab_size: int = VOCAB_SIZE, hidden: int = 64, layers: int = 4):
    """A tiny config of ``family`` (no sliding window, untied head, fp32)."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=False)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "phi3":
        return tf.Phi3Config(**common, sliding_window=None)
    if family == "gemma":
        return tf.GemmaConfig(**common, head_dim=hidden // 4)
    raise ValueError(f"unknown family {family!r}")


def random_model(family: str, seed: int, *, sharpness: float = 25.0, late_scale: float = 0.3,
                 **config_kwargs):
    """A random fp32 model with peaked next-token distributions (lm_head scaled by ``sharpness``) whose
    second half of layers writes ``late_scale`` times less into the residual stream, so a draft made of
    its first half agrees with it often but not always."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, **config_kwargs), dtype=torch.float32)
    layers = model.model.layers
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpness)
        for layer in layers[len(layers) // 2:]:
            for name, param in layer.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    param.mul_(late_scale)
    return model.eval()


def copy_with_tokenizer(src: Path, dst: Path, tokenizer) -> Path:
    """Copy model directory ``src`` to ``dst`` with its tokenizer files replaced by ``tokenizer``."""
    shutil.copytree(src, dst)
    for f in dst.glob("tokenizer*"):
        f.unlink()
    tokenizer.save_pretrained(dst)
    return dst


def save(model, tokenizer, path: Path) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` into ``path``; returns ``path``."""
    path = Path(path)
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_family(root: Path, family: str, tokenizer=None) -> dict:
    """Save a target and three drafts of ``family`` under ``root``.

    Returns ``{"target", "same", "unrelated", "shared"}`` -> directory: ``same`` is the target itself,
    ``unrelated`` a differently seeded, smaller model, ``shared`` the target's first half of layers.
    """
    tokenizer = tokenizer or build_tokenizer()
    root = Path(root)
    seed = 1 + 10 * FAMILIES.index(family) if family in FAMILIES else 1
    target = random_model(family, seed=seed)
    dirs = {"target": save(target, tokenizer, root / f"{family}-target")}
    dirs["same"] = dirs["target"]
    dirs["unrelated"] = save(random_model(family, seed=seed + 1, hidden=32, layers=2), tokenizer,
                             root / f"{family}-unrelated")
    dirs["shared"] = save(truncated_copy(target, 2), tokenizer, root / f"{family}-shared")
    return dirs


LEAST_BUDGET = r"needs at least [^(]*\((\d+) bytes\)"  # the figure a refused budget names


def least_budget(draft, target, **options) -> int:
    """The least memory budget the engine accepts for this pair: from its own refusal of 1 byte."""
    import re

    import pytest

    from llmcad import LLMCad
    from llmcad.errors import BudgetError

    with pytest.raises(BudgetError) as refused:
        LLMCad.from_pretrained(draft, target, memory_budget=1, **options)
    return int(re.search(LEAST_BUDGET, str(refused.value)).group(1))
