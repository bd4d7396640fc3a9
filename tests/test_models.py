"""Loading pairs: tokenizer agreement, dtypes, and clear errors for bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import pair_models
from llmcad import LLMCad
from llmcad.errors import ModelLoadError, PromptError, TokenizerMismatchError


@pytest.fixture(scope="module")
def llama(tiny_pair_dirs):
    return tiny_pair_dirs("llama")


@pytest.fixture(scope="module")
def llama_engine(llama):
    return LLMCad.from_pretrained(llama["shared"], llama["target"])


def test_from_pretrained_loads_a_pair(llama, llama_engine):
    assert llama_engine.target.dtype == torch.float32  # the checkpoint's dtype
    assert llama_engine.policy.name == "llmcad" and llama_engine.eos_token_ids == {pair_models.EOS_ID}
    assert not llama_engine.target.training and not llama_engine.draft.training
    half = LLMCad.from_pretrained(llama["shared"], llama["target"], mode="chain", dtype="bfloat16", chain_length=3)
    assert half.target.dtype == torch.bfloat16 and half.draft.dtype == torch.bfloat16
    assert half.policy.chain_length == 3
    assert len(half.generate("def", 4).tokens) == 4


def test_cross_family_draft_is_fine_when_tokenizers_agree(tiny_pair_dirs, tiny_tokenizer):
    eng = LLMCad.from_pretrained(tiny_pair_dirs("qwen2")["unrelated"], tiny_pair_dirs("llama")["target"])
    ids = tiny_tokenizer("def add")["input_ids"]
    expected = eng.target.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert eng.generate(ids, 8).tokens == expected.tolist()


def test_mismatched_vocabulary(llama, tmp_path):
    other = pair_models.build_tokenizer(vocab_size=280)
    draft = pair_models.copy_with_tokenizer(llama["shared"], tmp_path / "draft", other)
    with pytest.raises(TokenizerMismatchError, match="vocabularies differ"):
        LLMCad.from_pretrained(draft, llama["target"])


def test_identical_tokenizer_files_read_as_different_classes_say_so(tmp_path):
    """Byte-identical tokenizer files in two families' directories: transformers picks the tokenizer class
    from each config.json's model_type, and a class may add its own special tokens. The error says that
    the files are identical and names the classes, instead of blaming the models."""
    from transformers import GemmaConfig, LlamaConfig

    from llmcad.models.loading import check_tokenizers, load_tokenizer

    tokenizer = pair_models.build_tokenizer()
    dirs = []
    for name, config in (("llama", LlamaConfig(vocab_size=300)), ("gemma", GemmaConfig(vocab_size=300))):
        path = tmp_path / name
        tokenizer.save_pretrained(path)
        config_file = json.loads((path / "tokenizer_config.json").read_text())
        config_file = {k: v for k, v in config_file.items() if not k.endswith("_token") and k != "tokenizer_class"}
        (path / "tokenizer_config.json").write_text(json.dumps(config_file))  # the class's defaults then apply
        config.save_pretrained(path)
        dirs.append(path)
    assert (dirs[0] / "tokenizer.json").read_bytes() == (dirs[1] / "tokenizer.json").read_bytes()
    with pytest.raises(TokenizerMismatchError, match=r"the tokenizer files are byte-identical: the difference comes "
                       r"from the tokenizer classes transformers picks .*draft \w+, target GemmaTokenizer"):
        check_tokenizers(load_tokenizer(dirs[0]), load_tokenizer(dirs[1]), None, None)


def _count_tokenizer_reads(monkeypatch) -> list:
    """The directories AutoTokenizer reads from from now on, starting with no tokenizer kept."""
    from transformers import AutoTokenizer

    from llmcad.models import loading

    reads, real = [], AutoTokenizer.from_pretrained
    monkeypatch.setattr(loading, "_last_tokenizer", None)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda where, **kw: reads.append(where) or real(where, **kw))
    return reads


def test_a_tokenizer_is_read_again_only_when_its_files_change(llama, tmp_path, monkeypatch):
    """The last tokenizer read is returned again while its directory's files (but the weights) are the
    same bytes; a changed chat template, another directory or another trust setting reads afresh."""
    from llmcad.models.loading import load_tokenizer

    target = tmp_path / "target"
    shutil.copytree(llama["target"], target)
    reads = _count_tokenizer_reads(monkeypatch)
    first = load_tokenizer(target)
    assert load_tokenizer(str(target)) is first and load_tokenizer(tmp_path / "." / "target") is first
    (target / "model.safetensors").write_bytes(b"weights are not what a tokenizer reads")
    assert load_tokenizer(target) is first and len(reads) == 1
    config = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ messages[0].content }}"}))
    changed = load_tokenizer(target)
    assert changed is not first and changed.chat_template == "{{ messages[0].content }}" and len(reads) == 2
    shutil.copytree(target, tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy") is not changed and len(reads) == 3
    assert load_tokenizer(tmp_path / "copy", trust_remote_code=True) is not changed and len(reads) == 4


def test_generate_reads_the_targets_tokenizer_once(llama, monkeypatch, capsys):
    """`llmcad generate` wants the tokenizer for the prompt and for the pair; the draft's files are the
    target's, so one read serves all."""
    from llmcad import cli

    reads = _count_tokenizer_reads(monkeypatch)
    argv = ["generate", "--draft", str(llama["shared"]), "--target", str(llama["target"]), "--prompt", "def add",
            "--max-new-tokens", "4", "--json"]
    assert cli.main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == 4
    assert reads == [str(llama["target"])]


def test_mismatched_special_tokens(llama, tmp_path):
    tok = pair_models.build_tokenizer()
    tok.eos_token = "<pad>"
    draft = pair_models.copy_with_tokenizer(llama["shared"], tmp_path / "draft", tok)
    with pytest.raises(TokenizerMismatchError, match=r"different special tokens \(.*eos_token: draft '<pad>' \(id 3\)"):
        LLMCad.from_pretrained(draft, llama["target"])


def test_draft_vocab_larger_than_target_embeddings(llama, tiny_tokenizer, tmp_path):
    big = pair_models.random_model("llama", seed=5, vocab_size=pair_models.VOCAB_SIZE + 20, layers=1)
    draft = pair_models.save(big, tiny_tokenizer, tmp_path / "big")
    with pytest.raises(TokenizerMismatchError, match="larger than the target's embedding rows"):
        LLMCad.from_pretrained(draft, llama["target"])


def test_missing_or_empty_model_directory(llama, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLMCad.from_pretrained(tmp_path / "nope", llama["target"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLMCad.from_pretrained(llama["shared"], tmp_path / "empty")
    broken = tmp_path / "noweights"
    broken.mkdir()
    shutil.copy(llama["target"] / "config.json", broken / "config.json")
    shutil.copy(llama["target"] / "tokenizer.json", broken / "tokenizer.json")
    shutil.copy(llama["target"] / "tokenizer_config.json", broken / "tokenizer_config.json")
    with pytest.raises(ModelLoadError):
        LLMCad.from_pretrained(llama["shared"], broken)


def test_unknown_mode_and_bad_options_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="llmcad, tree, chain, target-only"):
        LLMCad.from_pretrained(tmp_path / "x", tmp_path / "y", mode="pipeline-v2")
    with pytest.raises(ValueError, match="max_depth"):
        LLMCad.from_pretrained(tmp_path / "x", tmp_path / "y", mode="tree", max_depth=0)
    with pytest.raises(ValueError, match="dtype"):
        LLMCad.from_pretrained(tmp_path / "x", tmp_path / "y", dtype="int8")


def test_prompt_errors(llama_engine):
    with pytest.raises(PromptError, match="empty"):
        llama_engine.generate("", 4)
    with pytest.raises(PromptError, match="empty"):
        llama_engine.generate([], 4)
    with pytest.raises(PromptError, match="context"):
        llama_engine.generate([5] * pair_models.CONTEXT, 4)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        llama_engine.generate([5, 10**6], 4)
    with pytest.raises(PromptError, match="str or a list"):
        llama_engine.generate(3.5, 4)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_max_new_tokens_must_be_positive(llama_engine, bad):
    with pytest.raises(ValueError, match="max_new_tokens"):
        llama_engine.generate("def", bad)


def test_generation_stops_at_the_context_length(llama_engine):
    ids = [5] * (pair_models.CONTEXT - 3)
    result = llama_engine.generate(ids, 10)
    assert len(result.tokens) == 3 and result.stats["stop_reason"] == "context"


def test_memory_budget_goes_through_the_planner(llama):
    from llmcad.errors import BudgetError, EngineClosedError

    with LLMCad.from_pretrained(llama["shared"], llama["target"], memory_budget="1GiB") as roomy:
        assert roomy.placement is not None and not roomy.placement.streamed_layers
        assert len(roomy.generate("def", 3).tokens) == 3
    with pytest.raises(EngineClosedError):
        roomy.generate("def", 3)
    with pytest.raises(BudgetError, match="memory_budget"):
        LLMCad.from_pretrained(llama["shared"], llama["target"], memory_budget=1000)
    with pytest.raises(BudgetError, match="memory_budget"):
        LLMCad.from_pretrained(llama["shared"], llama["target"], memory_budget="lots")


def test_generation_config_eos_list(llama, tmp_path):
    target = shutil.copytree(llama["target"], tmp_path / "t")
    cfg = json.loads((target / "generation_config.json").read_text())
    cfg["eos_token_id"] = [pair_models.EOS_ID, 7]
    (target / "generation_config.json").write_text(json.dumps(cfg))
    assert LLMCad.from_pretrained(llama["shared"], target).eos_token_ids == {pair_models.EOS_ID, 7}


# ---------------------------------------------------------------- a model directory's own code
_CUSTOM_CODE = '''
import pathlib
pathlib.Path(MARKER).write_text("yes")
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "llmcad-custom"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


@pytest.fixture()
def custom_code_dir(llama, tmp_path):
    """The tiny target as a model whose config names classes in the directory's own custom.py (auto_map),
    as hub repositories with custom code do; running custom.py (transformers runs a copy in its modules
    cache) leaves a file CODE_RAN in the directory."""
    path = tmp_path / "custom"
    shutil.copytree(llama["target"], path)
    (path / "custom.py").write_text(_CUSTOM_CODE.replace("MARKER", repr(str(path / "CODE_RAN"))))
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="llmcad-custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    pair_models.build_tokenizer(chat_template=pair_models.CHAT_TEMPLATE).save_pretrained(path)  # for `llmcad chat`
    return path


@pytest.mark.parametrize("budget", [None, "1GiB"])
def test_model_code_never_runs_nor_asks_without_opt_in(llama, custom_code_dir, monkeypatch, budget):
    def no_prompt(*args):
        raise AssertionError(f"asked on stdin: {args}")

    monkeypatch.setattr("builtins.input", no_prompt)
    for draft, target in ((llama["shared"], custom_code_dir), (custom_code_dir, llama["target"])):
        with pytest.raises(ModelLoadError, match=r"asks to run its own Python code .* --trust-remote-code"):
            LLMCad.from_pretrained(draft, target, memory_budget=budget)
    assert not (custom_code_dir / "CODE_RAN").exists()


def test_model_code_runs_with_trust_remote_code(llama, custom_code_dir):
    engine = LLMCad.from_pretrained(llama["shared"], custom_code_dir, trust_remote_code=True)
    assert (custom_code_dir / "CODE_RAN").exists() and type(engine.target).__name__ == "CustomForCausalLM"
    reference = LLMCad.from_pretrained(llama["shared"], llama["target"], mode="target-only")
    assert engine.generate("def add", 6).tokens == reference.generate("def add", 6).tokens


def test_chat_input_never_answers_a_prompt_to_run_model_code(custom_code_dir):
    """`llmcad chat`: the user's first message ("y") must not answer transformers' question."""
    import subprocess
    import sys
    from pathlib import Path

    import llmcad

    env = {"PYTHONPATH": str(Path(llmcad.__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llmcad.cli", "chat", "--draft", str(custom_code_dir), "--target",
                           str(custom_code_dir)], input="y\ny\n", capture_output=True, text=True, env=env, timeout=120)
    assert not (custom_code_dir / "CODE_RAN").exists(), proc.stderr
    assert proc.returncode == 2 and "--trust-remote-code" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
