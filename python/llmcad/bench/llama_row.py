"""A llama.cpp row of ``llmcad bench e2e``, run by the interpreter that has ``llama_cpp`` (llama-cpp-python).

``PYTHON llama_row.py JOB.json OUT.json``: loads the job's GGUF with llama.cpp's defaults (mmap), warms up,
then generates each prompt's token ids greedily, target-only or with llama.cpp's prompt-lookup drafting
(``LlamaPromptLookupDecoding``), and writes a raw record shaped like :mod:`llmcad.bench.rows`'s. A target
pass is one ``Llama.eval``; the tokens sampled after it are what it accepted. Bytes read are
/proc/self/io ``read_bytes`` (mmap faults included).

Runs outside llmcad's environment: imports only the standard library and llama_cpp (never llmcad, torch
or numpy directly). Part of llmcad.bench (tools): nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def io_read_bytes() -> int | None:
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("read_bytes:")), None)
    except OSError:
        return None


def peak_rss_bytes() -> int | None:
    """VmHWM (ru_maxrss would be inherited from the parent across fork and exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None


class CountingLlama:
    """A ``llama_cpp.Llama`` whose ``eval`` calls (target passes) are counted."""

    def __init__(self, job: dict):
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = job["row"]["options"].get("draft")
        lookup = LlamaPromptLookupDecoding(num_pred_tokens=job["row"]["options"].get("num_pred_tokens", 10)) \
            if draft == "prompt-lookup" else None
        # context: the longest prompt and its tokens (the prompt-lookup row keeps logits for every position)
        n_ctx = max(map(len, job["prompt_ids"])) + max(job["max_new_tokens"], job["warmup_tokens"]) + 16
        self.llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=n_ctx, n_threads=job.get("threads"),
                                   n_threads_batch=job.get("threads"), seed=job["seed"], draft_model=lookup,
                                   use_mmap=True, verbose=False)
        self.passes = 0
        original = self.llm.eval

        def counted(tokens):
            self.passes += 1
            return original(tokens)

        self.llm.eval = counted

    def generate(self, ids: list, max_new_tokens: int, eos: set) -> tuple[list, dict]:
        out, accepted, io0 = [], [], io_read_bytes()
        first_s = None
        start = time.perf_counter()
        seen = self.passes
        for token in self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if self.passes != seen:  # a new pass emitted this token
                accepted.append(0)
                seen = self.passes
            if first_s is None:  # the prompt's pass is done
                first_s = time.perf_counter() - start
            accepted[-1] += 1
            out.append(int(token))
            if int(token) in eos or len(out) >= max_new_tokens:
                break
        seconds = time.perf_counter() - start
        first_tokens = accepted[0] if accepted else 0
        io1 = io_read_bytes()
        read = io1 - io0 if io0 is not None and io1 is not None else None
        return out, {"generated": len(out), "seconds": seconds, "passes": len(accepted), "bytes_read": read,
                     "io_read_bytes": read, "draft_steps": 0, "first_pass_s": first_s,
                     "first_pass_tokens": first_tokens, "accept_lengths": accepted, "tree_tokens": None,
                     "provisional_drafted": None, "provisional_followed": None, "provisional_reused": None,
                     "provisional_dropped": None}


def row_record(job: dict) -> dict:
    row = job["row"]
    record = {"name": row["name"], "setting": job["setting"], "options": row["options"], "quantize": None,
              "error": None}
    try:
        import llama_cpp

        llm = CountingLlama(job)
        eos = set(job.get("eos_ids") or [])
        llm.generate(job["prompt_ids"][0], job["warmup_tokens"], eos)
        keys = ("generated", "seconds", "passes", "bytes_read", "io_read_bytes", "draft_steps", "first_pass_s",
                "first_pass_tokens")
        totals = dict.fromkeys(keys, 0)
        tokens, per_prompt = [], []
        for i, ids in enumerate(job["prompt_ids"]):
            out, stats = llm.generate(ids, job["max_new_tokens"], eos)
            tokens.append(out)
            per_prompt.append(stats)
            for key in keys:
                totals[key] = None if totals[key] is None or stats[key] is None else totals[key] + stats[key]
            print(f"  prompt {i + 1}/{len(job['prompt_ids'])}: {stats['generated']} tokens in "
                  f"{stats['seconds']:.1f} s, {stats['passes']} passes", file=sys.stderr, flush=True)
        record.update(totals, tokens=tokens, per_prompt=per_prompt, time_split_s=None, tree_tokens=None,
                      peak_rss_bytes=peak_rss_bytes(),
                      placement={"gguf": job["gguf"], "mmap": True, "llama_cpp": llama_cpp.__version__},
                      bytes_source="/proc/self/io read_bytes", evictor=None)
    except Exception as exc:  # a failed row is reported; the other rows still run
        record["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        print(f"  row failed: {record['error']}", file=sys.stderr, flush=True)
    return record


def main(argv=None) -> int:
    job_path, out_path = (argv or sys.argv[1:])[:2]
    Path(out_path).write_text(json.dumps(row_record(json.loads(Path(job_path).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
