"""`llmcad generate` end to end, error reporting, and the subcommand table."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmcad import cli
from child_cli import child_env

PROMPT = "def add(a, b):"


def generate_args(dirs, *extra):
    return ["generate", "--draft", str(dirs["shared"]), "--target", str(dirs["target"]), "--prompt", PROMPT,
            "--max-new-tokens", "10", *extra]


def test_generate_json_matches_target_greedy(tiny_pair_dirs, tiny_models, tiny_tokenizer, capsys):
    dirs = tiny_pair_dirs("qwen2")
    assert cli.main(generate_args(dirs, "--json", "--mode", "tree", "--max-tree-tokens", "6")) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "tokens", "stats"}
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    expected = tiny_models("qwen2", "target").generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    assert out["tokens"] == expected[0, len(ids):].tolist()
    assert out["text"] == tiny_tokenizer.decode(out["tokens"], skip_special_tokens=True)
    assert out["stats"]["mode"] == "tree" and out["stats"]["max_tree_tokens"] == 6
    assert out["stats"]["target_passes"] >= 1


def test_prompt_lookup_switches(tiny_pair_dirs, capsys):
    dirs = tiny_pair_dirs("llama")
    for flag, on in (("--prompt-lookup", True), ("--no-prompt-lookup", False)):
        assert cli.main(generate_args(dirs, "--json", flag)) == 0
        stats = json.loads(capsys.readouterr().out)["stats"]
        assert stats["prompt_lookup"] is on and (on or stats["lookup_nodes_proposed"] == 0)


def test_drafting_beside_compute_can_be_turned_off(tiny_pair_dirs, capsys):
    dirs = tiny_pair_dirs("llama")
    assert cli.main(generate_args(dirs, "--json", "--no-draft-beside-compute")) == 0
    off = json.loads(capsys.readouterr().out)
    assert off["stats"]["draft_beside_compute"] == {"mode": "disabled"}
    assert cli.main(generate_args(dirs, "--json")) == 0
    on = json.loads(capsys.readouterr().out)
    assert on["stats"]["draft_beside_compute"]["mode"] != "disabled" and on["tokens"] == off["tokens"]


def test_generate_streams_text_and_writes_a_trace(tiny_pair_dirs, capsys, tmp_path):
    dirs = tiny_pair_dirs("llama")
    trace = tmp_path / "trace.json"
    assert cli.main(generate_args(dirs, "--trace", str(trace), "--mode", "chain", "--chain-length", "2")) == 0
    streamed = capsys.readouterr().out
    assert cli.main(generate_args(dirs, "--json", "--mode", "chain", "--chain-length", "2")) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    assert streamed == text + "\n"
    events = json.loads(trace.read_text())["traceEvents"]  # Chrome trace-event JSON (see test_trace.py)
    lanes = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert lanes == {"IO", "target compute", "draft", "verify/commit"}
    assert sum(e["ph"] == "X" and e["name"] == "verify" for e in events) >= 1


def test_ascii_only_terminal_gets_escapes_not_an_abort(tiny_pair_dirs, capsys):
    """Generated text stdout cannot encode (here U+FFFD from the random tiny model's partial UTF-8
    bytes) is written with backslash escapes; the generation is never cut short."""
    dirs = tiny_pair_dirs("llama")
    argv = generate_args(dirs, "--mode", "target-only", "--max-new-tokens", "40")
    assert cli.main([*argv, "--json"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    assert "\ufffd" in text  # the case under test: not ASCII
    env = child_env(LANG="C", LC_ALL="C", PYTHONIOENCODING="ascii")
    proc = subprocess.run([sys.executable, "-m", "llmcad.cli", *argv, "--quiet"], capture_output=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert proc.stdout.decode("ascii") == text.encode("ascii", "backslashreplace").decode("ascii") + "\n"


def test_sampling_flags(tiny_pair_dirs, capsys):
    dirs = tiny_pair_dirs("llama")
    runs = []
    for _ in range(2):
        assert cli.main(generate_args(dirs, "--json", "--temperature", "0.9", "--top-k", "5", "--top-p", "0.9",
                                      "--seed", "3")) == 0
        runs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert runs[0] == runs[1] and len(runs[0]) == 10


def test_temperature_zero_is_greedy(tiny_pair_dirs, capsys):
    dirs = tiny_pair_dirs("llama")
    runs = []
    for extra in ([], ["--temperature", "0"], ["--temperature", "0", "--top-k", "5", "--seed", "3"]):
        assert cli.main(generate_args(dirs, "--json", *extra)) == 0
        runs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert runs[1] == runs[0] and runs[2] == runs[0]


def _generated_tokens(capsys, argv) -> list:
    assert cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["tokens"]


def test_prompt_from_stdin_or_a_file(tiny_pair_dirs, capsys, monkeypatch, tmp_path):
    import io

    dirs = tiny_pair_dirs("llama")
    expected = _generated_tokens(capsys, generate_args(dirs))
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT, encoding="utf-8")
    by_file = generate_args(dirs)
    by_file[by_file.index("--prompt"):by_file.index("--prompt") + 2] = ["--file", str(path)]
    assert _generated_tokens(capsys, by_file) == expected
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(PROMPT.encode())))
    by_stdin = generate_args(dirs)
    by_stdin[by_stdin.index(PROMPT)] = "-"
    assert _generated_tokens(capsys, by_stdin) == expected


@pytest.mark.parametrize("content,needle", [
    (None, ": cannot read the prompt: No such file or directory"),
    (b"def \xff(a):", ": the prompt is not UTF-8 text (byte 4)"),
    (b"", "prompt is empty (--file "),
])
def test_unreadable_prompt_file(tiny_pair_dirs, capsys, tmp_path, content, needle):
    path = tmp_path / "prompt.txt"
    if content is not None:
        path.write_bytes(content)
    argv = generate_args(tiny_pair_dirs("llama"))
    argv[argv.index("--prompt"):argv.index("--prompt") + 2] = ["--file", str(path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmcad: error: ") and needle in err and err.count("\n") == 1, err
    assert cli.main([*argv, "--prompt", "x"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_stop_escapes_are_unescaped():
    args = cli.build_parser().parse_args(["generate", "--draft", "d", "--target", "t", "--prompt", "p",
                                          "--stop", r"\n", "--stop", r"a\tb\\n", "--stop", r"\x"])
    assert args.stop == ["\n", "a\tb\\n", "\\x"]


def test_threads(tiny_pair_dirs, capsys):
    dirs = tiny_pair_dirs("llama")
    before = torch.get_num_threads()
    try:
        expected = _generated_tokens(capsys, generate_args(dirs))
        assert _generated_tokens(capsys, generate_args(dirs, "--threads", "1")) == expected
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cli.main(generate_args(dirs, "--threads", "0")) == 2
    assert "--threads=0: expected an int >= 1 or 'auto'" in capsys.readouterr().err
    assert cli.main(generate_args(dirs, "--threads", "many")) == 2
    assert "--threads=many: expected an int >= 1 or 'auto'" in capsys.readouterr().err


def test_auto_threads_say_what_they_chose(tiny_pair_dirs, capsys):
    dirs = tiny_pair_dirs("llama")
    assert cli.main(generate_args(dirs, "--json", "--threads", "auto")) == 0
    chosen = json.loads(capsys.readouterr().out)["stats"]["cpu_threads"]
    # the tests pin OMP_NUM_THREADS (conftest), which auto keeps
    assert chosen["chosen"] == "OMP_NUM_THREADS" and chosen["threads"] == torch.get_num_threads()


def test_generate_help_shows_every_default(capsys):
    import argparse

    parser = cli.build_parser()
    generate = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    formatter = generate._get_formatter()
    for action in generate._actions:
        if action.option_strings and action.nargs != 0 and not action.required and action.dest not in ("prompt",
                                                                                                         "file"):
            assert "default" in formatter._get_help_string(action), action.option_strings
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 128)", "(default: llmcad)", "(default: cpu)", "(default: cost)", "chain; default: 5)"):
        assert shown in out, shown


@pytest.mark.parametrize("extra,needle", [
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--mode", "chain", "--branch-threshold", "0.2"], "does not take branch_threshold"),
    (["--temperature", "-1"], "temperature"),
    (["--memory-budget", "lots"], "memory_budget"),
    (["--mode", "chain", "--prompt-lookup"], "does not take prompt_lookup"),
    (["--alpha-rule", "paper", "--prompt-lookup"], "prompt_lookup needs alpha_rule='cost'"),
])
def test_errors_are_one_line_exit_2(tiny_pair_dirs, capsys, extra, needle):
    assert cli.main(generate_args(tiny_pair_dirs("llama"), *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmcad: error: ") and needle in err and err.count("\n") == 1


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_generate", interrupted)
    assert cli.main(["generate", "--draft", "d", "--target", "t", "--prompt", "p"]) == 130
    assert capsys.readouterr().err == ""


def test_missing_subcommand_module_says_not_available(monkeypatch, capsys):
    monkeypatch.setitem(cli.EXTERNAL, "demo", ("llmcad.no_such_module_here", "x"))
    assert cli.main(["demo", "--anything"]) == 2
    assert "not available in this build" in capsys.readouterr().err
    monkeypatch.setitem(cli.BENCH, "e2e", "llmcad.no_such_bench_here")
    assert cli.main(["bench", "e2e", "--json"]) == 2
    assert "'bench e2e' is not available" in capsys.readouterr().err
    assert cli.main(["bench"]) == 2


def test_subcommand_modules_get_their_arguments(monkeypatch, capsys, tmp_path):
    module = tmp_path / "fake_sub.py"
    module.write_text("def add_arguments(p):\n    p.add_argument('--n', type=int)\n"
                      "def run(args):\n    print('n', args.n)\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.BENCH, "pass", "fake_sub")
    assert cli.main(["bench", "pass", "--n", "4"]) == 0
    assert capsys.readouterr().out == "n 4\n"


def test_console_error_has_no_traceback(tmp_path):
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "llmcad.cli", "generate", "--draft", str(tmp_path / "missing"),
                           "--target", str(tmp_path / "missing"), "--prompt", "hi"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("llmcad: error: model directory") and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
