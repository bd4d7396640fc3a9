"""The bad-input matrix: every bad model, tokenizer, prompt, option and storage condition ends
in a specific exception naming the problem through the API, and in one line on stderr with exit status
2 through the CLI (``llmcad generate``). Storage fallbacks (O_DIRECT or io_uring refused) are not errors:
one warning, and the generation is still exact.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import pair_models
from llmcad import LLMCad, build_info, cli
from llmcad.errors import (BudgetError, ModelLoadError, PromptError, StreamerIOError, TokenizerMismatchError,
                           WeightFileError)
from llmcad.streaming.streamer import WeightStreamer
from child_cli import child_env

PROMPT = "def add(a, b):"
NEW_TOKENS = 6
BUDGETS = [pytest.param(None, id="resident"), pytest.param("1GiB", id="budget")]


# ---------------------------------------------------------------- fixtures: broken checkpoints
@pytest.fixture(scope="module")
def pair(tiny_pair_dirs):
    return tiny_pair_dirs("llama")


def _variant(root, source, name, edit):
    path = root / name
    shutil.copytree(source, path)
    edit(path)
    return path


def _no_weights(d):
    (d / "model.safetensors").unlink()


def _truncated(d):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])


def _corrupt_header(d):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"!" * 12  # the JSON header starts at byte 8
    f.write_bytes(bytes(data))


def _shape_mismatch(d):
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights hold 128
    (d / "config.json").write_text(json.dumps(config))


def _edit_config(**changes):
    def edit(d):
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))
    return edit


def _generation_eos(value):
    def edit(d):
        config = json.loads((d / "generation_config.json").read_text())
        config["eos_token_id"] = value
        (d / "generation_config.json").write_text(json.dumps(config))
    return edit


def _deep_metadata(d):
    """A header whose __metadata__ nests 100k lists (json's recursion limit), same tensors."""
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    text = json.dumps(header)[:-1].encode() + b',"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    f.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


def _overlapping(d):
    """Two same-sized tensors point at the same bytes (header length unchanged: padded with spaces)."""
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    a, b = header["model.layers.0.input_layernorm.weight"], header["model.layers.0.post_attention_layernorm.weight"]
    b["data_offsets"] = list(a["data_offsets"])
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    f.write_bytes(data[:8] + text.ljust(n) + data[8 + n:])


def _missing_tensor(d):
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


def _save_sharded_without_a_shard(root, tiny_models, tokenizer):
    path = root / "missing-shard"
    tiny_models("llama", "target").save_pretrained(path, max_shard_size="100KB")
    tokenizer.save_pretrained(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    (path / shards[1]).unlink()
    return path, shards[1]


def _save_other_architecture(root, name, config, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = root / name
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def broken(pair, tiny_models, tiny_tokenizer, tmp_path_factory):
    """name -> (directory, expected exception type, regex its message must match)."""
    from transformers import BertConfig, GPT2Config

    root = tmp_path_factory.mktemp("broken")
    shard_dir, shard = _save_sharded_without_a_shard(root, tiny_models, tiny_tokenizer)
    bert = BertConfig(vocab_size=pair_models.VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, is_decoder=True)
    gpt2 = GPT2Config(vocab_size=pair_models.VOCAB_SIZE, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    return {
        "missing-directory": (root / "nowhere", ModelLoadError, r"model directory .*nowhere.* does not exist"),
        "no-weights": (_variant(root, pair["target"], "no-weights", _no_weights), WeightFileError,
                       r"no-weights: no safetensors weights"),
        "truncated": (_variant(root, pair["target"], "truncated", _truncated), WeightFileError,
                      r"truncated/model.safetensors: truncated safetensors file"),
        "corrupt-header": (_variant(root, pair["target"], "corrupt", _corrupt_header), WeightFileError,
                           r"corrupt/model.safetensors: corrupt safetensors header"),
        "missing-shard": (shard_dir, WeightFileError, re.escape(shard) + r": shard listed in .* is missing"),
        "shape-mismatch": (_variant(root, pair["target"], "shape", _shape_mismatch), ModelLoadError,
                           r"'model\.layers\.0\.mlp\.\w+_proj\.weight'.*shape \[\d+, \d+\]"),
        "overlapping-tensors": (_variant(root, pair["target"], "overlap", _overlapping), WeightFileError,
                                r"overlap/model.safetensors: corrupt safetensors header: "
                                r"'model\.layers\.0\.\w+\.weight' .* overlaps the tensor before it"),
        "missing-tensor": (_variant(root, pair["target"], "missing-tensor", _missing_tensor), ModelLoadError,
                           r"missing-tensor: the weights have no 'model\.layers\.1\.mlp\.up_proj\.weight'"),
        "config-more-layers": (_variant(root, pair["target"], "more-layers", _edit_config(num_hidden_layers=6)),
                               ModelLoadError, r"more-layers: the weights have no 'model\.layers\.4\."),
        "config-fewer-layers": (_variant(root, pair["target"], "fewer-layers", _edit_config(num_hidden_layers=2)),
                                ModelLoadError, r"fewer-layers: the weights hold 4 decoder layers, config\.json's "
                                r"num_hidden_layers is 2"),
        "config-million-layers": (_variant(root, pair["target"], "million-layers",
                                           _edit_config(num_hidden_layers=10**6)), ModelLoadError,
                                  r"million-layers: the weights have no 'model\.layers\.4\.\*' tensors: config\.json's "
                                  r"num_hidden_layers is 1000000, the weights hold 4 decoder layers"),
        "config-huge-size": (_variant(root, pair["target"], "huge-size", _edit_config(intermediate_size=2**40)),
                             ModelLoadError, r"huge-size/config\.json: intermediate_size=1099511627776: too large"),
        "eos-text": (_variant(root, pair["target"], "eos-text", _generation_eos("abc")), ModelLoadError,
                     r"eos-text/generation_config\.json: eos_token_id='abc' is not a token id or a list of them"),
        "eos-float": (_variant(root, pair["target"], "eos-float", _generation_eos(1.5)), ModelLoadError,
                      r"eos-float/generation_config\.json: eos_token_id=1\.5 is not a token id"),
        "eos-nested": (_variant(root, pair["target"], "eos-nested", _generation_eos([[1]])), ModelLoadError,
                       r"eos-nested/generation_config\.json: eos_token_id=\[\[1\]\] is not a token id"),
        "deep-metadata": (_variant(root, pair["target"], "deep-metadata", _deep_metadata), WeightFileError,
                          r"deep-metadata/model\.safetensors: corrupt safetensors header \(JSON nested too deeply"),
        "zero-heads": (_variant(root, pair["target"], "zero-heads", _edit_config(num_attention_heads=0)),
                       ModelLoadError, r"zero-heads/config\.json: num_attention_heads=0: expected an integer > 0"),
        "encoder-only": (_save_other_architecture(root, "bert", bert, tiny_tokenizer), ModelLoadError,
                         r"not a decoder-only causal LM whose layers are a ModuleList"),
        "no-decoder-layer-list": (_save_other_architecture(root, "gpt2", gpt2, tiny_tokenizer), ModelLoadError,
                                  r"GPT2LMHeadModel.*not a decoder-only causal LM whose layers are a ModuleList"),
    }


MODEL_CASES = ["missing-directory", "no-weights", "truncated", "corrupt-header", "missing-shard",
               "shape-mismatch", "encoder-only", "no-decoder-layer-list", "overlapping-tensors", "missing-tensor",
               "config-more-layers", "config-fewer-layers", "config-million-layers", "config-huge-size", "eos-text", "eos-float", "eos-nested",
               "deep-metadata", "zero-heads"]


def run_cli(capfd, *argv) -> str:
    """``llmcad <argv>``: asserts exit status 2 and exactly one ``llmcad: error:`` line; returns it."""
    capfd.readouterr()
    assert cli.main([str(a) for a in argv]) == 2
    out, err = capfd.readouterr()
    assert err.startswith("llmcad: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    return err


def generate_argv(draft, target, *extra, prompt=PROMPT):
    argv = ["generate", "--draft", draft, "--target", target, "--prompt", prompt, "--max-new-tokens", NEW_TOKENS,
            *extra]
    return [str(a) for a in argv]


# ---------------------------------------------------------------- model inputs
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_target_directory_api(pair, broken, case, budget):
    path, kind, pattern = broken[case]
    with pytest.raises(kind, match=pattern):
        LLMCad.from_pretrained(pair["shared"], path, memory_budget=budget)


@pytest.mark.parametrize("case", ["missing-directory", "truncated", "corrupt-header", "shape-mismatch",
                                  "encoder-only", "overlapping-tensors", "missing-tensor", "zero-heads"])
def test_bad_draft_directory_api(pair, broken, case):
    path, kind, pattern = broken[case]
    with pytest.raises(kind, match=pattern):
        LLMCad.from_pretrained(path, pair["target"], memory_budget="1GiB")


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_target_directory_cli(pair, broken, capfd, case, budget):
    path, _, pattern = broken[case]
    extra = ["--memory-budget", budget] if budget else []
    err = run_cli(capfd, *generate_argv(pair["shared"], path, *extra))
    assert re.search(pattern, err), err


# ---------------------------------------------------------------- tokenizers and prompts
@pytest.fixture(scope="module")
def mismatched_drafts(pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    special = pair_models.build_tokenizer()
    special.eos_token = "<pad>"
    return {
        "vocab": (pair_models.copy_with_tokenizer(pair["shared"], root / "vocab", pair_models.build_tokenizer(vocab_size=280)),
                  r"draft and target vocabularies differ \(draft has 280 tokens, target 300"),
        "special": (pair_models.copy_with_tokenizer(pair["shared"], root / "special", special),
                    r"tokenizers define different special tokens \(.*eos_token: draft '<pad>' \(id 3\), target "
                    r"'</s>' \(id 1\)\).*their tokenizer files differ"),
    }


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", ["vocab", "special"])
def test_tokenizers_that_differ(pair, mismatched_drafts, capfd, case, budget):
    draft, pattern = mismatched_drafts[case]
    with pytest.raises(TokenizerMismatchError, match=pattern):
        LLMCad.from_pretrained(draft, pair["target"], memory_budget=budget)
    err = run_cli(capfd, *generate_argv(draft, pair["target"]))
    assert re.search(pattern, err), err


@pytest.fixture(scope="module")
def engine(pair):
    with LLMCad.from_pretrained(pair["shared"], pair["target"]) as eng:
        yield eng


LONG_PROMPT = " ".join(["def add(a, b):"] * 100)  # far more than the models' 256 positions


def test_prompt_errors_api(engine):
    with pytest.raises(PromptError, match="prompt is empty"):
        engine.generate("", NEW_TOKENS)
    with pytest.raises(PromptError, match=r"prompt has \d+ tokens; the models' context is 256 positions"):
        engine.generate(LONG_PROMPT, NEW_TOKENS)
    with pytest.raises(PromptError, match="context is 256"):
        engine.generate([5] * 256, NEW_TOKENS)
    assert len(engine.generate(PROMPT, NEW_TOKENS).tokens) == NEW_TOKENS  # still usable


@pytest.mark.parametrize("prompt,pattern", [
    ([5, 1.5, 7], r"prompt token ids must be integers, got 1\.5 \(float\) at index 1"),
    ([5.0, 6.0], r"prompt token ids must be integers, got 5\.0 \(float\) at index 0"),
    ([True, 5], r"prompt token ids must be integers, got True \(bool\) at index 0"),
    ([[5, 6]], r"prompt token ids must be integers, got \[5, 6\] \(list\) at index 0"),
    (torch.tensor([5.0, 6.0]), r"prompt token ids must be integers, got a tensor of torch\.float32"),
])
def test_token_ids_that_are_not_integers(engine, prompt, pattern):
    with pytest.raises(PromptError, match=pattern):
        engine.generate(prompt, NEW_TOKENS)
    assert len(engine.generate(torch.tensor([5, 6, 7]), NEW_TOKENS).tokens) == NEW_TOKENS  # integer tensors do


@pytest.mark.parametrize("stop", [5, 2.5, object()])
def test_stop_that_is_not_text(engine, stop):
    with pytest.raises(ValueError, match=r"stop=.*: expected a non-empty string or a list of them"):
        engine.generate(PROMPT, NEW_TOKENS, stop=stop)
    with pytest.raises(ValueError, match=r"stop=\[5\]: expected a non-empty string or a list of them"):
        engine.generate(PROMPT, NEW_TOKENS, stop=[5])


@pytest.mark.parametrize("prompt,needle", [("", "prompt is empty"), (LONG_PROMPT, "the models' context is 256")])
def test_prompt_errors_cli(pair, capfd, prompt, needle):
    assert needle in run_cli(capfd, *generate_argv(pair["shared"], pair["target"], prompt=prompt))


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("bad", [0, -1])
def test_non_positive_max_new_tokens(engine, pair, capfd, bad):
    with pytest.raises(ValueError, match=rf"max_new_tokens={bad}: expected an int > 0"):
        engine.generate(PROMPT, bad)
    argv = generate_argv(pair["shared"], pair["target"])
    argv[argv.index("--max-new-tokens") + 1] = bad
    assert f"max_new_tokens={bad}" in run_cli(capfd, *argv)


@pytest.mark.parametrize("budget,pattern", [
    ("lots", r"memory_budget='lots': expected a size such as '2GiB'"),
    ("-3GiB", r"memory_budget='-3GiB': expected a size"),
    ("0", r"memory_budget='0': must be a positive size"),
    ("99999999999999999999999999", r"memory_budget='9+': must be a positive size below 2\*\*63 bytes"),
    ("9" * 400 + "GiB", r"memory_budget='9+GiB': must be a positive size below 2\*\*63 bytes"),
    ("4096", r"memory_budget=0\.0 MiB \(4096 bytes\) is too small: needs at least .* \(\d+ bytes\)"),
])
def test_bad_memory_budget(pair, capfd, budget, pattern):
    with pytest.raises(BudgetError, match=pattern):
        LLMCad.from_pretrained(pair["shared"], pair["target"], memory_budget=budget)
    err = run_cli(capfd, *generate_argv(pair["shared"], pair["target"], f"--memory-budget={budget}"))
    assert re.search(pattern, err), err


@pytest.mark.parametrize("cap,pattern", [
    (1e-9, r"bandwidth.cap=1e-09: below 1000 bytes/s no read ends in useful time; the cap is in bytes per second"),
    (999.0, r"bandwidth.cap=999\.0: below 1000 bytes/s"),
    (0.0, r"bandwidth.cap=0\.0: expected a positive number of bytes per second"),
    (float("inf"), r"bandwidth.cap=inf: expected a positive number of bytes per second"),
])
def test_nonsensical_bandwidth_cap(pair, capfd, cap, pattern):
    """A cap the streamer cannot honour (1e-9 once ran uncapped without a word) is refused up front."""
    with pytest.raises(ValueError, match=pattern):
        LLMCad.from_pretrained(pair["shared"], pair["target"], memory_budget="1GiB",
                               streamer_options={"bandwidth_cap": cap})
    with pytest.raises(ValueError, match=pattern):
        WeightStreamer([str(pair["target"] / "model.safetensors")], buffer_bytes=1 << 16, bandwidth_cap=cap)
    err = run_cli(capfd, *generate_argv(pair["shared"], pair["target"], "--memory-budget", "1GiB",
                                        "--bandwidth-cap", str(cap)))
    assert re.search(pattern, err), err


def test_unknown_mode(pair, capfd):
    with pytest.raises(ValueError, match=r"mode='speculate': expected one of llmcad, tree, chain, target-only"):
        LLMCad.from_pretrained(pair["shared"], pair["target"], mode="speculate")
    err = run_cli(capfd, *generate_argv(pair["shared"], pair["target"], "--mode", "speculate"))
    assert "argument --mode: invalid choice: 'speculate'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_gpu(pair, capfd):
    with pytest.raises(ModelLoadError, match=r"device='cuda': CUDA is not available on this machine"):
        LLMCad.from_pretrained(pair["shared"], pair["target"], device="cuda")
    err = run_cli(capfd, *generate_argv(pair["shared"], pair["target"], "--device", "cuda"))
    assert "CUDA is not available" in err
    with pytest.raises(ValueError, match=r"device='tpu': expected 'cpu', 'cuda' or 'cuda:N'"):
        LLMCad.from_pretrained(pair["shared"], pair["target"], device="tpu")


@pytest.mark.parametrize("options,flags,pattern", [
    ({"temperature": -0.5}, ["--temperature", "-0.5"],
     r"temperature=-0\.5: expected a finite number >= 0 \(0: greedy\)"),
    ({"temperature": float("nan")}, ["--temperature", "nan"], r"temperature=nan: expected a finite number >= 0"),
    ({"top_p": 0.0}, ["--top-p", "0"], r"top_p=0\.0: expected None or a number in \(0, 1\]"),
    ({"top_p": 1.5}, ["--top-p", "1.5"], r"top_p=1\.5: expected None or a number in \(0, 1\]"),
    ({"top_k": 0}, ["--top-k", "0"], r"top_k=0: expected None or an int >= 1"),
    ({"temperature": 1e-45}, ["--temperature", "1e-45"], r"temperature=1e-45: below 1e-06 the scaled logits overflow"),
    ({"seed": 2 ** 70}, ["--seed", str(2 ** 70)], r"seed=\d+: expected None or an int in \[0, 2\*\*64\)"),
])
def test_bad_sampling_parameters(engine, pair, capfd, options, flags, pattern):
    with pytest.raises(ValueError, match=pattern):
        engine.generate(PROMPT, NEW_TOKENS, do_sample=True, **options)
    err = run_cli(capfd, *generate_argv(pair["shared"], pair["target"], *flags))
    assert re.search(pattern, err), err


def test_non_utf8_prompt(engine, pair, capfd):
    """Bytes that are not UTF-8 reach Python as lone surrogates (argv is decoded with surrogateescape)."""
    bad = b"def \xff\xfe(a):".decode("utf-8", "surrogateescape")
    with pytest.raises(PromptError, match=r"prompt is not valid UTF-8 text \(undecodable byte\(s\) at character 4"):
        engine.generate(bad, NEW_TOKENS)
    assert "prompt is not valid UTF-8" in run_cli(capfd, *generate_argv(pair["shared"], pair["target"], prompt=bad))


def test_non_utf8_prompt_from_a_real_command_line(pair):
    argv = [os.fsencode(a) for a in generate_argv(pair["shared"], pair["target"], prompt="x")]
    argv[argv.index(b"x")] = b"def \xff(a):"
    proc = subprocess.run([sys.executable.encode(), b"-m", b"llmcad.cli", *argv], capture_output=True,
                          env=_cli_env(), timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1 and "prompt is not valid UTF-8" in err, err


def test_missing_relative_path_is_reported_at_once(pair, tmp_path, monkeypatch, capfd):
    """Not tried as a hub id (which waits for the network): a name with no owner/ part, or one whose
    first part is a directory here, is a local path."""
    import time

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("no-such-model", "models/no-such-model", "./x/y/z"):
        t0 = time.monotonic()
        with pytest.raises(ModelLoadError, match=rf"model directory '{re.escape(name)}' does not exist \(looked in "):
            LLMCad.from_pretrained(pair["shared"], name)
        assert time.monotonic() - t0 < 5
        assert "does not exist" in run_cli(capfd, *generate_argv(pair["shared"], name))


def test_unwritable_trace_is_refused_before_generating(engine, pair, tmp_path, capfd):
    from llmcad.errors import OutputError

    calls = []
    for trace, pattern in [(tmp_path / "absent" / "t.json", r"directory '.*absent' does not exist"),
                           (tmp_path, r"is a directory, not a file")]:
        with pytest.raises(OutputError, match=pattern):
            engine.generate(PROMPT, NEW_TOKENS, trace=trace, streamer=calls.append)
        err = run_cli(capfd, *generate_argv(pair["shared"], pair["target"], "--trace", trace))
        assert re.search(pattern, err), err
    assert calls == []  # nothing was generated


def test_draft_vocabulary_smaller_than_the_target_ids(pair, tiny_tokenizer, tmp_path, capfd):
    """Same tokenizer, but the draft embeds fewer ids than the target can emit: refused at load, not an
    IndexError in the middle of a generation."""
    draft = pair_models.save(pair_models.random_model("llama", seed=5, vocab_size=280, layers=2), tiny_tokenizer,
                             tmp_path / "small-vocab")
    pattern = r"draft vocabulary \(280 embedding rows\) does not cover the target's token ids \(0\.\.299\)"
    for budget in (None, "1GiB"):
        with pytest.raises(TokenizerMismatchError, match=pattern):
            LLMCad.from_pretrained(draft, pair["target"], memory_budget=budget)
    assert re.search(pattern, run_cli(capfd, *generate_argv(draft, pair["target"])))


def _cli_env() -> dict:
    return child_env()


@pytest.mark.parametrize("stdout", ["closed-pipe", "closed"])
def test_closed_or_broken_stdout_exits_quietly(pair, stdout):
    """`llmcad generate ... | head -c0` (the reader is gone) and `>&-` (no stdout): exit 0, nothing on
    stderr, as `head` expects."""
    argv = [sys.executable, "-m", "llmcad.cli", *generate_argv(pair["shared"], pair["target"], "--quiet")]
    if stdout == "closed-pipe":
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_cli_env())
        proc.stdout.close()  # before anything is written: every write gets EPIPE
        _, err = proc.communicate(timeout=120)
    else:
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, env=_cli_env(), preexec_fn=lambda: os.close(1))
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err.decode() == "", err.decode()


def test_unparsable_number_on_the_command_line_is_one_line(pair, capfd):
    err = run_cli(capfd, *generate_argv(pair["shared"], pair["target"], "--top-p", "high"))
    assert "argument --top-p: invalid float value: 'high'" in err


# ---------------------------------------------------------------- storage fallbacks
def _streaming_budget(draft, target) -> int:
    """The smallest budget the planner accepts: every target layer streamed."""
    return pair_models.least_budget(draft, target)


@pytest.fixture(scope="module")
def streaming(pair, tiny_models, tiny_tokenizer):
    """(budget streaming every target layer, prompt ids, the target's own greedy continuation)."""
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    want = tiny_models("llama", "target").generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                   dtype=torch.long), max_new_tokens=NEW_TOKENS, do_sample=False)
    return _streaming_budget(pair["shared"], pair["target"]), ids, want[0, len(ids):].tolist()


def test_o_direct_refused_reads_buffered_with_one_warning(pair, streaming):
    budget, ids, want = streaming
    with LLMCad.from_pretrained(pair["shared"], pair["target"], memory_budget=budget, mode="tree",
                                streamer_options={"direct": True}) as eng:
        ctl = eng.streamed
        assert ctl.placement.streamed_layers and ctl.streamer.direct
        ctl.drop_prefetch()
        ctl.streamer.inject_fault(0, errno.EINVAL)  # what a filesystem refusing O_DIRECT reads answers
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            result = eng.generate(ids, NEW_TOKENS)
        assert result.tokens == want
        ours = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
        assert len(ours) == 1 and "O_DIRECT read refused" in ours[0] and "using buffered reads" in ours[0]
        streamer_stats = result.stats["streamed"]["streamer"]
        assert streamer_stats["direct"] is False and streamer_stats["errors"] == 0


needs_uring = pytest.mark.skipif(not build_info()["io_uring_compiled"], reason="built without io_uring")


@needs_uring
def test_io_uring_refused_falls_back_to_pread(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(range(256)) * 64)
    monkeypatch.setenv("LLMCAD_DISABLE_IO_URING", "1")  # as if the kernel refused io_uring (EPERM)
    assert build_info()["io_uring_available"] is False
    with pytest.warns(RuntimeWarning, match="io_uring refused, using pread") as record:
        s = WeightStreamer([path], buffer_bytes=1 << 14, backend="auto")
    with s:
        assert len(record) == 1
        assert s.backend == "pread" and any("io_uring refused" in w for w in s.stats()["warnings"])
        layer = s.add_layer([(0, 3, 5000)])
        assert s.acquire(layer).range_bytes(0).tobytes() == path.read_bytes()[3:5003]
        s.release(layer)
    with pytest.raises(StreamerIOError, match="io_uring_queue_init refused: LLMCAD_DISABLE_IO_URING is set"):
        WeightStreamer([path], buffer_bytes=1 << 14, backend="io_uring")


@needs_uring
def test_engine_with_io_uring_refused_generates_through_pread(pair, streaming, monkeypatch):
    budget, ids, want = streaming
    monkeypatch.setenv("LLMCAD_DISABLE_IO_URING", "1")
    with pytest.warns(RuntimeWarning, match="io_uring refused"):
        eng = LLMCad.from_pretrained(pair["shared"], pair["target"], memory_budget=budget)
    with eng:
        result = eng.generate(ids, NEW_TOKENS)
    assert result.tokens == want
    assert result.stats["streamed"]["streamer"]["backend"] == "pread"
    assert any("io_uring refused" in w for w in result.stats["streamed"]["streamer"]["warnings"])


def test_cli_warning_is_one_line_and_not_an_error(pair):
    """The console script in a fresh process: a refused io_uring is one warning line, exit status 0."""
    from child_cli import LLMCAD_AT_THE_LEAST_BUDGET

    env = child_env(LLMCAD_DISABLE_IO_URING="1")
    argv = generate_argv(pair["shared"], pair["target"], "--json")  # at the least budget: every layer streams
    proc = subprocess.run([*LLMCAD_AT_THE_LEAST_BUDGET, *argv], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tokens"]) == NEW_TOKENS
    if build_info()["io_uring_compiled"]:
        assert proc.stderr.startswith("llmcad: warning: llmcad streamer: io_uring refused, using pread")
        assert proc.stderr.count("\n") == 1, proc.stderr


def test_unexpected_exception_is_still_one_line(monkeypatch, capfd):
    def broken_generate(args):
        raise RuntimeError("something\ninternal")

    monkeypatch.setattr(cli, "run_generate", broken_generate)
    err = run_cli(capfd, "generate", "--draft", "d", "--target", "t", "--prompt", "p")
    assert "internal error (RuntimeError): something internal" in err


def test_weight_file_swapped_before_the_streamer_opens_it(pair, streaming, tmp_path, monkeypatch):
    """The file is validated and indexed, then replaced (same size, other bytes) before the C++ streamer
    opens it by path: loading must fail naming the file, never read weights of neither model."""
    from llmcad.streaming import streamer as streamer_module

    budget, _, _ = streaming
    target = tmp_path / "target"
    shutil.copytree(pair["target"], target)
    weights = target / "model.safetensors"

    class SwappingStreamer(WeightStreamer):
        def __init__(self, paths, **kwargs):
            data = bytearray(weights.read_bytes())
            data[-64:] = bytes(64)  # the last tensor's tail zeroed: a plausible, wrong file
            other = target / "other.tmp"
            other.write_bytes(bytes(data))
            os.replace(other, weights)
            super().__init__(paths, **kwargs)

    monkeypatch.setattr(streamer_module, "WeightStreamer", SwappingStreamer)
    with pytest.raises(WeightFileError, match=re.escape(f"{weights}: replaced on disk while the model was loading")):
        LLMCad.from_pretrained(pair["shared"], target, memory_budget=budget)


@pytest.mark.parametrize("budget", BUDGETS)
def test_fifo_weight_file_is_refused_without_blocking(pair, tmp_path, budget):
    target = tmp_path / "target"
    shutil.copytree(pair["target"], target)
    (target / "model.safetensors").unlink()
    os.mkfifo(target / "model.safetensors")
    outcome = []
    thread = threading.Thread(daemon=True, target=lambda: outcome.append(_raised(
        lambda: LLMCad.from_pretrained(pair["shared"], target, memory_budget=budget))))
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "loading blocked on a FIFO"
    assert isinstance(outcome[0], WeightFileError) and "model.safetensors: is a FIFO" in str(outcome[0])


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - handed to the test
        return exc
    return None


def test_streamer_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "w.bin"
    os.mkfifo(fifo)
    outcome = []
    thread = threading.Thread(daemon=True, target=lambda: outcome.append(_raised(
        lambda: WeightStreamer([fifo], buffer_bytes=1 << 14))))
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the streamer blocked opening a FIFO"
    assert isinstance(outcome[0], StreamerIOError)
    assert f"cannot open weight file '{fifo}': not a regular file" in str(outcome[0])


def test_pickle_checkpoint_holding_objects_is_one_clear_line(pair, tmp_path, capfd):
    """torch.load(weights_only=True) refuses it: one line naming the file, no escape codes, no advice to
    load it unsafely."""
    import fractions

    from safetensors.torch import load_file

    target = tmp_path / "pickled"
    shutil.copytree(pair["target"], target)
    state = load_file(target / "model.safetensors")
    state["extra"] = fractions.Fraction(1, 3)
    torch.save(state, target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    pattern = (rf"{re.escape(str(target / 'pytorch_model.bin'))}: a pickle checkpoint holding a fractions\.Fraction "
               r"object, which llmcad does not load")
    with pytest.raises(ModelLoadError, match=pattern):
        LLMCad.from_pretrained(pair["shared"], target)
    err = run_cli(capfd, *generate_argv(pair["shared"], target), "--memory-budget", "none")  # resident: .bin loads
    assert re.search(pattern, err) and "\x1b" not in err and "weights_only" not in err and "internal error" not in err
