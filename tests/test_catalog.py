"""Models by name: `llmcad models` lists and removes what the cache holds, names stand for paths,
and with neither --draft nor --target every command uses the demo pair from the cache."""
from __future__ import annotations

import json
import shutil

import pytest

from llmcad import cli
from llmcad.errors import ModelLoadError
from llmcad.models import catalog, fetch

PROMPT = "def add(a, b):"


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_pair_dirs):
    """$LLMCAD_HOME holding a tiny pair under the demo pair's cache names, a named tiny target and a GGUF."""
    home = tmp_path / "home"
    dirs = tiny_pair_dirs("qwen2")
    for model, source in ((fetch.DRAFT, dirs["shared"]), (fetch.TARGET, dirs["target"])):
        shutil.copytree(source, home / f"{model.name}-bfloat16")
    shutil.copytree(dirs["target"], home / "mytarget")
    (home / "mytarget" / catalog.STAMP).write_text(json.dumps({"source": "/somewhere/model.gguf"}))
    (home / "gguf").mkdir()
    (home / "gguf" / "some.gguf").write_bytes(b"GGUF" + bytes(100))
    (home / "notes").mkdir()  # not a model: never listed
    monkeypatch.setenv("LLMCAD_HOME", str(home))
    return home


def test_models_lists_size_weights_and_source(cache, capsys):
    assert cli.main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"qwen2.5-coder-0.5b-instruct-bfloat16", "qwen2.5-coder-1.5b-instruct-bfloat16",
                           "mytarget", "some"}
    mine = listed["mytarget"]
    assert mine["kind"] == "model" and mine["source"] == "/somewhere/model.gguf" and mine["weights"] == "float32"
    assert mine["size_bytes"] == sum(f.stat().st_size for f in (cache / "mytarget").rglob("*") if f.is_file())
    assert listed["some"]["kind"] == "gguf" and listed["some"]["size_bytes"] == 104
    assert cli.main(["models"]) == 0
    table = capsys.readouterr().out
    assert "mytarget" in table and "float32" in table and "4 entries" in table


def test_a_name_stands_for_its_directory(cache, capsys):
    args = ["generate", "--draft", "qwen2.5-coder-0.5b-instruct-bfloat16", "--target", "mytarget",
            "--prompt", PROMPT, "--max-new-tokens", "4", "--json"]
    assert cli.main(args) == 0
    by_name = json.loads(capsys.readouterr().out)["tokens"]
    paths = ["generate", "--draft", str(cache / "qwen2.5-coder-0.5b-instruct-bfloat16"), "--target",
             str(cache / "mytarget"), "--prompt", PROMPT, "--max-new-tokens", "4", "--json"]
    assert cli.main(paths) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == by_name and len(by_name) == 4


def test_no_paths_means_the_demo_pair(cache, capsys):
    assert cli.main(["generate", "--prompt", PROMPT, "--max-new-tokens", "4", "--json"]) == 0
    by_default = json.loads(capsys.readouterr().out)["tokens"]
    explicit = ["generate", "--draft", str(cache / "qwen2.5-coder-0.5b-instruct-bfloat16"), "--target",
                str(cache / "qwen2.5-coder-1.5b-instruct-bfloat16"), "--prompt", PROMPT, "--max-new-tokens", "4",
                "--json"]
    assert cli.main(explicit) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == by_default


def test_one_of_the_pair_is_refused(cache, capsys):
    assert cli.main(["generate", "--target", "mytarget", "--prompt", PROMPT]) == 2
    assert "give both --draft and --target, or neither" in capsys.readouterr().err


def test_models_rm_removes_one_and_names_the_choices_otherwise(cache, capsys):
    assert cli.main(["models", "rm", "mytarget", "some"]) == 0
    assert "removed mytarget" in capsys.readouterr().out
    assert not (cache / "mytarget").exists() and not (cache / "gguf" / "some.gguf").exists()
    assert cli.main(["models", "rm", "nothing-here"]) == 2
    err = capsys.readouterr().err
    assert "no model called 'nothing-here'" in err and "qwen2.5-coder-0.5b-instruct-bfloat16" in err
    assert (cache / "notes").is_dir()


def test_the_api_takes_names_and_defaults_to_the_demo_pair(cache):
    from llmcad import LLMCad

    with LLMCad.from_pretrained(mode="chain", chain_length=2) as engine:
        by_default = engine.generate(PROMPT, 4).tokens
    with LLMCad.from_pretrained("qwen2.5-coder-0.5b-instruct-bfloat16", "qwen2.5-coder-1.5b-instruct-bfloat16",
                                mode="chain", chain_length=2) as engine:
        assert engine.generate(PROMPT, 4).tokens == by_default
    with pytest.raises(ModelLoadError, match="give both draft and target"):
        LLMCad.from_pretrained("mytarget")
