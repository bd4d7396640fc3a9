"""End-of-generation ids as the original model has them: prepare stores every id the source defines
(config, GGUF metadata, the tokenizer's end-of-text / end-of-turn specials) and generate stops on all."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import pair_models
from llmcad import LLMCad
from llmcad.models.eos import add_stored_end_ids, gguf_end_ids, stored_end_ids, tokenizer_end_ids
from llmcad.models.prepare import prepare

PROMPT = "def add(a, b):"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _greedy(model, ids, n, **kwargs):
    return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, **kwargs)[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def two_eos_source(tiny_pair_dirs, tiny_models, tiny_tokenizer, tmp_path_factory):
    """A copy of the qwen2 target whose config lists two EOS ids (</s> and the token its greedy output
    reaches at step 4) while its generation config, as a GGUF import writes it, lists only </s>."""
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    second = _greedy(tiny_models("qwen2", "target"), ids, 8)[3]
    assert second != pair_models.EOS_ID
    path = tmp_path_factory.mktemp("eos") / "qwen2-two-eos"
    shutil.copytree(tiny_pair_dirs("qwen2")["target"], path)
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = [pair_models.EOS_ID, second]
    (path / "config.json").write_text(json.dumps(config))
    generation = json.loads((path / "generation_config.json").read_text())
    generation["eos_token_id"] = pair_models.EOS_ID
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path, second


def test_prepare_keeps_both_eos_ids_and_generate_stops_at_the_second(two_eos_source, tiny_tokenizer, tmp_path):
    source, second = two_eos_source
    out = prepare(source, tmp_path / "out", "float32")
    assert stored_end_ids(out) == [pair_models.EOS_ID, second]
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    for mode in ("target-only", "llmcad"):
        with LLMCad.from_pretrained(out, out, mode=mode) as engine:
            expected = _greedy(engine.target, ids, 12, eos_token_id=[pair_models.EOS_ID, second])
            result = engine.generate(PROMPT, 12)
        assert result.tokens == expected and result.tokens[-1] == second and len(result.tokens) == 4
        assert result.stats["stop_reason"] == "eos"


def test_gguf_metadata_end_ids(tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_eos_token_id(7)
    writer.add_eot_token_id(9)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_end_ids(tmp_path / "m.gguf") == [7, 9]


def test_tokenizer_end_ids_name_end_of_text_and_end_of_turn():
    tokenizer = pair_models.build_tokenizer(extra_special=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                                            chat_template=CHATML)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids = tokenizer_end_ids(tokenizer)
    assert {pair_models.EOS_ID, im_end, endoftext} == set(ids) and im_start not in ids


def test_a_stored_model_gets_the_missing_ids_once(tiny_pair_dirs, tmp_path, capsys):
    import llmcad.models.fetch as fetch

    tokenizer = pair_models.build_tokenizer(extra_special=["<|im_end|>"])
    path = pair_models.copy_with_tokenizer(tiny_pair_dirs("qwen2")["target"], tmp_path / "stored", tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stored_end_ids(path) == [pair_models.EOS_ID]
    assert fetch.update_end_ids(path) == [im_end]
    assert "also stops at <|im_end|>" in capsys.readouterr().err
    assert stored_end_ids(path) == [pair_models.EOS_ID, im_end]
    assert fetch.update_end_ids(path) == [] and capsys.readouterr().err == ""
    assert add_stored_end_ids(path, [im_end, pair_models.EOS_ID]) == []
