"""``llmcad bench chat`` on tiny fixture models with a chat template: every turn with and without the
prompt cache in one run, equal replies, reuse from the second turn on; its script is checked."""
from __future__ import annotations

import json
import re

import pytest

import pair_models
from llmcad import cli
from llmcad.bench.chat_bench import DEFAULT_SCRIPT, load_script
from llmcad.errors import PromptError


@pytest.fixture(scope="module")
def chat_pair(tiny_pair_dirs, tmp_path_factory):
    tokenizer = pair_models.build_tokenizer(chat_template=pair_models.CHAT_TEMPLATE)
    root, dirs = tmp_path_factory.mktemp("bench_chat"), tiny_pair_dirs("qwen2")
    return {kind: pair_models.copy_with_tokenizer(dirs[kind], root / kind, tokenizer) for kind in ("target", "shared")}


def test_bench_chat_reports_every_turn_with_and_without_reuse(chat_pair, tmp_path, capsys):
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"system": "You write Python.",
                                  "turns": ["def add(a, b):", "for i in range(10):", "The quick brown"]}))
    argv = ["bench", "chat", "--draft", str(chat_pair["shared"]), "--target", str(chat_pair["target"]),
            "--mode", "chain", "--script", str(script), "--max-new-tokens", "6", "--json"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    turns = report["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["lossless"] for t in turns)
    assert all(t["without_reuse"]["cached_tokens"] == 0 for t in turns)
    assert turns[0]["with_reuse"]["cached_tokens"] == 0
    for before, turn in zip(turns, turns[1:]):
        assert turn["history_tokens"] > before["prompt_tokens"]
        assert before["prompt_tokens"] - 1 <= turn["with_reuse"]["cached_tokens"] <= turn["history_tokens"]
    for turn in turns:
        assert turn["ttft_ratio"] == pytest.approx(turn["with_reuse"]["ttft_s"] / turn["without_reuse"]["ttft_s"])
        assert 0 < turn["with_reuse"]["ttft_s"] <= turn["with_reuse"]["total_s"]
    # only turn 3 compared: the others build the conversation with reuse, and their rows say so
    assert cli.main(argv[:-1] + ["--compare-turns", "3"]) == 0  # the markdown table
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d", line)]
    assert [r[7].strip() for r in rows][:2] == ["-", "-"] and rows[2][7].strip().endswith("x")
    assert [r[-2].strip() for r in rows] == ["-", "-", "yes"]
    assert int(rows[0][4]) == 0 and all(int(r[4]) > int(before[3]) - 2 for before, r in zip(rows, rows[1:]))
    assert cli.main(argv + ["--compare-turns", "4"]) == 2  # refused before loading
    assert "--compare-turns '4': the script has turns 1..3" in capsys.readouterr().err


def test_the_repository_script_and_bad_scripts(tmp_path):
    script = load_script(None)
    assert script == load_script(DEFAULT_SCRIPT) and len(script["turns"]) >= 4 and script["system"]
    bad = tmp_path / "bad.json"
    for text, needle in (("{", "not JSON"), ('{"turns": []}', "expected"), ('{"turns": ["a", 3]}', "expected")):
        bad.write_text(text)
        with pytest.raises(PromptError, match=needle):
            load_script(bad)
    with pytest.raises(PromptError, match="no such file"):
        load_script(tmp_path / "missing.json")
