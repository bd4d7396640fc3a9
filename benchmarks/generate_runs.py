"""What the scripts beside this one share: HumanEval prompts as files, one ``llmcad generate --json``
run in its own process, reduced to its tokens and the figures the scripts compare, and the report's
JSON and markdown files."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from llmcad.bench.workloads import humaneval

POLICY_KEYS = ("mean_tree_tokens", "max_tree_tokens_chosen", "target_pass_model_s", "draft_model_s",
               "lookup_nodes_proposed", "lookup_nodes_accepted")


@contextmanager
def humaneval_prompt_files(span: str):
    """[(task id, path of a file holding its prompt)] for HumanEval problems ``span`` (START:END)."""
    texts, labels = humaneval(span)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, text in enumerate(texts):
            path = Path(tmp) / f"prompt{i}.txt"
            path.write_text(text, encoding="utf-8")
            files.append((labels[i], str(path)))
        yield files


def add_run_arguments(p) -> None:
    """The arguments every script here takes: the pair, the HumanEval problems, the tokens a prompt."""
    p.add_argument("--draft", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--prompts", default="0:2", help="HumanEval problems START:END (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64)


def write_report(out, report: dict, markdown: str) -> None:
    """``report`` as JSON at ``out`` and ``markdown`` beside it (.md), and the markdown on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def generate(options: list, prompt_file: str, what: str) -> dict:
    """``llmcad generate --file PROMPT --raw --json OPTIONS`` in a child process: tokens, tokens a pass,
    tok/s, passes, seconds and the policy's choices. SystemExit naming ``what`` when it fails."""
    cmd = [sys.executable, "-m", "llmcad.cli", "generate", "--file", prompt_file, "--raw", "--json", *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {proc.stderr[-800:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    stats = out["stats"]
    return {"tokens": out["tokens"], "tokens_per_pass": stats["tokens_per_pass"],
            "tokens_per_s": stats["tokens_per_s"], "target_passes": stats["target_passes"],
            "seconds": len(out["tokens"]) / stats["tokens_per_s"] if stats["tokens_per_s"] else 0.0,
            "policy": {k: stats[k] for k in POLICY_KEYS if k in stats}, "cpu_threads": stats.get("cpu_threads")}
