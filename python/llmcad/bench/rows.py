"""One row of ``llmcad bench e2e``, run in its own process: load, warm up, generate every prompt cold.

``python -m llmcad.bench.rows JOB.json OUT.json`` reads a job written by :mod:`llmcad.bench.e2e`
(models, token ids, budget, the row's runner and options, the setting's bandwidth cap) and writes the
row's raw record: generated tokens per prompt, totals (tokens, seconds, target passes, bytes read,
draft steps), peak RSS, placement and the page-cache evictor's report. A failure is recorded in
``error``, never raised, so the other rows still run.

Part of llmcad.bench (tools): may import the whole package; nothing outside llmcad.bench imports it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from llmcad.bench import quant_rows


def main(argv=None) -> int:
    """``python -m llmcad.bench.rows JOB OUT``: measure one row and write its raw record."""
    job_path, out_path = (argv or sys.argv[1:])[:2]
    Path(out_path).write_text(json.dumps(row_record(json.loads(Path(job_path).read_text()))))
    return 0


def row_record(job: dict) -> dict:
    """The raw record of one row; a failure is recorded in ``error``, not raised."""
    import gc

    row = job["row"]
    record = {"name": row["name"], "setting": job["setting"], "options": row["options"],
              "quantize": row["options"].get("quantize"), "error": None}
    try:
        record.update(measure_row(quant_rows.resolve_job(job)))
    except Exception as exc:  # a failed row is reported; the other rows still run
        record["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        print(f"  row failed: {record['error']}", file=sys.stderr, flush=True)
    gc.collect()  # in-process runs: the row's models go before the next row loads
    return record


def measure_row(job: dict) -> dict:
    """Load the row's generator, warm up once, then generate each prompt from a cold page cache."""
    import warnings

    import torch

    from llmcad.cli import quiet_transformers

    quiet_transformers()
    warnings.filterwarnings("ignore", category=UserWarning)  # peers' (accelerate's) notes on offloading
    torch.manual_seed(job["seed"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    runner = EngineRow(job) if job["row"]["runner"] == "engine" else PeerRow(job)
    try:
        return _timed_prompts(runner, job)
    finally:
        runner.close()


def _timed_prompts(runner, job: dict) -> dict:
    """Warm up, then every prompt. Under kernel limits (``page_cache`` "kernel") the parent evicted the
    files once before the row and the cgroup charges the page cache: nothing here touches it. Otherwise
    the files are evicted before each prompt and every target forward (each pass reads from storage)."""
    from contextlib import nullcontext

    from llmcad.bench.pagecache import Evictor
    from llmcad.memory import peak_rss_bytes

    runner.generate(job["warmup_ids"], job["warmup_tokens"])  # outside the set: no measured prefix cached
    totals = {"generated": 0, "seconds": 0.0, "passes": 0, "bytes_read": 0, "draft_steps": 0, "io_read_bytes": 0,
              "first_pass_s": 0.0, "first_pass_tokens": 0, "tree_tokens": 0, "provisional_drafted": 0,
              "provisional_followed": 0, "provisional_reused": 0, "provisional_dropped": 0}
    tokens, per_prompt = [], []
    kernel = job.get("page_cache") == "kernel"
    with nullcontext() if kernel else Evictor(runner.files(), interval_s=job["evict_interval_s"]) as evictor:
        # every target pass starts cold: its weights come from storage, whoever reads them (the decoder's
        # hook: llmcad runs it and the head apart, a CausalLM's forward runs it inside)
        hook = None if kernel else runner.target_model().get_decoder().register_forward_pre_hook(
            lambda *_: evictor.evict_now())
        try:
            for i, ids in enumerate(job["prompt_ids"]):
                runner.reset()
                if not kernel:
                    runner.cold()
                out, stats = runner.generate(ids, job["max_new_tokens"])
                tokens.append(out)
                per_prompt.append(stats)
                for key in totals:
                    totals[key] = None if totals[key] is None or stats.get(key) is None else totals[key] + stats[key]
                print(f"  prompt {i + 1}/{len(job['prompt_ids'])}: {stats['generated']} tokens in "
                      f"{stats['seconds']:.1f} s, {stats['passes']} passes", file=sys.stderr, flush=True)
        finally:
            if hook is not None:
                hook.remove()
    # the rule for drafting beside the target's compute carries over between prompts: its last state
    beside = per_prompt[-1].get("beside_compute") if per_prompt else None
    return {**totals, "tokens": tokens, "per_prompt": per_prompt, "time_split_s": _time_split(per_prompt),
            "beside_compute": beside, "draft_head": per_prompt[-1].get("draft_head") if per_prompt else None,
            "cpu_threads": per_prompt[-1].get("cpu_threads") if per_prompt else None,
            "peak_rss_bytes": peak_rss_bytes(), "placement": runner.placement(), "bytes_source": runner.bytes_source,
            "evictor": None if kernel else evictor.report()}


def _time_split(per_prompt: list) -> dict | None:
    """Seconds in draft / target / other over all prompts (engine rows: from the engine's stats)."""
    parts = [p["time_s"] for p in per_prompt if isinstance(p.get("time_s"), dict)]
    if not parts:
        return None
    return {k: sum(p.get(k, 0.0) for p in parts) for k in ("draft", "target", "other", "total")}


def _first_pass(result) -> dict:
    """Seconds until the first target pass (the prompt's) was done and the tokens it emitted, from the trace."""
    trace = getattr(result, "trace", None) or []
    first = trace[0] if trace and isinstance(trace[0], dict) else {}
    return {"first_pass_s": first.get("t"), "first_pass_tokens": first.get("emitted")}


def load_engine(job: dict):
    """``LLMCad.from_pretrained`` with the row's options; a bandwidth cap goes to the streamer (through
    :func:`_assemble_engine` while ``from_pretrained`` takes no streamer options)."""
    import inspect

    from llmcad.engine import LLMCad

    options = dict(job["row"]["options"])
    mode = options.pop("mode")
    params = inspect.signature(LLMCad.from_pretrained).parameters
    if job.get("threads") and "threads" in params:  # the row's count, not one chosen from the load
        options["threads"] = job["threads"]
    if job.get("cap"):
        if "streamer_options" in params:
            options["streamer_options"] = {"bandwidth_cap": job["cap"]}
        elif "bandwidth_cap" in params:
            options["bandwidth_cap"] = job["cap"]
        else:
            return _assemble_engine(job, mode, options, {"bandwidth_cap": job["cap"]})
    return LLMCad.from_pretrained(job["draft"], job["target"], mode=mode, memory_budget=job["memory_budget"],
                                  device=job["device"], dtype=job["dtype"], **options)


def _assemble_engine(job: dict, mode: str, options: dict, streamer_options: dict):
    """The engine built from its parts (models, budget, streamed) as ``from_pretrained`` builds it, with
    ``streamer_options`` passed on: a stop-gap while ``from_pretrained`` takes no streamer options."""
    from llmcad.engine import LLMCad
    from llmcad.speculative.policy import make_policy
    from llmcad.models.loading import check_tokenizers, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
    from llmcad.streaming.streamed import load_budgeted_target

    policy = make_policy(mode, **options)
    dtype = resolve_dtype(job["dtype"])
    tokenizer = load_tokenizer(job["target"])
    draft = load_causal_lm(job["draft"], device=job["device"], dtype=dtype)
    streamed = load_budgeted_target(job["target"], memory_budget=job["memory_budget"], draft_model=draft,
                                    dtype=dtype, device=resolve_device(job["device"]),
                                    streamer_options=streamer_options)
    check_tokenizers(load_tokenizer(job["draft"]), tokenizer, draft, streamed.model)
    return LLMCad(draft, streamed.model, tokenizer, policy, streamed=streamed)


class EngineRow:
    """An llmcad row: the engine under the memory budget; bytes are the streamed payload."""

    bytes_source = "streamed payload bytes (llmcad)"

    def __init__(self, job: dict):
        self.engine = load_engine(job)
        self.streamed = self.engine.streamed
        self.target = job["target"]

    def files(self) -> list:
        from llmcad.streaming.weights import checkpoint_files

        return checkpoint_files(self.target)

    def reset(self) -> None:
        if self.streamed is not None:
            self.streamed.drop_prefetch()  # the previous prompt's prefetch would start this one warm

    def cold(self) -> None:
        from llmcad.bench.pagecache import evict

        evict(self.files())

    def generate(self, ids: list, max_new_tokens: int) -> tuple[list, dict]:
        from llmcad.bench.peers import io_read_bytes

        before, io0 = self._bytes(), io_read_bytes()
        start = time.perf_counter()
        result = self.engine.generate(ids, max_new_tokens)
        seconds = time.perf_counter() - start
        io1 = io_read_bytes()
        s = result.stats
        return list(result.tokens), {
            "generated": len(result.tokens), "seconds": seconds, "passes": s["target_passes"],
            "bytes_read": self._bytes() - before if self.streamed is not None else s.get("bytes_read", 0),
            "draft_steps": s.get("draft_steps", 0),
            "io_read_bytes": io1 - io0 if io0 is not None and io1 is not None else None,
            "provisional_drafted": s.get("provisional_drafted"), "provisional_followed": s.get("provisional_followed"),
            "provisional_reused": s.get("provisional_reused"), "provisional_dropped": s.get("provisional_dropped"),
            "tree_tokens": sum(p.get("tree_tokens", 0) for p in result.trace),
            "sizes": {k: s[k] for k in ("max_tree_tokens_chosen", "mean_tree_tokens", "mean_draft_rows",
                                        "target_pass_model_s", "draft_model_s", "provisional_steps_cut",
                                        "provisional_step_stretch") if k in s},
            "time_s": s.get("time_s"), "accept_lengths": [p.get("emitted") for p in result.trace],
            "beside_compute": s.get("draft_beside_compute"), "draft_head": s.get("draft_head"),
            "cpu_threads": s.get("cpu_threads"),
            **_first_pass(result)}

    def _bytes(self) -> int:
        return int(self.streamed.bytes_read) if self.streamed is not None else 0

    def target_model(self):
        return self.engine.target

    def placement(self) -> dict | None:
        p = self.engine.placement
        return p.summary() if p is not None else None

    def close(self) -> None:
        self.engine.close()


class PeerRow:
    """A transformers + accelerate disk offload row; bytes are what the process read from storage."""

    bytes_source = "/proc/self/io read_bytes"

    def __init__(self, job: dict):
        from llmcad.bench.peers import HFOffloadPeer

        draft = job["draft"] if job["row"]["options"].get("assisted") else None
        self.peer = HFOffloadPeer(job["target"], memory_budget=job["memory_budget"], draft=draft,
                                  offload_folder=job["offload_folder"], dtype=job["dtype"], device=job["device"])

    def files(self) -> list:
        return self.peer.files_read()

    def reset(self) -> None:
        pass

    def cold(self) -> None:
        from llmcad.bench.pagecache import evict

        evict(self.files())

    def generate(self, ids: list, max_new_tokens: int) -> tuple[list, dict]:
        start = time.perf_counter()
        tokens, s = self.peer.generate(ids, max_new_tokens)
        return tokens, {"generated": len(tokens), "seconds": time.perf_counter() - start, "tree_tokens": None,
                        "provisional_drafted": None, "provisional_followed": None, "provisional_reused": None,
                        "provisional_dropped": None,
                        "passes": s["target_passes"], "bytes_read": s["bytes_read"], "draft_steps": s["draft_steps"],
                        "io_read_bytes": s["bytes_read"], "first_pass_s": s["first_pass_s"],
                        "first_pass_tokens": s["first_pass_tokens"], "accept_lengths": s["accept_lengths"]}

    def target_model(self):
        return self.peer.target

    def placement(self) -> dict:
        return self.peer.placement()

    def close(self) -> None:
        self.peer = None


if __name__ == "__main__":
    sys.exit(main())
