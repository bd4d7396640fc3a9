"""A llama.cpp row of ``llmcad bench e2e``, run by the interpreter that has ``llama_cpp`` (llama-cpp-python).

``PYTHON llama_row.py JOB.json OUT.json``: loads the job's GGUF with llama.cpp's defaults (mmap), warms up,
then generates each prompt's token ids greedily, target-only or with llama.cpp's prompt-lookup drafting
(``LlamaPromptLookupDecoding``), and writes a raw record shaped like :mod:`llmcad.bench.rows`'s. A target
pass is one ``Llama.eval``; the tokens sampled after it are what it accepted. Bytes read are
/proc/self/io ``read_bytes`` (mmap faults included).

With a draft model (``draft: model``) the row runs llama.cpp's own speculative decoding instead: its
``llama-speculative-simple`` example (``job["llama_speculative"]``), one process a prompt, on the target's
and the draft's GGUF (:class:`SpeculativeExample`).

Runs outside llmcad's environment: imports only the standard library and llama_cpp (never llmcad, torch
or numpy directly). Part of llmcad.bench (tools): nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
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


def longest_prompt(job: dict) -> int:
    return max(map(len, job["prompt_ids"] + [job["warmup_ids"]]))


class CountingLlama:
    """A ``llama_cpp.Llama`` whose ``eval`` calls (target passes) are counted."""

    def __init__(self, job: dict):
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = job["row"]["options"].get("draft")
        lookup = LlamaPromptLookupDecoding(num_pred_tokens=job["row"]["options"].get("num_pred_tokens", 10)) \
            if draft == "prompt-lookup" else None
        # context: the longest prompt and its tokens (the prompt-lookup row keeps logits for every position)
        n_ctx = longest_prompt(job) + max(job["max_new_tokens"], job["warmup_tokens"]) + 16
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


class SpeculativeExample:
    """llama.cpp's speculative decoding with a draft model, as its ``llama-speculative-simple`` runs it.

    The prompt's ids go in as text (llama.cpp's own detokenization, checked to tokenize back to the same
    ids); the example prints the text it generated on stdout (not the end token it stopped at), and on
    stderr (at debug verbosity, which costs it 1-3% here) one ``accepted A/D draft tokens`` line a target
    pass (A + 1 tokens), then its own timings. It may generate up to its draft length past the tokens asked. The prompt's
    pass (``encoded``) is timed apart from the passes that decode. Bytes read and peak RSS are the child's
    (``getrusage(RUSAGE_CHILDREN)``: ``ru_inblock`` counts /proc's ``read_bytes`` in 512-byte blocks).
    """

    ACCEPTED = re.compile(r"accepted (\d+)/(\d+) draft tokens")
    TIMED = re.compile(r"(encoded|decoded)\s+(\d+) tokens in\s+([0-9.]+) seconds")

    def __init__(self, job: dict):
        import llama_cpp

        self.job, self.options = job, job["row"]["options"]
        for key in ("llama_speculative", "gguf_draft"):
            if not job.get(key) or not Path(job[key]).is_file():
                raise FileNotFoundError(f"{key}: no such file {job.get(key)!r}")
        self.vocab = llama_cpp.Llama(model_path=job["gguf"], vocab_only=True, verbose=False)
        self.n_ctx = longest_prompt(job) + max(job["max_new_tokens"], job["warmup_tokens"]) + 64
        self.peak_rss = 0

    def command(self, text: str, max_new_tokens: int) -> list:
        threads = str(self.job.get("threads") or os.cpu_count())
        cmd = [self.job["llama_speculative"], "-m", self.job["gguf"], "-md", self.job["gguf_draft"],
               "--spec-type", "draft-simple", "-p", text, "-n", str(max(max_new_tokens - 1, 0)),
               "--temp", "0", "--top-k", "1", "-c", str(self.n_ctx), "-t", threads, "-td", threads,
               "-s", str(self.job["seed"]), "-lv", "5"]
        if self.options.get("draft_max") is not None:  # else llama.cpp's default
            cmd += ["--spec-draft-n-max", str(self.options["draft_max"])]
        return cmd

    def generate(self, ids: list, max_new_tokens: int, eos: set) -> tuple[list, dict]:
        text = self.vocab.detokenize(ids, special=True).decode("utf-8")
        if self.vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True) != list(ids):
            raise ValueError("the prompt's ids do not survive llama.cpp's detokenize/tokenize round trip, so "
                             "llama-speculative-simple would run another prompt")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(self.command(text, max_new_tokens), capture_output=True, text=True,
                              errors="replace")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"llama-speculative-simple exited with status {done.returncode}: {tail}")
        self.peak_rss = max(self.peak_rss, after.ru_maxrss * 1024)
        timed = {kind: (int(n), float(s)) for kind, n, s in self.TIMED.findall(done.stderr)}
        accepted = [int(a) + 1 for a, _ in self.ACCEPTED.findall(done.stderr)]
        head = "\n\n" + text
        if set(timed) != {"encoded", "decoded"} or not done.stdout.startswith(head):
            raise RuntimeError("llama-speculative-simple's output is not in the expected layout (prompt echo on "
                               "stdout, 'encoded'/'decoded' timings on stderr)")
        generated = done.stdout[len(head):]
        generated = generated[:-4] if generated.endswith("\n" * 4) else generated  # its two closing "\n\n"
        out = self.vocab.tokenize(generated.encode("utf-8"), add_bos=False, special=True) if generated else []
        prompt_s, decode_s = timed["encoded"][1], timed["decoded"][1]
        read = (after.ru_inblock - before.ru_inblock) * 512
        return out, {"generated": timed["decoded"][0], "seconds": prompt_s + decode_s, "passes": len(accepted),
                     "bytes_read": read, "io_read_bytes": read, "draft_steps": 0, "first_pass_s": prompt_s,
                     "first_pass_tokens": 0, "accept_lengths": accepted, "tree_tokens": None,
                     "provisional_drafted": None, "provisional_followed": None, "provisional_reused": None,
                     "provisional_dropped": None}


def row_record(job: dict) -> dict:
    row = job["row"]
    record = {"name": row["name"], "setting": job["setting"], "options": row["options"], "quantize": None,
              "error": None}
    try:
        import llama_cpp

        llm = SpeculativeExample(job) if row["options"].get("draft") == "model" else CountingLlama(job)
        eos = set(job.get("eos_ids") or [])
        llm.generate(job["warmup_ids"], job["warmup_tokens"], eos)
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
                      peak_rss_bytes=max(peak_rss_bytes() or 0, getattr(llm, "peak_rss", 0)) or None,
                      placement={"gguf": job["gguf"], "mmap": True, "llama_cpp": llama_cpp.__version__,
                                 **({"gguf_draft": job["gguf_draft"]} if isinstance(llm, SpeculativeExample) else {})},
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
