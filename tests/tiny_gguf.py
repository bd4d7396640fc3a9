"""Tiny random Qwen2 or Llama GGUF files (Q8_0 matrices, F32 norms) for tests of the GGUF import."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_gguf(path: Path, *, num_layers: int = 2, vocab: int = 96, hidden: int = 64, ffn: int = 128,
                    heads: int = 4, kv_heads: int = 2, seed: int = 0, tied: bool = False, arch: str = "qwen2") -> Path:
    """A GGUF of ``arch`` ("qwen2": attention biases; "llama": q/k rows permuted as llama.cpp stores
    them) at ``path``, with a separate output tensor unless ``tied``."""
    import gguf

    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(num_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def matrix(name, rows, cols):
        data = rng.standard_normal((rows, cols), dtype=np.float32) * 0.1
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def vector(name, n, base=1.0):
        writer.add_tensor(name, (base + 0.2 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden)
    for i in range(num_layers):
        vector(f"blk.{i}.attn_norm.weight", hidden)
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        if arch == "qwen2":
            vector(f"blk.{i}.attn_q.bias", hidden, 0.0)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        if arch == "qwen2":
            vector(f"blk.{i}.attn_k.bias", kv_heads * head_dim, 0.0)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        if arch == "qwen2":
            vector(f"blk.{i}.attn_v.bias", kv_heads * head_dim, 0.0)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        vector(f"blk.{i}.ffn_norm.weight", hidden)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    vector("output_norm.weight", hidden)
    if not tied:
        matrix("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
