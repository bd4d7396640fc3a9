"""A tiny random fp32 draft/target pair (Qwen2 layout) built offline, for CI runs of the demo and benches.

The target has peaked next-token distributions and weak layers after its first two, so the draft (its
own first two layers, embeddings and head: a sixth of its size) agrees with it often but not always. Nothing downloads.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = ("def add(a, b):\n", "for i in range(10):\n    print(")
_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Tree:\n    def __init__(self, parents):\n        self.parents = parents\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    "The quick brown fox jumps over the lazy dog. ",
]


def build_tiny_pair(root, *, layers: int = 12, draft_layers: int = 2, hidden: int = 64,
                    seed: int = 1) -> tuple[Path, Path]:
    """Save (draft_dir, target_dir) under ``root`` (reused when already there)."""
    root = Path(root)
    draft_dir, target_dir = root / "tiny-draft", root / "tiny-target"
    if all((d / "config.json").is_file() for d in (draft_dir, target_dir)):
        return draft_dir, target_dir
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no "Writing model shards" bars for a 1 MB model
    try:
        tokenizer = _tokenizer()
        target = _random_target(len(tokenizer), layers, draft_layers, hidden, seed)
        _save(target, tokenizer, target_dir)
        _save(truncated_copy(target, draft_layers), tokenizer, draft_dir)
    finally:
        if bars:
            logging.enable_progress_bar()
    return draft_dir, target_dir


def _tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def _random_target(vocab: int, layers: int, strong_layers: int, hidden: int, seed: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=3,
                         tie_word_embeddings=False, use_sliding_window=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25.0)  # peaked distributions
        for layer in model.model.layers[strong_layers:]:  # weak later layers: the draft's layers predict well
            layer.self_attn.o_proj.weight.mul_(0.15)
            layer.mlp.down_proj.weight.mul_(0.15)
    return model.eval()


def truncated_copy(model, layers: int):
    """A draft that shares ``model``'s embeddings, first ``layers`` layers, final norm and head."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    own = draft.state_dict()
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if k in own}, strict=True)
    return draft.eval()


def _save(model, tokenizer, path: Path) -> None:
    model.generation_config.pad_token_id = 3
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
